"""grass_optim.memory: memory_report() counts every state byte where it is; estimate_memory() predicts
what the optimizer then holds, under each offload mode (from the same OffloadPolicy)."""

from __future__ import annotations

import pytest
import torch

from grass_optim import GrassAdamW, estimate_memory
from tests.helpers import batches, loss_fn, make_net, run_scenario


def test_memory_report_accounts_every_state_byte():
    _, opt, _ = run_scenario("inactive", batches(40))
    r = opt.memory_report()
    every = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    assert r.device_state_bytes + r.host_state_bytes + r.scalar_state_bytes == every
    assert r.host_state_bytes > 0 and r.pinned_bytes == 0  # no accelerator here: nothing pinned
    assert r.as_dict()["bytes_to_device"] == r.bytes_to_device


def test_estimate_memory_rows_and_warning(caplog):
    model = make_net(d=16, num_layers=8)
    est = estimate_memory(model, active_layers=2)
    block = sum(p.numel() for p in model.layers[0].parameters()) * 4
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers.")) * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    assert est.rows["adamw"] == {"weights": total, "gradients": total, "optimizer_state": 2 * total,
                                 "total": 4 * total, "in_flight": 0, "peak": 4 * total, "host_state": 0, "pinned": 0}
    inactive, stream = est.rows["grass-inactive"], est.rows["grass-stream"]
    assert inactive["optimizer_state"] == 2 * (2 * block + outside)
    assert inactive["gradients"] == 2 * block + outside
    assert est.rows["grass"]["optimizer_state"] == 2 * total
    assert stream["optimizer_state"] == 2 * (2 * block + outside)
    # Copies to the host still running when the next moves allocate: at a redraw the leaving blocks (2)
    # while the entering ones arrive; in "stream" the 2 written back plus the next step's first block.
    assert inactive["in_flight"] == 2 * 2 * block and inactive["peak"] == inactive["total"] + 2 * 2 * block
    assert stream["in_flight"] == 2 * block and stream["peak"] == stream["total"] + 2 * block
    assert inactive["host_state"] == stream["host_state"] == 2 * 8 * block
    assert est.rows["grass"]["in_flight"] == est.rows["grass"]["host_state"] == 0
    assert not est.outside_dominates
    assert "| grass-inactive |" in est.table()
    big_head = make_net(d=8, num_layers=4, d_out=4096)
    with caplog.at_level("WARNING", logger="grass_optim"):
        assert estimate_memory(big_head, active_layers=1).outside_dominates
    assert "outnumber" in caplog.text


def test_estimate_matches_the_report_after_all_blocks_were_visited():
    """The prediction for 'inactive' equals what the optimizer then holds on the device."""
    model = make_net(d=16, num_layers=6)
    est = estimate_memory(model, active_layers=2)
    opt = GrassAdamW(model, offload="inactive", active_layers=2, switch_every=1, probe_steps=0, seed=0)
    for x, y in batches(30):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    assert opt.memory_report().device_state_bytes == est.rows["grass-inactive"]["optimizer_state"]


def test_pinned_memory_is_estimated_as_the_offloader_packs_it():
    from grass_optim.offload import pinned_size
    assert [pinned_size(n) for n in (0, 1, 2, 3, 4096, 4097, 11008 * 4096 * 4)] == [0, 1, 2, 4, 4096, 8192, 2**28]
    model = make_net(d=64, num_layers=6)
    est = estimate_memory(model, active_layers=2).rows["grass-inactive"]
    opt = GrassAdamW(model, offload="inactive", active_layers=2, switch_every=1, probe_steps=0, seed=0)
    for x, y in batches(40, d_in=3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    assert opt._offloader.host_buffer_bytes == est["host_state"]  # every block was parked once
    # Packing depends on the order blocks were first parked; the estimate packs them in block order.
    assert est["pinned"] == opt._offloader._pool.reserved_bytes == 2**21  # one 2 MiB slab holds it all


def test_estimate_memory_per_rank_of_fsdp2_dim0_shards():
    """world_size=N: each rank's dim-0 chunk (torch.chunk: ceil(rows / N) rows, the last ranks fewer
    or none); rows are exact per rank and add up over the ranks to the 1-process rows."""
    model = make_net(d=16, num_layers=4, d_out=3)  # head: 3 rows; embed and blocks: 16
    full = estimate_memory(model, active_layers=2).rows
    ranks = [estimate_memory(model, active_layers=2, world_size=2, rank=r).rows for r in range(2)]
    for name, row in full.items():
        for key in ("weights", "gradients", "optimizer_state", "host_state"):
            assert ranks[0][name][key] + ranks[1][name][key] == row[key], (name, key)
    head = 3 * 16 + 3  # the head's weight and bias: rank 0 holds 2 rows of each, rank 1 one
    assert ranks[0]["adamw"]["weights"] - ranks[1]["adamw"]["weights"] == (2 - 1) * (16 + 1) * 4
    assert ranks[0]["adamw"]["weights"] == (full["adamw"]["weights"] - head * 4) // 2 + 2 * 17 * 4
    # 5 rows over 4 ranks: chunks of 2, 2, 1 and none.
    five = make_net(d=5, num_layers=2, d_out=5)
    per_rank = [estimate_memory(five, active_layers=1, world_size=4, rank=r).rows["adamw"]["weights"]
                for r in range(4)]
    assert sum(per_rank) == estimate_memory(five, active_layers=1).rows["adamw"]["weights"]
    assert per_rank[3] == 0 and per_rank[0] == per_rank[1] == 2 * per_rank[2]
    with pytest.raises(ValueError, match="Invalid world_size: 0"):
        estimate_memory(model, world_size=0)
    with pytest.raises(ValueError, match=r"Invalid rank: 2 \(expected an int in \[0, 1\]\)"):
        estimate_memory(model, world_size=2, rank=2)

"""Offloading against offload off: identical results, states where the mode says, flat host memory.

These run the CPU path of the offloader (synchronous copies into separate host buffers), which is
the same bookkeeping as on an accelerator; tests/test_cuda.py repeats the key ones on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from grass_optim import GrassAdamW
from grass_optim.offload import StateOffloader
from tests.helpers import (
    SCENARIO,
    assert_same_params,
    assert_same_state,
    batches,
    loss_fn,
    make_net,
    run_scenario,
    scenario_model,
    train_scenario,
)

L = 4
OFFLOAD_MODES_ALL = [None, "inactive", "stream"]

@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_offload_is_bit_identical_to_offload_off(mode):
    data = batches(60)
    ref_model, ref_opt, ref_log = run_scenario(None, data)
    model, opt, log = run_scenario(mode, data)
    assert [a for a, _ in log] == [a for a, _ in ref_log]
    assert len({a for a, _ in log}) > 2, "several resamples must happen"
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, ref_model, opt, model)
    assert not model.layers[1].norm.bias.requires_grad
    assert opt.memory_report().bytes_to_host > 0


@pytest.mark.parametrize("offload_mode", ["inactive", "stream"])
def test_offload_is_bit_identical_for_every_base_optimizer(make_base, offload_mode):
    """offload x {AdamW, foreach AdamW, Adam amsgrad, SGD momentum, Adagrad}: the same parameters
    and optimizer state as the same base optimizer with offloading off."""
    data = batches(40)
    runs = []
    for mode in (None, offload_mode):
        model = scenario_model()
        opt = GrassAdamW(model, make_base(model.parameters()), offload=mode, active_layers=2, switch_every=3,
                         update_every=2, probe_steps=2, seed=4)
        runs.append(run_scenario(mode, data, model, opt))
    (ref_model, ref_opt, ref_log), (model, opt, log) = runs
    assert [a for a, _ in log] == [a for a, _ in ref_log] and len({a for a, _ in log}) > 2
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, ref_model, opt, model)
    assert opt.memory_report().bytes_to_host > 0


def _block_bytes(opt, i):
    return sum(v.numel() * v.element_size() for p in opt.partition.block_params[i] for v in opt.state[p].values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("mode", OFFLOAD_MODES_ALL)
def test_states_live_where_the_mode_says(mode):
    _, opt, log = run_scenario(mode, batches(60))
    for step, (active, report) in enumerate(log):
        per_block = report.device_state_bytes_per_block
        assert report.device_state_bytes_outside > 0 or step < SCENARIO["probe_steps"]
        if mode is None:
            assert report.host_state_bytes == 0
        elif step + 1 <= SCENARIO["probe_steps"]:
            assert sum(per_block) == 0
        elif mode == "inactive":
            assert all(per_block[i] == 0 for i in range(L) if i not in active), (step, active, per_block)
        else:  # stream: only the first block of the next update is on the device between steps
            assert all(per_block[i] == 0 for i in range(L) if i != min(active)), (step, active, per_block)
    final = opt.memory_report()
    if mode is not None:  # every byte of a block state is either resident or parked, never both
        movable = sum(_block_bytes(opt, i) for i in range(L)) - final.scalar_state_bytes + \
            sum(v.numel() * v.element_size() for p in opt.partition.outside_params for v in opt.state[p].values()
                if v.dim() == 0)
        assert sum(final.device_state_bytes_per_block) + final.host_state_bytes == movable


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_host_memory_stays_flat_over_a_long_run(mode):
    model = scenario_model()
    opt = GrassAdamW(model, offload=mode, **{**SCENARIO, "switch_every": 1})
    data = batches(2)
    sizes = []
    for _ in range(120):
        train_scenario(model, opt, data, accumulate=1)
        sizes.append(opt.memory_report().host_buffer_bytes)
    # Once every block has been visited the buffers exist; later resamples must reuse them.
    assert sizes[-1] == sizes[len(sizes) // 2] > 0
    assert sizes[-1] <= sum(_block_bytes(opt, i) for i in range(L)), "one host buffer per state tensor at most"


def test_offloader_round_trip_reuses_host_buffers():
    p = torch.nn.Parameter(torch.randn(5, 3))
    st = {"exp_avg": torch.randn(5, 3), "step": torch.tensor(3.0)}
    original = st["exp_avg"].clone()
    off = StateOffloader(torch.device("cpu"))
    off.offload(0, [(p, st)])
    buf = st["exp_avg"]
    assert off.is_parked(p, "exp_avg", buf) and torch.equal(buf, original)
    assert st["step"].dim() == 0 and not off.is_parked(p, "step", st["step"])
    off.prefetch(0, [(p, st)])
    off.wait(0)
    assert not off.is_parked(p, "exp_avg", st["exp_avg"]) and torch.equal(st["exp_avg"], original)
    st["exp_avg"].add_(1)
    off.offload(0, [(p, st)])
    assert st["exp_avg"] is buf and torch.equal(buf, original + 1)
    assert off.bytes_to_host == 2 * 15 * 4 and off.bytes_to_device == 15 * 4
    assert off.host_buffer_bytes == 15 * 4


def test_bad_offload_argument():
    with pytest.raises(ValueError, match=r"Invalid offload: 'gpu' \(expected None, False, True, 'inactive'"):
        GrassAdamW(make_net(), offload="gpu")
    with pytest.raises(TypeError, match="Invalid offload_overlap: 1"):
        GrassAdamW(make_net(), offload=True, offload_overlap=1)
    assert GrassAdamW(make_net(), offload=True).config.offload == "inactive"


def test_wrapped_optimizer_state_is_parked_at_construction():
    model = make_net()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in batches(2):
        base.zero_grad()
        loss_fn(model, x, y).backward()
        base.step()
    opt = GrassAdamW(model, base, offload="inactive", probe_steps=0, active_layers=1)
    r = opt.memory_report()
    on_device = [i for i, b in enumerate(r.device_state_bytes_per_block) if b]
    assert on_device == list(opt.active_layer_indices)


# ----------------------------------------------------------------------------- host buffers: HostPool
def test_host_buffers_are_disjoint_aligned_views_into_power_of_two_slabs():
    from grass_optim.offload import HostPool
    pool = HostPool(pinned=False, min_slab=4096, max_slab=1 << 16, align=512)
    shapes = [((3, 3), torch.float32), ((100,), torch.float64), ((700,), torch.int64), ((5,), torch.bfloat16),
              ((2, 2048), torch.float32), ((20000,), torch.float32), ((0,), torch.float32)]
    bufs = [pool.take(shape, dtype) for shape, dtype in shapes]
    spans = []
    for buf, (shape, dtype) in zip(bufs, shapes, strict=True):
        assert buf.shape == shape and buf.dtype == dtype and buf.device.type == "cpu"
        start = buf.data_ptr()
        assert (buf.storage_offset() * buf.element_size()) % 512 == 0  # aligned within its slab
        spans.append((start, start + buf.numel() * buf.element_size()))
    for i, (a0, a1) in enumerate(spans):  # no two buffers share a byte
        assert all(a1 <= b0 or b1 <= a0 for j, (b0, b1) in enumerate(spans) if j != i and b1 > b0 and a1 > a0)
    for buf in bufs:  # each holds its own values
        buf.fill_(1) if buf.dtype != torch.bfloat16 else buf.fill_(1.0)
    assert all(bool((b == 1).all()) for b in bufs)
    # Slabs are powers of two; the 80 000-byte buffer is over max_slab: its own allocation.
    caps = [sl[0] for sl in pool._slabs]
    assert all(c & (c - 1) == 0 for c in caps) and max(caps) <= 1 << 16
    assert pool.reserved_bytes == sum(caps) + 80000
    dry = HostPool(pinned=False, allocate=False, min_slab=4096, max_slab=1 << 16, align=512)
    assert all(dry.take(shape, dtype) is None for shape, dtype in shapes)
    assert dry.reserved_bytes == pool.reserved_bytes  # the estimate counts what the offloader allocates


def test_host_pool_costs_little_more_than_its_buffers_at_scale():
    """A 7B model's fp32 moments (counted, not allocated): 172 MiB and 64 MiB tensors, 32 blocks, pinned
    one by one would take 1.33x their size; packed, under 1.06x."""
    from grass_optim.offload import HostPool, pinned_size
    pool = HostPool(pinned=True, allocate=False)
    block = [(4096, 4096)] * 4 + [(11008, 4096)] * 3 + [(4096,)] * 2
    total = one_by_one = 0
    for _ in range(32):
        for shape in block:
            for _moment in range(2):
                pool.take(shape, torch.float32)
                nbytes = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
                total += nbytes
                one_by_one += pinned_size(nbytes)
    assert one_by_one / total > 1.3
    assert pool.reserved_bytes / total < 1.06


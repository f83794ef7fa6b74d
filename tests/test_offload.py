"""Offloading against offload off: identical results, states where the mode says, flat host memory.

These run the CPU path of the offloader (synchronous copies into separate host buffers), which is
the same bookkeeping as on an accelerator; tests/test_cuda.py repeats the key ones on CUDA.
"""

from __future__ import annotations

import io

import pytest
import torch

from grass_optim import GrassAdamW, estimate_memory
from grass_optim.offload import StateOffloader
from tests.models import assert_same_params, batches, loss_fn, make_net

L = 4
MODES = [None, "inactive", "stream"]
KW = dict(lr=1e-2, weight_decay=0.1, active_layers=2, switch_every=3, update_every=2, probe_steps=2, seed=4)


def _model():
    model = make_net(num_layers=L)
    model.layers[1].norm.bias.requires_grad_(False)  # frozen by the user: must stay so
    return model


def _train(model, opt, data, sched=None, accumulate=2, log=None):
    """Gradient accumulation over `accumulate` micro-batches per optimizer step, LR scheduler."""
    for start in range(0, len(data), accumulate):
        opt.zero_grad()
        for x, y in data[start:start + accumulate]:
            (loss_fn(model, x, y) / accumulate).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if log is not None:
            log.append((opt.active_layer_indices, opt.memory_report()))


def _run(offload, data, model=None, opt=None):
    model = model or _model()
    opt = opt or GrassAdamW(model, offload=offload, **KW)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    log = []
    _train(model, opt, data, sched, log=log)
    return model, opt, log


def _assert_same_state(opt_a, model_a, opt_b, model_b):
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_offload_is_bit_identical_to_offload_off(mode):
    data = batches(60)
    ref_model, ref_opt, ref_log = _run(None, data)
    model, opt, log = _run(mode, data)
    assert [a for a, _ in log] == [a for a, _ in ref_log]
    assert len({a for a, _ in log}) > 2, "several resamples must happen"
    assert_same_params(ref_model, model)
    _assert_same_state(ref_opt, ref_model, opt, model)
    assert not model.layers[1].norm.bias.requires_grad
    assert opt.memory_report().bytes_to_host > 0


def _block_bytes(opt, i):
    return sum(v.numel() * v.element_size() for p in opt.partition.block_params[i] for v in opt.state[p].values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("mode", MODES)
def test_states_live_where_the_mode_says(mode):
    _, opt, log = _run(mode, batches(60))
    for step, (active, report) in enumerate(log):
        per_block = report.device_state_bytes_per_block
        assert report.device_state_bytes_outside > 0 or step < KW["probe_steps"]
        if mode is None:
            assert report.host_state_bytes == 0
        elif step + 1 <= KW["probe_steps"]:
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


def test_memory_report_accounts_every_state_byte():
    _, opt, _ = _run("inactive", batches(40))
    r = opt.memory_report()
    every = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    assert r.device_state_bytes + r.host_state_bytes + r.scalar_state_bytes == every
    assert r.host_state_bytes > 0 and r.pinned_bytes == 0  # no accelerator here: nothing pinned
    assert r.as_dict()["bytes_to_device"] == r.bytes_to_device


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_host_memory_stays_flat_over_a_long_run(mode):
    model = _model()
    opt = GrassAdamW(model, offload=mode, **{**KW, "switch_every": 1})
    data = batches(2)
    sizes = []
    for _ in range(120):
        _train(model, opt, data, accumulate=1)
        sizes.append(opt.memory_report().host_buffer_bytes)
    # Once every block has been visited the buffers exist; later resamples must reuse them.
    assert sizes[-1] == sizes[len(sizes) // 2] > 0
    assert sizes[-1] <= sum(_block_bytes(opt, i) for i in range(L)), "one host buffer per state tensor at most"


def _checkpoint(opt, model):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(("first", "second"), [("inactive", "inactive"), ("stream", "stream"),
                                               ("inactive", None), (None, "stream"), ("stream", "inactive")])
def test_resume_across_offload_modes_is_bit_identical(first, second):
    data = batches(60)
    ref_model, ref_opt = _model(), None
    ref_opt = GrassAdamW(ref_model, **KW)
    ref_log: list = []
    _train(ref_model, ref_opt, data, log=ref_log)

    model = _model()
    opt = GrassAdamW(model, offload=first, **KW)
    log: list = []
    _train(model, opt, data[:26], log=log)
    ckpt = _checkpoint(opt, model)
    for st in ckpt["opt"]["state"].values():
        for v in st.values():
            assert not isinstance(v, torch.Tensor) or v.device.type == "cpu"
    model2 = make_net(seed=7, num_layers=L)  # other weights: everything must come from the checkpoint
    model2.layers[1].norm.bias.requires_grad_(False)
    opt2 = GrassAdamW(model2, offload=second, **{**KW, "seed": 99})
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    if second == "inactive":
        per_block = opt2.memory_report().device_state_bytes_per_block
        assert all(per_block[i] == 0 for i in range(L) if i not in opt2.active_layer_indices)
    _train(model2, opt2, data[26:], log=log)
    assert [a for a, _ in log] == [a for a, _ in ref_log]
    assert_same_params(ref_model, model2)
    _assert_same_state(ref_opt, ref_model, opt2, model2)


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


def test_estimate_memory_rows_and_warning(caplog):
    model = make_net(d=16, num_layers=8)
    est = estimate_memory(model, active_layers=2)
    block = sum(p.numel() for p in model.layers[0].parameters()) * 4
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers.")) * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    assert est.rows["adamw"] == {"weights": total, "gradients": total, "optimizer_state": 2 * total,
                                 "total": 4 * total}
    assert est.rows["grass-inactive"]["optimizer_state"] == 2 * (2 * block + outside)
    assert est.rows["grass-inactive"]["gradients"] == 2 * block + outside
    assert est.rows["grass"]["optimizer_state"] == 2 * total
    assert est.rows["grass-stream"]["optimizer_state"] == 2 * (2 * block + outside)
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


# ----------------------------------------------------------------------------- per-step history
@pytest.mark.parametrize("mode", MODES)
def test_history_steps_records_state_bytes_and_copies_of_every_step(mode):
    data = batches(24, seed=3)
    model_ref, opt_ref, _ = _run(mode, data)
    model = _model()
    opt = GrassAdamW(model, offload=mode, history="steps", **KW)
    model, opt, log = _run(mode, data, model, opt)
    assert_same_params(model, model_ref)  # recording changes nothing
    _assert_same_state(opt, model, opt_ref, model_ref)
    steps = opt.history["steps"]
    assert [s["step"] for s in steps] == list(range(1, len(data) // 2 + 1))
    for s, (_, rep) in zip(steps, log, strict=True):
        assert s["device_state_bytes"] == rep.device_state_bytes
        assert s["host_state_bytes"] == rep.host_state_bytes
        for direction in ("to_host", "to_device"):
            moved, ms = s[f"bytes_{direction}"], s[f"copy_ms_{direction}"]
            assert ms >= 0.0 and (ms == 0.0 if moved == 0 else True)
    final = opt.memory_report()
    assert sum(s["bytes_to_host"] for s in steps) == final.bytes_to_host
    assert sum(s["bytes_to_device"] for s in steps) == final.bytes_to_device
    if mode is None:
        assert final.bytes_to_host == final.bytes_to_device == 0
    else:
        assert final.bytes_to_host > 0 and final.bytes_to_device > 0
        assert any(s["copy_ms_to_device"] > 0 for s in steps)


def test_history_steps_is_plain_data_and_survives_a_checkpoint():
    data = batches(16, seed=5)
    model = _model()
    opt = GrassAdamW(model, offload="inactive", history="steps", **KW)
    _train(model, opt, data[:8])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = GrassAdamW(model2, offload="inactive", history="steps", **KW)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.history["steps"] == opt.history["steps"]
    _train(model, opt, data[8:])
    _train(model2, opt2, data[8:])
    assert [s["step"] for s in opt2.history["steps"]] == list(range(1, 9))
    for a, b in zip(opt.history["steps"], opt2.history["steps"], strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("copy_ms")} == \
               {k: v for k, v in b.items() if not k.startswith("copy_ms")}
    assert "steps" not in GrassAdamW(_model(), **KW).history  # only when asked for


@pytest.mark.parametrize("value, error", [("step", ValueError), ("events", ValueError), (1, TypeError),
                                          (None, TypeError)])
def test_history_rejects_other_values(value, error):
    with pytest.raises(error, match=r"Invalid history: .* \(expected True, False or 'steps'\)"):
        GrassAdamW(_model(), history=value, **KW)

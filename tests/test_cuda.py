"""CUDA checks of the offload pipeline and the no-synchronisation promise (skipped without CUDA).

Designed to expose races: very wide, thin blocks so the copies dominate the compute, redraws every
couple of steps, and no synchronisation in the training loop. The reference and the offloaded run
are executed one after the other, never interleaved, so a missing wait cannot be hidden by the
other run's synchronisation. Run with ``pytest -m cuda tests/test_cuda.py`` (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grass_optim import GrassAdamW

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

WIDE, THIN, BLOCKS = 8192, 16, 8


class WideBlock(nn.Module):
    """2 x WIDE x THIN weights (4 MiB of AdamW state) for a few hundred FLOPs per token."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(WIDE, THIN)
        self.up = nn.Linear(THIN, WIDE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.tanh(self.down(x)))


class WideNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(THIN, WIDE)
        self.layers = nn.ModuleList(WideBlock() for _ in range(BLOCKS))
        self.out = nn.Linear(WIDE, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return self.out(h)


def _data(steps: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(4, THIN, device="cuda", generator=g), torch.randn(4, 1, device="cuda", generator=g))
            for _ in range(steps)]


def _run(offload, steps=60, overlap=True, accumulate=2):
    torch.manual_seed(0)
    model = WideNet().cuda()
    model.layers[3].down.bias.requires_grad_(False)  # frozen by the user
    opt = GrassAdamW(model, lr=1e-3, active_layers=3, switch_every=2, update_every=3, probe_steps=3,
                     offload=offload, offload_overlap=overlap, seed=0)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=steps)
    schedule = []
    for x, y in _data(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            (((model(x) - y) ** 2).mean() / accumulate).backward()
        opt.step()
        sched.step()
        schedule.append(opt.active_layer_indices)
    torch.cuda.synchronize()
    return model, opt, schedule


@pytest.mark.parametrize(("mode", "overlap"), [("inactive", True), ("stream", True), ("stream", False)])
def test_offload_matches_offload_off_bit_for_bit(mode, overlap):
    ref_model, ref_opt, ref_schedule = _run(None)
    ref = [p.detach().cpu() for p in ref_model.parameters()]
    ref_state = [{k: v.cpu() for k, v in ref_opt.state[p].items()} for p in ref_model.parameters()]
    del ref_model, ref_opt
    model, opt, schedule = _run(mode, overlap=overlap)
    assert schedule == ref_schedule
    for a, b in zip(ref, model.parameters(), strict=True):
        assert torch.equal(a, b.detach().cpu())
    opt.state_dict()  # synchronises the host with every copy
    for st_ref, p in zip(ref_state, model.parameters(), strict=True):
        assert st_ref.keys() == opt.state[p].keys()
        for k, v in st_ref.items():
            assert torch.equal(v, opt.state[p][k].cpu()), k


def test_inactive_state_is_pinned_on_the_host_and_off_the_device():
    model, opt, _ = _run("inactive", steps=20)
    r = opt.memory_report()
    assert r.pinned_bytes > 0 and r.host_state_bytes > 0
    active = set(opt.active_layer_indices)
    for i, block in enumerate(model.layers):
        for p in block.parameters():
            for v in opt.state[p].values():
                if v.dim() == 0:
                    continue
                if i in active:
                    assert v.is_cuda
                else:
                    assert v.device.type == "cpu" and v.is_pinned()


def test_stream_keeps_at_most_one_block_resident_between_steps():
    _, opt, _ = _run("stream", steps=20)
    per_block = opt.memory_report().device_state_bytes_per_block
    assert sum(1 for b in per_block if b) <= 1


def test_offload_frees_device_memory():
    sizes = {}
    for mode in (None, "inactive"):
        torch.cuda.empty_cache()
        model, opt, _ = _run(mode, steps=40)
        sizes[mode] = opt.memory_report().device_state_bytes
        del model, opt
    assert sizes["inactive"] < sizes[None]


@pytest.mark.parametrize("history", [True, "steps"])
@pytest.mark.parametrize("mode", [None, "inactive", "stream"])
def test_no_host_synchronisation_between_redraws(mode, history):
    """step() must not wait for the device except on steps that refresh scores or redraw (per-step
    history included: its copy times stay events until the history is read)."""
    torch.manual_seed(0)
    model = WideNet().cuda()
    opt = GrassAdamW(model, active_layers=2, switch_every=10, update_every=10, probe_steps=0,
                     offload=mode, seed=0, history=history)
    data = _data(9)
    try:
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if i >= 1:  # the first step builds per-set caches
                torch.cuda.set_sync_debug_mode("error")
            opt.step()
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_resume_on_cuda_puts_inactive_state_in_pinned_memory():
    model, opt, _ = _run("inactive", steps=11)
    sd = opt.state_dict()
    for st in sd["state"].values():
        assert all(v.device.type == "cpu" for v in st.values() if isinstance(v, torch.Tensor))
    torch.manual_seed(1)
    model2 = WideNet().cuda()
    model2.layers[3].down.bias.requires_grad_(False)
    opt2 = GrassAdamW(model2, lr=1e-3, active_layers=3, switch_every=2, update_every=3, probe_steps=3,
                      offload="inactive", seed=5)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    active = set(opt2.active_layer_indices)
    for i, block in enumerate(model2.layers):
        for p in block.parameters():
            for v in opt2.state[p].values():
                if v.dim() > 0:
                    assert v.is_cuda == (i in active)
                    assert v.is_cuda or v.is_pinned()


def test_low_memory_probing_never_holds_all_gradients():
    peaks = {}
    for low in (False, True):
        torch.manual_seed(0)
        model = WideNet().cuda()
        grads_bytes = sum(p.numel() * p.element_size() for p in model.layers.parameters())
        opt = GrassAdamW(model, probe_steps=3, probe_low_memory=low, seed=0)
        x, y = _data(1)[0]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ((model(x) - y) ** 2).mean().backward()
        peaks[low] = torch.cuda.max_memory_allocated() - base
        opt.step()
        opt.zero_grad()
        del opt, model
    assert peaks[True] < peaks[False] - grads_bytes // 2


@pytest.mark.parametrize("mode", [None, "inactive"])
def test_model_moved_to_cuda_after_the_optimizer_was_built(mode):
    """Trainers often call model.to(device) after the optimizer exists: the bookkeeping follows."""
    torch.manual_seed(0)
    ref = WideNet().cuda()
    ref_opt = GrassAdamW(ref, active_layers=2, switch_every=3, probe_steps=2, offload=mode, seed=0)
    torch.manual_seed(0)
    model = WideNet()
    opt = GrassAdamW(model, active_layers=2, switch_every=3, probe_steps=2, offload=mode, seed=0)
    model.cuda()
    for m, o in ((ref, ref_opt), (model, opt)):
        for x, y in _data(10):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    torch.cuda.synchronize()
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.schedule.device.type == "cuda"


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_history_steps_times_the_copies_with_events(mode):
    torch.manual_seed(0)
    model = WideNet().cuda()
    opt = GrassAdamW(model, lr=1e-3, active_layers=2, switch_every=2, probe_steps=0, offload=mode, seed=0,
                     history="steps")
    for x, y in _data(12):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    steps = opt.history["steps"]
    rep = opt.memory_report()
    assert len(steps) == 12
    assert sum(s["bytes_to_host"] for s in steps) == rep.bytes_to_host > 0
    assert sum(s["bytes_to_device"] for s in steps) == rep.bytes_to_device > 0
    for s in steps:
        for direction in ("to_host", "to_device"):
            assert (s[f"copy_ms_{direction}"] > 0) == (s[f"bytes_{direction}"] > 0), s
    assert opt.history["steps"] == steps  # resolved once: a second read is the same plain data

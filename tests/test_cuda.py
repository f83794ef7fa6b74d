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
from tests.helpers import round_trip

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


# ----------------------------------------------------------------------------- stall injection
# Each test below makes one stream late on purpose (torch.cuda._sleep), so that a missing wait or
# record_stream shows as a wrong value instead of hiding behind copies that finish in microseconds.
# Blocks hold 64 MiB of weights (128 MiB of AdamW state); prefetch targets are filled with NaN when
# allocated (on the compute stream, as the real allocation), so reading one before its copy lands
# poisons the run. benchmarks/cuda_mutations.py removes each guarded line and checks that its test
# fails: MUTATIONS lists (test, file, the line).
MUTATIONS = [
    ("test_update_waits_for_a_stalled_prefetch", "grass_optim/offload.py",
     "event.wait(torch.accelerator.current_stream(self.device))"),
    ("test_prefetch_waits_for_compute_before_copying_into_fresh_memory", "grass_optim/offload.py",
     "self._to_device.wait_stream("),
    ("test_write_back_waits_for_a_stalled_update", "grass_optim/offload.py", "self._to_host.wait_stream("),
    ("test_write_back_waits_for_compute_at_a_redraw", "grass_optim/offload.py", "self._to_host.wait_stream("),
    ("test_write_back_source_is_not_reused_before_its_stalled_copy_reads_it", "grass_optim/offload.py",
     "v.record_stream(self._to_host)"),
    ("test_prefetch_waits_for_the_stalled_write_back_of_the_same_block", "grass_optim/offload.py",
     "self._stream_waits_for_unit(self._to_device, unit)"),
    ("test_write_back_waits_for_the_stalled_prefetch_of_the_same_block", "grass_optim/offload.py",
     "self._stream_waits_for_unit(self._to_host, unit)"),
    ("test_prefetch_target_dropped_with_its_copy_in_flight_is_not_reused", "grass_optim/offload.py",
     "d.record_stream(self._to_device)"),
]

BIG = 4096  # Linear(BIG, BIG): 64 MiB of fp32 weights, 128 MiB of AdamW state per block
STALL = 400_000_000  # cycles of torch.cuda._sleep: ~0.2 s, far longer than any copy or step here


class BigNet(nn.Module):
    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(BIG, BIG, bias=False) for _ in range(blocks))
        self.out = nn.Linear(BIG, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x)) * 0.1
        return self.out(x)


def _big_data(steps: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(8, BIG, device="cuda", generator=g), torch.randn(8, 1, device="cuda", generator=g))
            for _ in range(steps)]


def _stall(stream=None) -> None:
    """Keep ``stream`` (default: the current one) busy for a while from now on."""
    if stream is None:
        torch.cuda._sleep(STALL)
    else:
        with stream:
            torch.cuda._sleep(STALL)


def _poison_prefetch_targets(opt) -> None:
    """Prefetch targets start as NaN (filled on the compute stream, where they are allocated)."""
    off = opt._offloader
    off._empty_on_device = lambda like: torch.full_like(like, float("nan"), device=off.device)


def _big_run(mode, steps=8, base=None, setup=None, blocks=4, **kwargs):
    torch.manual_seed(0)
    model = BigNet(blocks).cuda()
    settings = dict(active_layers=2, switch_every=2, probe_steps=0, seed=0)
    settings.update(kwargs)
    if base is None:
        opt = GrassAdamW(model, lr=1e-3, offload=mode, **settings)
    else:
        opt = GrassAdamW(model, base(model.parameters()), offload=mode, **settings)
    if setup is not None:
        setup(opt)
    for x, y in _big_data(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    opt.synchronize()
    torch.cuda.synchronize()
    return model, opt


def _assert_same_run(ref, run):
    (ref_model, ref_opt), (model, opt) = ref, run
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), "parameters differ from the run without stalls"
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        for k, v in ref_opt.state[p].items():
            assert torch.equal(v.cpu(), opt.state[q][k].cpu()), k


def _wrap(obj, name, before=None, after=None):
    real = getattr(obj, name)

    def call(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        out = real(*args, **kwargs)
        if after is not None:
            after(*args, **kwargs)
        return out
    setattr(obj, name, call)


def _count_moving_prefetches(opt, moved):
    """Record, for every prefetch that moves something, the step it happens in."""
    off = opt._offloader
    real = off.prefetch

    def prefetch(unit, states):
        before = off.bytes_to_device
        real(unit, states)
        if off.bytes_to_device > before:
            moved.append(opt.num_steps)
    off.prefetch = prefetch


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_update_waits_for_a_stalled_prefetch(mode):
    """Catches a missing ``event.wait`` in ``StateOffloader.wait``: the update would read NaN."""
    moved = []

    def setup(opt):
        _poison_prefetch_targets(opt)
        _wrap(opt._offloader, "prefetch", before=lambda unit, states: _stall(opt._offloader._to_device))
        _count_moving_prefetches(opt, moved)
    ref = _big_run(None, switch_every=1)
    run = _big_run(mode, setup=setup, switch_every=1)
    assert sum(1 for step in moved if step < 8) >= 2, moved  # prefetches that an update then reads
    _assert_same_run(ref, run)


def test_prefetch_waits_for_compute_before_copying_into_fresh_memory():
    """Catches a missing ``_to_device.wait_stream(compute)``: the copy would land before the NaN fill
    queued behind the stalled compute stream, and the update would read NaN."""
    moved = []

    def setup(opt):
        _poison_prefetch_targets(opt)
        _wrap(opt._offloader, "prefetch", before=lambda unit, states: _stall())
        _count_moving_prefetches(opt, moved)
    ref = _big_run(None, switch_every=1)
    run = _big_run("inactive", setup=setup, switch_every=1)
    assert sum(1 for step in moved if step < 8) >= 2, moved
    _assert_same_run(ref, run)


class _StalledAdamW(torch.optim.AdamW):
    """AdamW whose update starts late on the compute stream."""

    def step(self, closure=None):
        _stall()
        return super().step(closure)


def test_write_back_waits_for_a_stalled_update():
    """Catches a missing ``_to_host.wait_stream(compute)`` in "stream", where each block is written
    back right after its (stalled) update: the write-back would copy the moments from before it."""
    def base(params):
        return _StalledAdamW(params, lr=1e-3)
    ref = _big_run(None, base=lambda params: torch.optim.AdamW(params, lr=1e-3))
    _assert_same_run(ref, _big_run("stream", base=base))


def test_write_back_waits_for_compute_at_a_redraw():
    """The same rule in "inactive", where write-backs happen at a redraw, after the host already
    waited for the device (reading the scores): so the hazard is made after that wait. Before each
    write-back, compute overwrites the block's state with NaN (the host waits for that), then,
    behind a stall, puts the values back; a write-back that does not wait for compute copies NaN."""
    def setup(opt):
        off = opt._offloader
        real = off.offload

        def offload(unit, states):
            states = list(states)
            held = [(v, v.clone()) for _, st in states for v in st.values() if v.dim() > 0 and v.is_cuda]
            for v, _ in held:
                v.fill_(float("nan"))
            torch.cuda.current_stream().synchronize()  # the NaN is in place
            _stall()
            for v, saved in held:
                v.copy_(saved)  # queued behind the stall on the compute stream
            real(unit, states)
        off.offload = offload
    ref = _big_run(None, switch_every=1)
    _assert_same_run(ref, _big_run("inactive", setup=setup, switch_every=1))


def test_write_back_source_is_not_reused_before_its_stalled_copy_reads_it():
    """Catches a missing ``v.record_stream(_to_host)``: right after a write-back is issued (its copy
    stalled), compute allocates tensors of the same sizes and fills them with NaN; without
    record_stream they would take the memory the copy has not read yet."""
    def setup(opt):
        off = opt._offloader
        real_offload = off.offload

        def offload(unit, states):
            states = list(states)
            sources = [v for _, st in states for v in st.values() if v.dim() > 0 and v.is_cuda]
            pointers = {v.data_ptr() for v in sources}
            like = [(v.shape, v.dtype) for v in sources]
            del sources
            _stall(off._to_host)
            real_offload(unit, states)
            # Take free blocks of these sizes on the compute stream, and overwrite them, until the
            # sources' memory has been handed out (without record_stream it is free at once) or 32
            # rounds show it is not.
            decoys: list[torch.Tensor] = []
            for _ in range(32):
                decoys += [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in like]
                if pointers <= {d.data_ptr() for d in decoys}:
                    break
            del decoys
        off.offload = offload
    ref = _big_run(None)
    _assert_same_run(ref, _big_run("inactive", setup=setup))


def test_prefetch_waits_for_the_stalled_write_back_of_the_same_block():
    """Catches a missing wait on the block's write-back before its prefetch: with ``switch_every=1``
    in "stream", a block written back in one step is the first of the next, prefetched at the end of
    the step from host buffers the stalled write-back has not filled yet."""
    def setup(opt):
        _wrap(opt._offloader, "offload", before=lambda unit, states: _stall(opt._offloader._to_host))
    ref = _big_run(None, switch_every=1, active_layers=1, blocks=2)
    _assert_same_run(ref, _big_run("stream", setup=setup, switch_every=1, active_layers=1, blocks=2))


def test_write_back_waits_for_the_stalled_prefetch_of_the_same_block():
    """Catches a missing wait on the block's prefetch before its write-back (no update in between, as
    when a failed step's placement is put back): the write-back would copy the NaN target into the
    very host buffers the stalled prefetch reads."""
    from grass_optim.offload import StateOffloader
    off = StateOffloader(torch.device("cuda"))
    off._empty_on_device = lambda like: torch.full_like(like, float("nan"), device="cuda")
    p = torch.zeros(BIG, BIG, device="cuda")
    value = torch.randn(BIG, BIG, device="cuda")
    st = {"exp_avg": value.clone()}
    off.offload(0, [(p, st)])
    _stall(off._to_device)
    off.prefetch(0, [(p, st)])
    off.offload(0, [(p, st)])
    off.synchronize()
    assert torch.equal(st["exp_avg"], value.cpu())


def test_prefetch_target_dropped_with_its_copy_in_flight_is_not_reused():
    """Catches a missing ``d.record_stream(_to_device)``: the optimizer is deleted while a stalled
    prefetch is in flight; tensors compute then allocates and fills must not be overwritten by it."""
    import gc
    model, opt = _big_run("inactive", steps=8, switch_every=1)
    parked = [i for i in range(opt.num_layers) if i not in opt._resident() and opt._block_states(i)]
    assert parked, "no parked block with state to prefetch"
    off = opt._offloader
    _stall(off._to_device)
    off.prefetch(parked[0], opt._block_states(parked[0]))  # as a redraw would, at the end of a step
    shapes = [(v.shape, v.dtype) for _, st in opt._block_states(parked[0]) for v in st.values() if v.dim() > 0]
    assert shapes and all(v.is_cuda for _, st in opt._block_states(parked[0]) for v in st.values() if v.dim() > 0)
    del opt, off
    gc.collect()
    decoys = [torch.full(shape, 7.0, dtype=dtype, device="cuda") for shape, dtype in shapes * 2]
    torch.cuda.synchronize()
    assert all(bool((d == 7.0).all()) for d in decoys), "a copy wrote into memory handed to compute"


class _CountingEvent(torch.Event):
    synchronized = 0

    def synchronize(self):
        _CountingEvent.synchronized += 1
        return super().synchronize()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_no_event_synchronisation_in_steps_across_redraws(monkeypatch, mode, overlap):
    """Steps wait on events on the device, never on the host, across redraws that move state (the
    sync-debug test above cannot see an event synchronisation); ``offload_overlap=False`` included.
    After every block's host buffers exist, no step allocates pinned memory either."""
    monkeypatch.setattr(torch, "Event", _CountingEvent)
    torch.manual_seed(0)
    model = WideNet().cuda()
    opt = GrassAdamW(model, active_layers=2, switch_every=2, probe_steps=0, offload=mode, offload_overlap=overlap,
                     seed=0)
    data = _data(120)
    n = 0
    while len({pid for pid, _ in opt._offloader._host}) < sum(1 for _ in model.layers.parameters()):
        assert n < 100, "every block should have been parked by now"
        x, y = data[n]
        n += 1
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    buffers = dict(opt._offloader._host)
    moved = opt.memory_report().bytes_to_host
    _CountingEvent.synchronized = 0
    for x, y in data[n:n + 8]:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert _CountingEvent.synchronized == 0
    assert opt.memory_report().bytes_to_host > moved  # redraws moved state
    assert opt._offloader._host == buffers  # no new pinned buffer


# ----------------------------------------------------------------------------- failures and moves
def test_a_stream_step_that_runs_out_of_memory_mid_update_then_retried_matches_an_uninterrupted_run():
    """The base raises on the second active block (the outside and the first are updated, the first
    written back, the second prefetched): the retry skips what was applied, and no update ever sees
    host state (that would be a device mismatch here)."""
    class Failing(torch.optim.AdamW):
        armed = False

        def step(self, closure=None):
            if Failing.armed and len({g["grass_block"] for g in self.param_groups} - {None}) == 1 \
                    and self.param_groups[0]["grass_block"] == max(opt.active_layer_indices):
                Failing.armed = False
                raise torch.OutOfMemoryError("injected")
            return super().step(closure)

    ref = _big_run(None, steps=6, active_layers=3)
    torch.manual_seed(0)
    model = BigNet().cuda()
    opt = GrassAdamW(model, Failing(model.parameters(), lr=1e-3), active_layers=3, switch_every=2, probe_steps=0,
                     seed=0, offload="stream")
    for i, (x, y) in enumerate(_big_data(6)):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if i == 3:
            Failing.armed = True
            with pytest.raises(torch.OutOfMemoryError):
                opt.step()
        opt.step()
    opt.synchronize()
    _assert_same_run(ref, (model, opt))


@pytest.mark.parametrize("mode", [None, "inactive", "stream"])
def test_built_on_cpu_moved_to_cuda_then_loaded_resumes_exactly(mode):
    """Accelerate's order: the optimizer is built on the CPU model, prepare() moves the model, then
    load_state() loads a checkpoint: the loaded state goes to the device (or pinned buffers)."""
    data = _data(12)

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    torch.manual_seed(0)
    ref = WideNet().cuda()
    ref_opt = GrassAdamW(ref, active_layers=2, switch_every=3, probe_steps=2, offload=mode, seed=0)
    train(ref, ref_opt, data[:6])
    saved = round_trip({"model": ref.state_dict(), "opt": ref_opt.state_dict()})  # a copy, as a file would be
    train(ref, ref_opt, data[6:])
    model = WideNet()
    opt = GrassAdamW(model, active_layers=2, switch_every=3, probe_steps=2, offload=mode, seed=5)
    model.cuda()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, data[6:])
    torch.cuda.synchronize()
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.schedule.device.type == "cuda"


def test_pinned_bytes_are_what_the_pinned_allocator_holds():
    stats = getattr(torch.cuda, "host_memory_stats", None)
    empty = getattr(torch._C, "_host_emptyCache", None)
    if stats is None or empty is None:
        pytest.skip("this torch has no host_memory_stats / _host_emptyCache")
    import gc
    gc.collect()  # offloaders of earlier tests held in reference cycles give their pinned slabs back now
    torch.cuda.synchronize()
    empty()
    before = stats().get("allocated_bytes.current", 0)
    model, opt = _big_run("inactive", steps=6, blocks=3)
    torch.cuda.synchronize()
    empty()  # pinned blocks freed meanwhile (small index copies) go back: only live buffers remain
    held = stats().get("allocated_bytes.current", 0) - before
    report = opt.memory_report()
    assert report.pinned_bytes == held
    assert report.pinned_bytes >= report.host_buffer_bytes



# ----------------------------------------------------------------------------- FSDP2 on one GPU
@pytest.fixture
def one_rank_group(monkeypatch):
    """A 1-process NCCL group: FSDP2 shards over one rank (parameters and state are DTensors)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fsdp_wide(offload):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = WideNet().cuda()
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model, GrassAdamW(model, lr=1e-3, active_layers=2, switch_every=2, probe_steps=2, offload=offload, seed=0)


def _fsdp_train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    torch.cuda.synchronize()


def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


@pytest.mark.parametrize("mode", ["inactive", "stream"])
def test_fsdp2_offload_matches_offload_off_and_parks_host_shards(one_rank_group, mode):
    data = _data(12)
    ref, ref_opt = _fsdp_wide(None)
    _fsdp_train(ref, ref_opt, data)
    model, opt = _fsdp_wide(mode)
    _fsdp_train(model, opt, data)
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(_local(a), _local(b))
    parked = [v for p, st in opt.state.items() for v in st.values()
              if v.dim() > 0 and _local(v).device.type == "cpu"]
    assert parked and all(_local(v).is_pinned() for v in parked)
    assert all(type(v).__name__ == "DTensor" for v in parked)
    report = opt.memory_report()
    assert report.host_state_bytes == sum(_local(v).numel() * _local(v).element_size() for v in parked)


def test_fsdp2_offload_resumes_from_dcp_without_parked_state_on_the_device(one_rank_group, tmp_path):
    """load_checkpoint reads the parked blocks' shards into host templates: the device's peak while
    loading stays well under what all the state would take, and the run continues bit-identically."""
    from grass_optim import load_checkpoint, save_checkpoint

    data = _data(12)
    ref, ref_opt = _fsdp_wide("inactive")
    _fsdp_train(ref, ref_opt, data)
    model, opt = _fsdp_wide("inactive")
    _fsdp_train(model, opt, data[:7])
    save_checkpoint(tmp_path / "ckpt", model, opt)
    saved = opt.memory_report()
    del model, opt
    model, opt = _fsdp_wide("inactive")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    load_checkpoint(tmp_path / "ckpt", model, opt)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    loaded = opt.memory_report()
    assert (loaded.device_state_bytes, loaded.host_state_bytes) == (saved.device_state_bytes, saved.host_state_bytes)
    assert saved.host_state_bytes > 2 * saved.device_state_bytes  # 6 of 8 blocks parked
    assert peak < loaded.device_state_bytes + loaded.host_state_bytes // 2, (peak, loaded)
    _fsdp_train(model, opt, data[7:])
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(_local(a), _local(b))

"""GrassAdamW inside a real PyTorch training loop, each feature checked against a reference run:
LR schedulers, AMP autocast + GradScaler, gradient accumulation, gradient clipping, torch.compile and
activation checkpointing. See docs/guides/training_loop.md for the user-facing version."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.optim import lr_scheduler as S

from grass_optim import GrassAdamW
from tests.helpers import (
    RecordingSampler,
    TinyNet,
    assert_same_params,
    batches,
    block_of,
    changed_params,
    decay_groups,
    loss_fn,
    make_net,
    snapshot,
)

L = 4  # blocks in the default test net


# ----------------------------------------------------------------------------- helpers
def _per_param(opt: torch.optim.Optimizer, model: nn.Module, key: str) -> list:
    """``group[key]`` of the group holding each parameter, in ``model.parameters()`` order."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    return [group_of[id(p)][key] for p in model.parameters()]


def _decay_groups(model: nn.Module) -> list[dict]:
    """Decay / no-decay groups with different learning rates, so per-group schedules differ."""
    return decay_groups(model, decay_lr=1e-2, no_decay_lr=5e-3)


# ----------------------------------------------------------------------------- LR schedulers
N_SCHED = 30
_PLATEAU_METRICS = [1.0 / (1 + i // 7) for i in range(N_SCHED)]  # flat for a while, then better

# (id, scheduler from an optimizer, needs the metric in step()).
SCHEDULERS = [
    ("StepLR", lambda o: S.StepLR(o, step_size=7, gamma=0.5), False),
    ("MultiStepLR", lambda o: S.MultiStepLR(o, milestones=[5, 12, 20], gamma=0.3), False),
    ("ExponentialLR", lambda o: S.ExponentialLR(o, gamma=0.9), False),
    ("LinearLR", lambda o: S.LinearLR(o, start_factor=0.1, total_iters=8), False),
    ("PolynomialLR", lambda o: S.PolynomialLR(o, total_iters=N_SCHED, power=2.0), False),
    ("CosineAnnealingLR", lambda o: S.CosineAnnealingLR(o, T_max=N_SCHED, eta_min=1e-4), False),
    ("CosineAnnealingWarmRestarts", lambda o: S.CosineAnnealingWarmRestarts(o, T_0=6, T_mult=2), False),
    ("LambdaLR", lambda o: S.LambdaLR(o, lambda s: 1.0 / (1.0 + 0.2 * s)), False),
    # One lambda per group: the list follows opt.param_groups (split per block), not the user's groups.
    ("LambdaLR-per-group",
     lambda o: S.LambdaLR(o, [(lambda s: 0.95 ** s) if g["weight_decay"] else (lambda s: 1.0 / (1 + s))
                              for g in o.param_groups]), False),
    # cycle_momentum=True: AdamW has no "momentum", so both read and cycle betas[0] of every group.
    ("OneCycleLR", lambda o: S.OneCycleLR(o, max_lr=5e-2, total_steps=N_SCHED, cycle_momentum=True), False),
    ("CyclicLR", lambda o: S.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=4, cycle_momentum=True), False),
    ("SequentialLR-warmup-cosine",
     lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=5),
                                  S.CosineAnnealingLR(o, T_max=N_SCHED - 5, eta_min=1e-4)], milestones=[5]),
     False),
    ("ChainedScheduler",
     lambda o: S.ChainedScheduler([S.ConstantLR(o, factor=0.5, total_iters=4), S.ExponentialLR(o, gamma=0.95)]),
     False),
    ("ReduceLROnPlateau", lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1), True),
]


def _run_scheduled(model, opt, make_sched, needs_metric, data, before_step=None):
    """Train with a scheduler stepped after each optimizer step; return the lr and betas of each
    parameter's group after every step. ``before_step()`` runs before each step, if given."""
    sched = make_sched(opt)
    history = [(_per_param(opt, model, "lr"), _per_param(opt, model, "betas"))]
    for i, (x, y) in enumerate(data):
        if before_step is not None:
            before_step()
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        if needs_metric:
            sched.step(_PLATEAU_METRICS[i])
        else:
            sched.step()
        history.append((_per_param(opt, model, "lr"), _per_param(opt, model, "betas")))
    return history


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. "lr_scheduler.step() before optimizer.step()"
@pytest.mark.parametrize("case", SCHEDULERS, ids=[c[0] for c in SCHEDULERS])
def test_scheduler_all_blocks_active_is_bit_identical_to_adamw(case):
    _, make_sched, needs_metric = case
    ref, model = make_net(), make_net()
    ref_opt = torch.optim.AdamW(_decay_groups(ref))
    opt = GrassAdamW(model, torch.optim.AdamW(_decay_groups(model)), active_layers=L, probe_steps=0)
    data = batches(N_SCHED)
    ref_hist = _run_scheduled(ref, ref_opt, make_sched, needs_metric, data)
    hist = _run_scheduled(model, opt, make_sched, needs_metric, data)
    assert hist == ref_hist, "lr/betas history differs from torch.optim.AdamW's"
    assert len({lr for lrs, _ in hist for lr in lrs}) > 2, "the schedule should actually change the lr"
    assert_same_params(ref, model)


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("case", SCHEDULERS, ids=[c[0] for c in SCHEDULERS])
def test_scheduler_drives_every_group_including_inactive_blocks(case):
    """active_layers < L, with probing: the lr (and betas) of every group, frozen blocks' included,
    follow the schedule step by step exactly as they do on a plain AdamW."""
    _, make_sched, needs_metric = case
    ref, model = make_net(), make_net()
    ref_opt = torch.optim.AdamW(_decay_groups(ref))
    opt = GrassAdamW(model, torch.optim.AdamW(_decay_groups(model)), active_layers=1, switch_every=4,
                     probe_steps=3, seed=0)
    data = batches(N_SCHED)
    inactive_seen = set()
    hist = _run_scheduled(model, opt, make_sched, needs_metric, data,
                          before_step=lambda: inactive_seen.update(set(range(L)) - set(opt.active_layer_indices)))
    ref_hist = _run_scheduled(ref, ref_opt, make_sched, needs_metric, data)
    assert hist == ref_hist
    assert inactive_seen == set(range(L)), "every block should have been inactive at some point"


def test_scheduler_and_optimizer_resume_bit_identically():
    """Save optimizer + SequentialLR mid-run (after probing), rebuild both, load, continue."""
    def build(model):
        opt = GrassAdamW(model, torch.optim.AdamW(_decay_groups(model)), active_layers=2, switch_every=3,
                         probe_steps=2, seed=4)
        sched = S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.1, total_iters=5),
                                     S.CosineAnnealingLR(opt, T_max=20)], milestones=[5])
        return opt, sched

    def train(model, opt, sched, data):
        lrs = []
        for x, y in data:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
            sched.step()
            lrs.append(_per_param(opt, model, "lr"))
        return lrs

    data = batches(25)
    ref = make_net()
    ref_opt, ref_sched = build(ref)
    ref_lrs = train(ref, ref_opt, ref_sched, data)

    model = make_net()
    opt, sched = build(model)
    lrs = train(model, opt, sched, data[:11])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    model = make_net(seed=99)
    opt, sched = build(model)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    lrs += train(model, opt, sched, data[11:])
    assert lrs == ref_lrs
    assert_same_params(ref, model)


# ----------------------------------------------------------------------------- AMP + GradScaler
SCALE = 2.0**10


def _amp_run(*, scaler_on: bool, low_memory: bool = False, inject_inf_at: int | None = None,
             drop: int | None = None, clip: float | None = None, n: int = 16, probe_steps: int = 3,
             pass_scaler: bool = False):
    """bf16 autocast on CPU, with or without a GradScaler (fixed scale 2**10). ``inject_inf_at``
    puts an inf into an active block's gradient at that batch; ``drop`` leaves that batch out."""
    model = make_net()
    rec = RecordingSampler()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10**6, enabled=scaler_on)
    opt = GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=3, probe_steps=probe_steps,
                     probe_low_memory=low_memory, sampler=rec, seed=0,
                     grad_scaler=scaler if pass_scaler else None)
    rec_out = {"importance": [], "norms": []}
    for i, (x, y) in enumerate(batches(n)):
        if i == drop:
            continue
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = ((out - y) ** 2).mean()  # loss_fn, keeping the output to check autocast is on
        assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
        scaler.scale(loss).backward()
        if i == inject_inf_at:
            layer = model.layers[opt.active_layer_indices[0]]
            layer.fc.weight.grad[0, 0] = float("inf")
            before = (opt.num_steps, snapshot(model), opt.importance, opt.active_layer_indices,
                      copy.deepcopy(opt.state_dict()["state"]))
        if clip is not None:
            scaler.unscale_(opt)  # clip the true gradients
            rec_out["norms"].append(float(nn.utils.clip_grad_norm_(model.parameters(), clip)))
        scaler.step(opt)
        scaler.update()
        if i == inject_inf_at:
            num_steps, params, importance, active, state = before
            assert opt.num_steps == num_steps, "a step the scaler skips is not an optimizer step"
            assert not any(changed_params(model, params).values()), "a skipped step changed parameters"
            torch.testing.assert_close(opt.importance, importance, rtol=0, atol=0, equal_nan=True)
            assert opt.active_layer_indices == active
            now = opt.state_dict()["state"]
            assert all(torch.equal(now[k][s], v) for k, st in state.items() for s, v in st.items())
            assert scaler.get_scale() == SCALE / 2
        rec_out["importance"].append(opt.importance)
    return model, opt, rec, rec_out


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "unscale-clip"])
def test_grad_scaler_scores_and_updates_equal_the_unscaled_run(clip):
    """Importance comes from unscaled gradients: probing window, training windows and every
    update are those of the same bf16 run without a scaler (scaling by 2**k is exact)."""
    ref, ref_opt, ref_rec, ref_out = _amp_run(scaler_on=False, clip=clip)
    model, opt, rec, out = _amp_run(scaler_on=True, clip=clip)
    assert len(rec.calls) >= 4  # end of probing + several training windows
    for (m, meas), (rm, rmeas) in zip(rec.calls, ref_rec.calls, strict=True):
        assert torch.equal(meas, rmeas)
        torch.testing.assert_close(m, rm, rtol=1e-6, atol=0)
    for imp, ref_imp in zip(out["importance"], ref_out["importance"], strict=True):
        torch.testing.assert_close(imp, ref_imp, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(out["norms"], ref_out["norms"], rtol=1e-6, atol=0)
    if clip is not None:
        assert max(out["norms"]) > clip, "clipping should have been active"
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.num_steps == ref_opt.num_steps == 16


@pytest.mark.parametrize("at", [1, 7], ids=["while-probing", "mid-window"])
def test_step_skipped_by_grad_scaler_does_not_count(at):
    """A batch whose gradient overflows: the scaler skips opt.step(), so num_steps, parameters,
    optimizer state and scores are as if that batch had never been seen (checked right after the
    skip inside _amp_run, and at the end against a run without that batch)."""
    model, opt, rec, _ = _amp_run(scaler_on=True, inject_inf_at=at)
    ref, ref_opt, ref_rec, _ = _amp_run(scaler_on=True, drop=at)
    assert opt.num_steps == ref_opt.num_steps == 15
    assert_same_params(ref, model)
    assert torch.equal(opt.importance, ref_opt.importance)
    assert opt.active_layer_indices == ref_opt.active_layer_indices
    for (m, meas), (rm, rmeas) in zip(rec.calls, ref_rec.calls, strict=True):
        assert torch.equal(meas, rmeas) and torch.equal(m, rm)


def test_default_low_memory_probing_runs_with_a_grad_scaler():
    """Default probe_low_memory=True with a scaler: trains, skips overflowed steps (an inf in an
    outside gradient, which the scaler can see), counts only real steps, gives finite scores. The
    probing scores themselves are seen scaled: see the xfail test below and the guide."""
    model = make_net()
    opt = GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=3, probe_steps=3, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    before = snapshot(model)
    skipped = 0
    for i, (x, y) in enumerate(batches(14)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        if i in (1, 8):  # one overflow while probing, one after
            model.head.weight.grad[0, 0] = float("inf")
            skipped += 1
        scaler.step(opt)
        scaler.update()
    assert opt.num_steps == 14 - skipped
    assert not opt.is_probing and torch.isfinite(opt.importance).all()
    moved = changed_params(model, before)
    assert moved["head.weight"] and any(moved[f"layers.{i}.fc.weight"] for i in range(L))


@pytest.mark.xfail(strict=True, reason="documented caveat (docs/algorithm.md, docs/guides/training_loop.md): "
                   "with probe_low_memory=True the probing hooks see scaled gradients. If this passes, the "
                   "core was fixed: remove this mark and the caveat from the guide")
def test_default_low_memory_probing_scores_are_unscaled():
    _, _, rec, _ = _amp_run(scaler_on=True, low_memory=True, n=3)
    _, _, ref_rec, _ = _amp_run(scaler_on=False, low_memory=True, n=3)
    torch.testing.assert_close(rec.calls[0][0], ref_rec.calls[0][0], rtol=1e-5, atol=0)


def test_low_memory_probing_scores_are_unscaled_when_given_the_scaler():
    _, _, rec, _ = _amp_run(scaler_on=True, low_memory=True, n=6, pass_scaler=True)
    _, _, ref_rec, _ = _amp_run(scaler_on=False, low_memory=True, n=6)
    for (got, _), (want, _) in zip(rec.calls, ref_rec.calls, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- gradient accumulation
def _accum_run(k: int, n_steps: int = 15, low_memory: bool = False, probe_steps: int = 3):
    """n_steps optimizer steps on batches of 32, as one batch (k=1) or k micro-batches with loss/k."""
    model = make_net()
    rec = RecordingSampler()
    opt = GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=3, probe_steps=probe_steps,
                     probe_low_memory=low_memory, sampler=rec, seed=0)
    schedule, micro = [], 0
    for x, y in batches(n_steps, batch=32):
        schedule.append((opt.is_probing, opt.active_layer_indices))
        opt.zero_grad()
        for xm, ym in zip(x.chunk(k), y.chunk(k), strict=True):
            (loss_fn(model, xm, ym) / k).backward()
            micro += 1
        opt.step()
    return model, opt, rec, schedule, micro


def test_accumulation_measures_once_per_optimizer_step_like_one_big_batch():
    ref, ref_opt, ref_rec, ref_schedule, _ = _accum_run(k=1)
    model, opt, rec, schedule, micro = _accum_run(k=4)
    assert micro == 60 and opt.num_steps == ref_opt.num_steps == 15, "num_steps counts optimizer steps"
    assert schedule == ref_schedule, "probing length and redraws are counted in optimizer steps"
    assert len(rec.calls) == len(ref_rec.calls) == 5
    for (m, meas), (rm, rmeas) in zip(rec.calls, ref_rec.calls, strict=True):
        assert torch.equal(meas, rmeas)
        torch.testing.assert_close(m, rm, rtol=1e-5, atol=0)  # window means of the accumulated gradient
    torch.testing.assert_close(opt.importance, ref_opt.importance, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_without_probing_measures_the_accumulated_gradient():
    """probe_steps=0: every window is measured in step(), on the accumulated gradient."""
    ref, ref_opt, ref_rec, _, _ = _accum_run(k=1, probe_steps=0, low_memory=True)
    model, opt, rec, _, _ = _accum_run(k=4, probe_steps=0, low_memory=True)
    assert len(rec.calls) == 5
    for (m, meas), (rm, rmeas) in zip(rec.calls, ref_rec.calls, strict=True):
        assert torch.equal(meas, rmeas)
        torch.testing.assert_close(m, rm, rtol=1e-5, atol=0)


def test_accumulation_with_default_low_memory_probing_counts_optimizer_steps():
    """Default probing hooks + accumulation: still one schedule step per optimizer step (the
    per-micro-batch probing norm is the documented caveat, not checked here)."""
    _, opt, _, schedule, micro = _accum_run(k=4, low_memory=True)
    assert micro == 60 and opt.num_steps == 15
    assert [p for p, _ in schedule] == [True] * 3 + [False] * 12
    assert torch.isfinite(opt.importance).all()


# ----------------------------------------------------------------------------- gradient clipping
def test_clipping_with_all_blocks_active_equals_adamw_with_clipping():
    ref, model = make_net(), make_net()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = GrassAdamW(model, lr=1e-2, active_layers=L, probe_steps=0)
    norms, ref_norms = [], []
    for x, y in batches(20):
        for m, o, out in ((ref, ref_opt, ref_norms), (model, opt, norms)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            out.append(nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05))
            o.step()
    assert norms == ref_norms and max(norms) > 0.05
    assert_same_params(ref, model)


def test_clipping_with_inactive_blocks_uses_only_the_gradients_that_exist():
    """Frozen blocks have grad None, so clip_grad_norm_ measures and scales only the active blocks
    (and outside): GRASS + clipping == AdamW whose inactive gradients are dropped before clipping."""
    ref, model = make_net(), make_net()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = GrassAdamW(model, lr=1e-2, active_layers=1, switch_every=3, probe_steps=2, probe_low_memory=False,
                     seed=0)
    block_of = {id(p): i for i, b in enumerate(ref.layers) for p in b.parameters()}
    clipped = 0
    for x, y in batches(20):
        probing, active = opt.is_probing, set(opt.active_layer_indices)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        opt.step()

        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        full = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        for p in ref.parameters():
            if id(p) in block_of and block_of[id(p)] not in active:
                p.grad = None
        ref_norm = nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.05)
        assert torch.equal(norm, ref_norm)
        if not probing:
            assert norm < full, "the norm must not include the frozen blocks"
            clipped += bool(norm > 0.05)
            ref_opt.step()
    assert clipped > 0
    assert_same_params(ref, model)


# ----------------------------------------------------------------------------- torch.compile
@pytest.fixture
def dynamo():
    """A fresh dynamo, and a counting aot_eager backend (fast: no C++ codegen)."""
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()
    aot_eager = lookup_backend("aot_eager")
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return aot_eager(gm, example_inputs)

    yield backend, compiles
    torch._dynamo.reset()


def _compile_run(mode: str, backend, num_layers: int, switch_every: int, n: int = 16):
    """Train eagerly (mode None), with the whole model compiled ("model") or each block ("blocks")."""
    model = make_net(num_layers=num_layers)
    run = model
    if mode == "model":
        run = torch.compile(model, backend=backend)
    elif mode == "blocks":
        for block in model.layers:
            block.compile(backend=backend)
    opt = GrassAdamW(run, lr=1e-2, active_layers=2, switch_every=switch_every, probe_steps=2, seed=0)
    schedule = []
    for x, y in batches(n):
        schedule.append(opt.active_layer_indices)
        opt.zero_grad()
        loss_fn(run, x, y).backward()
        opt.step()
    return model, opt, schedule


def test_compiled_model_trains_like_eager_across_resamples(dynamo):
    backend, compiles = dynamo
    eager, eager_opt, eager_schedule = _compile_run(None, None, num_layers=L, switch_every=2)
    model, opt, schedule = _compile_run("model", backend, num_layers=L, switch_every=2)
    distinct = set(schedule)
    assert len(distinct) - 1 >= 3, "at least three draws after probing"
    assert schedule == eager_schedule
    assert_same_params(eager, model)
    # Probing hooks may fire in another order under AOTAutograd: the sums differ in the last bits.
    torch.testing.assert_close(opt.importance, eager_opt.importance, rtol=1e-6, atol=0)
    # Freezing flips requires_grad on parameters, which dynamo guards on: one graph per distinct
    # active set (probing's "all blocks" included), each compiled once and then reused.
    assert len(compiles) <= len(distinct) + 1


def test_recompile_limit_falls_back_to_eager_and_stays_correct(dynamo):
    """More distinct active sets than the recompile limit: dynamo stops compiling that frame and
    runs it eagerly; the number of compilations stays bounded and training stays right."""
    backend, compiles = dynamo
    eager, _, eager_schedule = _compile_run(None, None, num_layers=6, switch_every=1, n=14)
    with torch._dynamo.config.patch(recompile_limit=4):
        model, _, schedule = _compile_run("model", backend, num_layers=6, switch_every=1, n=14)
    assert len(set(schedule)) > 4
    assert len(compiles) <= 4
    assert schedule == eager_schedule
    assert_same_params(eager, model)


def test_compiling_only_the_blocks_bounds_recompiles_independently_of_the_active_sets(dynamo):
    backend, compiles = dynamo
    eager, _, eager_schedule = _compile_run(None, None, num_layers=6, switch_every=1, n=14)
    model, _, schedule = _compile_run("blocks", backend, num_layers=6, switch_every=1, n=14)
    assert len(set(schedule)) > 4
    # One graph for a trainable block and one for a frozen block, shared by all blocks.
    assert len(compiles) <= 2 + 1
    assert schedule == eager_schedule
    assert_same_params(eager, model)


def _compiled_step_run(pattern: str | None, backend: str, probe_low_memory: bool = True, n: int = 10):
    """Train with ``opt.step`` and ``opt.zero_grad`` compiled (pattern "step"), with one compiled
    function doing forward, backward, step and zero_grad ("whole"), or eagerly (None). Returns what
    each step left behind."""
    torch._dynamo.reset()
    model = make_net()
    opt = GrassAdamW(model, lr=1e-2, active_layers=1, switch_every=3, probe_steps=2, seed=0,
                     probe_low_memory=probe_low_memory)

    def train_step(x, y):
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = torch.compile(opt.step, backend=backend) if pattern == "step" else opt.step
    zero_grad = torch.compile(opt.zero_grad, backend=backend) if pattern == "step" else opt.zero_grad
    whole = torch.compile(train_step, backend=backend) if pattern == "whole" else train_step
    trace = []
    for x, y in batches(n):
        if pattern == "step":
            loss_fn(model, x, y).backward()
            step()
            zero_grad()
        else:
            whole(x, y)
        trace.append((opt.num_steps, opt.active_layer_indices, opt.importance.clone()))
    torch._dynamo.reset()
    return model, opt, trace


@pytest.mark.parametrize("pattern", ["step", "whole"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_step_trains_like_eager(backend, pattern):
    """torch.compile(opt.step), or a compiled forward+backward+step: GrassAdamW.step (and the probing
    hooks, which backward calls from inside the compiled frame) run eagerly behind a graph break, so
    the schedule, the scores and the parameters are eager's. Traced, the scores came out of the
    probing hooks as 0 and the block norms differed in the last bits, so the draws diverged."""
    eager, eager_opt, eager_trace = _compiled_step_run(None, backend)
    model, opt, trace = _compiled_step_run(pattern, backend)
    assert [t[:2] for t in trace] == [t[:2] for t in eager_trace]
    assert len({t[1] for t in trace}) >= 3, "probing, then at least two different draws"
    if backend == "inductor" and pattern == "whole":  # inductor's forward/backward kernels round differently
        for (_, _, got), (_, _, want) in zip(trace, eager_trace, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0, equal_nan=True)
        for p, q in zip(model.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    else:
        for (_, _, got), (_, _, want) in zip(trace, eager_trace, strict=True):
            assert torch.equal(torch.nan_to_num(got, nan=-1.0), torch.nan_to_num(want, nan=-1.0))
        assert_same_params(eager, model)


def test_compiled_step_with_probing_reduced_in_step_trains_like_eager():
    """probe_low_memory=False: every probing norm is taken in step(), which runs eagerly too."""
    eager, _, eager_trace = _compiled_step_run(None, "aot_eager", probe_low_memory=False)
    model, _, trace = _compiled_step_run("whole", "aot_eager", probe_low_memory=False)
    assert [t[:2] for t in trace] == [t[:2] for t in eager_trace]
    assert_same_params(eager, model)


def _hf_blocks_compiled_run(backend, compiled: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, use_cache=False))
    if compiled:
        for block in model.model.layers:
            block.compile(backend=backend)
    opt = GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=1, probe_steps=1, seed=0)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    schedule = []
    for _ in range(8):
        schedule.append(opt.active_layer_indices)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, schedule


def test_hugging_face_blocks_compiled_with_use_cache_false_compile_twice(dynamo):
    """The per-block recipe of docs/guides/training_loop.md on a Hugging Face model: with
    use_cache=False (as training should be) one graph for a trainable and one for a frozen decoder
    layer, over several active sets (with the KV cache on, each layer compiles its own: 8 graphs
    were measured, and this test fails with use_cache=True)."""
    pytest.importorskip("transformers")
    backend, compiles = dynamo
    eager, eager_schedule = _hf_blocks_compiled_run(None, compiled=False)
    model, schedule = _hf_blocks_compiled_run(backend, compiled=True)
    assert len(set(schedule[1:])) >= 3
    assert len(compiles) <= 2
    assert schedule == eager_schedule
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- activation checkpointing
class CheckpointedNet(TinyNet):
    """TinyNet whose blocks run under non-reentrant activation checkpointing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.layers:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        return self.head(h)


@pytest.mark.parametrize("outside", ["train", "freeze"])
def test_activation_checkpointing_trains_exactly_the_active_blocks(outside):
    """Non-reentrant checkpointing recomputes frozen and active blocks alike; only the active
    blocks (and the outside, when trained) change, and the run equals the plain one exactly. With
    outside_blocks="freeze" the blocks' input does not require grad, the case reentrant
    checkpointing gets wrong."""
    def build(cls):
        torch.manual_seed(0)
        model = cls()
        return model, GrassAdamW(model, lr=1e-2, active_layers=2, switch_every=3, probe_steps=2,
                                 outside_blocks=outside, seed=0)

    ref, ref_opt = build(TinyNet)
    model, opt = build(CheckpointedNet)
    assert_same_params(ref, model)
    for x, y in batches(14):
        probing, active = opt.is_probing, set(opt.active_layer_indices)
        before = snapshot(model)
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
        for name, moved in changed_params(model, before).items():
            i = block_of(name)
            expected = not probing and (i in active if i is not None else outside == "train")
            assert moved == expected, f"{name}: changed={moved}, probing={probing}, active={active}"
        assert opt.active_layer_indices == ref_opt.active_layer_indices
    assert_same_params(ref, model)
    assert torch.equal(opt.importance, ref_opt.importance)
    assert math.isclose(float(opt.probabilities.sum()), 1.0)

"""GrassAdamW against references: torch.optim (parity), masked AdamW (freezing), an uninterrupted run
(resume), and its error messages."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from grass_optim import GrassAdamW, GrassSampler
from tests.models import assert_same_params, batches, loss_fn, make_net, train

L = 4  # blocks in the test net


# ----------------------------------------------------------------------------- parity
def _decay_groups(model: nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


# (id, reference optimizer from a model, GrassAdamW from a model); GRASS trains every block.
PARITY_CASES = [
    ("adamw-default",
     lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
     lambda m: GrassAdamW(m, lr=1e-2, active_layers=L, probe_steps=0)),
    ("adamw-kwargs-amsgrad",
     lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2,
                                 amsgrad=True),
     lambda m: GrassAdamW(m, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, amsgrad=True,
                          active_layers=L, probe_steps=0)),
    ("adamw-no-decay-groups",
     lambda m: torch.optim.AdamW(_decay_groups(m), lr=1e-2),
     lambda m: GrassAdamW(m, torch.optim.AdamW(_decay_groups(m), lr=1e-2), active_layers=L, probe_steps=0)),
    ("sgd-momentum-class",
     lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
     lambda m: GrassAdamW(m, torch.optim.SGD, lr=0.05, momentum=0.9, active_layers=L, probe_steps=0)),
    ("sgd-nesterov-instance",
     lambda m: torch.optim.SGD(_decay_groups(m), lr=0.05, momentum=0.9, nesterov=True),
     lambda m: GrassAdamW(m, torch.optim.SGD(_decay_groups(m), lr=0.05, momentum=0.9, nesterov=True),
                          active_layers=L, probe_steps=0)),
    ("adam-instance",
     lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3),
     lambda m: GrassAdamW(m, torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3),
                          active_layers=L, probe_steps=0)),
    ("adagrad-instance",
     lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
     lambda m: GrassAdamW(m, torch.optim.Adagrad(m.parameters(), lr=0.1), active_layers=L, probe_steps=0)),
    ("rmsprop-class",
     lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-2, momentum=0.5),
     lambda m: GrassAdamW(m, torch.optim.RMSprop, lr=1e-2, momentum=0.5, active_layers=L, probe_steps=0)),
]


def _assert_same_state(ref_opt, ref_model, opt, model) -> None:
    for (name, rp), p in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        rs, s = ref_opt.state[rp], opt.state[p]
        assert rs.keys() == s.keys(), name
        for key in rs:
            assert torch.equal(torch.as_tensor(rs[key]), torch.as_tensor(s[key])), f"{name}: state {key!r}"


@pytest.mark.parametrize("case", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_all_blocks_active_matches_the_bare_optimizer(case):
    _, make_ref, make_grass = case
    ref, model = make_net(), make_net()
    ref_opt, opt = make_ref(ref), make_grass(model)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=7, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    data = batches(60)
    train(ref, ref_opt, data, after_step=lambda _: ref_sched.step())
    train(model, opt, data, after_step=lambda _: sched.step())
    assert_same_params(ref, model)
    _assert_same_state(ref_opt, ref, opt, model)


# ----------------------------------------------------------------------------- freezing
class _Recorder(GrassSampler):
    """GrassSampler that records what the optimizer hands to refresh()."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def refresh(self, importance, window_mean, measured):
        self.calls.append((window_mean.clone(), measured.clone()))
        return super().refresh(importance, window_mean, measured)


def _block_of(model):
    return {id(p): i for i, b in enumerate(model.layers) for p in b.parameters()}


def test_equals_adamw_with_inactive_gradients_dropped():
    """GRASS == AdamW that skips the blocks GRASS froze and skips every probing step, so frozen
    blocks are untouched (no decay, no state change) and keep their state for when they return."""
    model, ref = make_net(), make_net()
    opt = GrassAdamW(model, lr=1e-2, weight_decay=0.5, active_layers=1, switch_every=3, update_every=2,
                     probe_steps=4, seed=0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.5)
    block_of = _block_of(ref)
    for x, y in batches(40):
        probing, active = opt.is_probing, set(opt.active_layer_indices)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        if not probing:
            for p in ref.parameters():
                if id(p) in block_of and block_of[id(p)] not in active:
                    p.grad = None
            ref_opt.step()
    assert_same_params(ref, model)
    _assert_same_state(ref_opt, ref, opt, model)


def test_inactive_blocks_are_frozen_and_untouched():
    model = make_net()
    opt = GrassAdamW(model, lr=1e-2, weight_decay=0.5, active_layers=1, switch_every=5, probe_steps=0, seed=1)
    embed_before = model.embed.weight.detach().clone()
    seen = set()
    for x, y in batches(30):
        active = opt.active_layer_indices
        seen.update(active)
        snap = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = copy.deepcopy({n: opt.state[p] for n, p in model.named_parameters()})
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        for i, block in enumerate(model.layers):
            for p in block.parameters():
                assert p.requires_grad == (i in active)
                assert (p.grad is not None) == (i in active)
        opt.step()
        for n, p in model.named_parameters():
            i = int(n.split(".")[1]) if n.startswith("layers.") else None
            if i is not None and i not in active:
                assert torch.equal(p, snap[n]), f"inactive {n} changed"
                assert opt.state[p].keys() == state[n].keys()
                for k, v in state[n].items():
                    assert torch.equal(opt.state[p][k], v), f"state {k} of inactive {n} changed"
            elif i is not None:
                assert not torch.equal(p, snap[n]), f"active {n} did not change"
    assert not torch.equal(model.embed.weight, embed_before), "outside parameters must train"
    assert len(seen) > 1, "the active set should have been redrawn"


def test_optimizer_step_counts_only_active_steps():
    """Bias correction stays per-parameter correct: a block's AdamW 'step' counts its own updates."""
    model = make_net()
    opt = GrassAdamW(model, active_layers=2, switch_every=2, probe_steps=0, seed=5)
    counts = [0] * L
    for x, y in batches(24):
        for i in opt.active_layer_indices:
            counts[i] += 1
        train(model, opt, [(x, y)])
    for i, block in enumerate(model.layers):
        for p in block.parameters():
            got = int(opt.state[p]["step"]) if opt.state[p] else 0
            assert got == counts[i]


def test_probing_updates_nothing_and_frees_block_gradients():
    model = make_net()
    opt = GrassAdamW(model, probe_steps=3, active_layers=1, seed=0)
    before = copy.deepcopy(model.state_dict())
    for x, y in batches(3):
        assert opt.is_probing
        assert opt.active_layer_indices == tuple(range(L))
        assert torch.allclose(opt.probabilities, torch.full((L,), 1 / L, dtype=torch.float64))
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        assert all(p.grad is None for p in model.layers.parameters()), "low-memory probing frees block gradients"
        assert model.head.weight.grad is not None, "outside parameters keep theirs (GradScaler checks them)"
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not opt.is_probing
    assert len(opt.active_layer_indices) == 1
    assert torch.isfinite(opt.importance).all()


def test_static_sampler_keeps_the_probing_scores():
    model = make_net()
    opt = GrassAdamW(model, sampler="static", probe_steps=3, active_layers=1, switch_every=2, seed=0)
    train(model, opt, batches(3))
    probed = opt.importance
    assert torch.isfinite(probed).all()
    assert not torch.allclose(opt.probabilities, torch.full((L,), 1 / L, dtype=torch.float64))
    train(model, opt, batches(10, seed=5))
    assert torch.equal(opt.importance, probed)


def test_grad_scaler_works_while_probing_and_after():
    model = make_net()
    opt = GrassAdamW(model, probe_steps=2, active_layers=1, switch_every=2, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in batches(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.num_steps == 6 and torch.isfinite(opt.importance).all()


def test_without_probing_first_measurements_are_not_mixed_with_a_placeholder():
    model = make_net()
    rec = _Recorder()
    opt = GrassAdamW(model, sampler=rec, probe_steps=0, active_layers=2, switch_every=3, seed=0)
    assert torch.isnan(opt.importance).all()
    active = opt.active_layer_indices
    train(model, opt, batches(3))
    mean, _ = rec.calls[0]
    for i in range(L):
        if i in active:
            assert opt.importance[i] == mean[i], "a first measurement is the score, not an average with 1.0"
        else:
            assert torch.isnan(opt.importance[i])
    assert torch.isfinite(opt.probabilities).all() and math.isclose(float(opt.probabilities.sum()), 1.0)


def test_a_second_optimizer_on_the_same_model_sees_grass_frozen_blocks_as_trainable():
    model = make_net()
    opt = GrassAdamW(model, active_layers=1, probe_steps=0, seed=0)
    train(model, opt, batches(2))
    sd = opt.state_dict()
    again = GrassAdamW(model, active_layers=1, probe_steps=0, seed=1)
    assert again.state_dict()["grass"]["layer_numel"] == sd["grass"]["layer_numel"] == [88] * L
    again.load_state_dict(sd)
    assert again.active_layer_indices == opt.active_layer_indices


@pytest.mark.parametrize("low_memory", [True, False], ids=["hooks", "kept-grads"])
def test_probing_scores_are_the_mean_gradient_rms(low_memory):
    model, ref = make_net(), make_net()
    T = 5
    opt = GrassAdamW(model, probe_steps=T, probe_low_memory=low_memory, seed=0)
    expected = torch.zeros(L, dtype=torch.float64)
    for x, y in batches(T):
        ref.zero_grad()
        loss_fn(ref, x, y).backward()
        for i, block in enumerate(ref.layers):
            g = [p.grad.double() for p in block.parameters()]
            expected[i] += math.sqrt(sum(float((t * t).sum()) for t in g) / sum(t.numel() for t in g)) / T
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    torch.testing.assert_close(opt.importance, expected, rtol=1e-5, atol=0)


class _NoOp(torch.optim.Optimizer):
    """Leaves the weights alone, so every step's gradients can be predicted."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        return None


def _rms(block: nn.Module) -> float:
    g = [p.grad.double() for p in block.parameters()]
    return math.sqrt(sum(float((t * t).sum()) for t in g) / sum(t.numel() for t in g))


def test_refresh_sees_window_mean_of_active_blocks_and_skips_non_finite():
    model = make_net()
    rec = _Recorder()
    opt = GrassAdamW(model, _NoOp(model.parameters()), sampler=rec, probe_steps=0, active_layers=2,
                     switch_every=4, update_every=4, seed=2)
    active = opt.active_layer_indices
    sums, counts = [0.0] * L, [0] * L
    for step, (x, y) in enumerate(batches(4)):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        for i in active:
            if step == 1 and i == active[0]:  # an overflowed gradient must not enter the scores
                next(model.layers[i].parameters()).grad[0] = float("inf")
            else:
                sums[i] += _rms(model.layers[i])
                counts[i] += 1
        opt.step()
    assert len(rec.calls) == 1
    mean, measured = rec.calls[0]
    assert measured.tolist() == [i in active for i in range(L)]
    expected = torch.tensor([sums[i] / counts[i] if counts[i] else 0.0 for i in range(L)], dtype=torch.float64)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=0)
    assert counts[active[0]] == 3 and counts[active[1]] == 4


def test_user_frozen_parameters_stay_frozen_and_frozen_blocks_are_never_drawn():
    model = make_net()
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    model.layers[1].norm.weight.requires_grad_(False)
    opt = GrassAdamW(model, active_layers=2, switch_every=1, probe_steps=2, seed=0)
    assert opt.probabilities[0] == 0
    for x, y in batches(20):
        assert 0 not in opt.active_layer_indices
        assert not model.layers[1].norm.weight.requires_grad
        assert all(not p.requires_grad for p in model.layers[0].parameters())
        train(model, opt, [(x, y)])
    assert opt.probabilities[0] == 0 and opt.importance[0] == 0


def test_outside_blocks_freeze_never_trains_them():
    model = make_net()
    head = model.head.weight.detach().clone()
    opt = GrassAdamW(model, outside_blocks="freeze", probe_steps=0, seed=0)
    train(model, opt, batches(10))
    assert torch.equal(model.head.weight, head)
    assert not model.head.weight.requires_grad


# ----------------------------------------------------------------------------- contract
def test_is_a_real_optimizer():
    model = make_net()
    opt = GrassAdamW(model, lr=2e-3, probe_steps=0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults["lr"] == 2e-3
    assert opt.param_groups is opt.base_optimizer.param_groups
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters())), "every parameter stays in param_groups"
    blocks = sorted({g["grass_block"] for g in opt.param_groups if g["grass_block"] is not None})
    assert blocks == list(range(L))
    assert opt.num_layers == L and opt.layer_names == tuple(f"layers.{i}" for i in range(L))
    assert opt.importance.shape == (L,) and opt.probabilities.shape == (L,)
    assert math.isclose(float(opt.probabilities.sum()), 1.0)
    assert list(opt.active_layer_indices) == sorted(opt.active_layer_indices)


def test_scheduler_changes_every_group_including_inactive():
    model = make_net()
    opt = GrassAdamW(model, lr=1.0, active_layers=1, probe_steps=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    train(model, opt, batches(3), after_step=lambda _: sched.step())
    assert {g["lr"] for g in opt.param_groups} == {0.125}


def test_step_returns_closure_loss_and_zero_grad_honours_set_to_none():
    model = make_net()
    opt = GrassAdamW(model, probe_steps=0, active_layers=1)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.step() is None
    loss_fn(model, x, y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert any(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_global_rng_is_never_used():
    model = make_net()
    state = torch.random.get_rng_state()
    opt = GrassAdamW(model, active_layers=1, switch_every=2, probe_steps=2)
    train(model, opt, batches(12))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_seed_makes_the_schedule_reproducible():
    def schedule(seed):
        model = make_net()
        opt = GrassAdamW(model, active_layers=2, switch_every=2, probe_steps=2, seed=seed)
        out = []
        train(model, opt, batches(20), after_step=lambda _: out.append(opt.active_layer_indices))
        return out

    assert schedule(7) == schedule(7)
    assert schedule(7) != schedule(8)


def test_add_param_group_raises_clearly():
    opt = GrassAdamW(make_net(), probe_steps=0)
    with pytest.raises(RuntimeError, match="does not support add_param_group after construction"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_wrapping_keeps_the_instance_and_its_state():
    model = make_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, base, batches(2))
    buf = base.state[model.head.weight]["momentum_buffer"].clone()
    opt = GrassAdamW(model, base, probe_steps=0)
    assert opt.base_optimizer is base
    assert torch.equal(opt.state[model.head.weight]["momentum_buffer"], buf)


# ----------------------------------------------------------------------------- checkpointing
def _run(save_at: int | None, total: int = 37):
    """Train `total` steps; if save_at is set, checkpoint there and continue in fresh objects."""
    kwargs = dict(lr=1e-2, active_layers=2, switch_every=5, update_every=3, probe_steps=4, seed=3)
    model = make_net()
    opt = GrassAdamW(model, **kwargs)
    data = batches(total)
    schedule = []
    if save_at is None:
        train(model, opt, data, after_step=lambda _: schedule.append(opt.active_layer_indices))
        return model, opt, schedule
    train(model, opt, data[:save_at], after_step=lambda _: schedule.append(opt.active_layer_indices))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model = make_net(seed=99)  # other weights: everything must come from the checkpoint
    opt = GrassAdamW(model, **{**kwargs, "seed": 1234})
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    for i, block in enumerate(model.layers):
        for p in block.parameters():
            assert p.requires_grad == (i in opt.active_layer_indices)
    train(model, opt, data[save_at:], after_step=lambda _: schedule.append(opt.active_layer_indices))
    return model, opt, schedule


@pytest.mark.parametrize("save_at", [2, 17, 23], ids=["while-probing", "mid-window", "mid-refresh"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(save_at):
    model_a, opt_a, sched_a = _run(None)
    model_b, opt_b, sched_b = _run(save_at)
    assert sched_a == sched_b
    assert_same_params(model_a, model_b)
    assert torch.equal(opt_a.importance, opt_b.importance)
    assert torch.equal(opt_a.probabilities, opt_b.probabilities)
    _assert_same_state(opt_a, model_a, opt_b, model_b)


def test_history_is_plain_data_and_survives_a_resume():
    import json

    model_a, opt_a, sched_a = _run(None)
    h = opt_a.history
    json.dumps(h)  # plain data
    events = h["events"]
    assert events[0]["event"] == "start" and events[1]["event"] == "probe_end" and events[1]["step"] == 4
    for e in events[1:]:  # sched_a[i]: the active set after step i + 1
        assert e["active"] == list(sched_a[e["step"] - 1])
    redraw_steps = [e["step"] for e in events if "redraw" in e["event"]]
    assert redraw_steps == list(range(4 + 5, 38, 5))
    assert all(len(e["probabilities"]) == L for e in events)
    _, opt_b, _ = _run(17)
    assert json.dumps(opt_b.history, sort_keys=True) == json.dumps(h, sort_keys=True)
    assert GrassAdamW(make_net(), history=False).history["events"] == []


def test_state_dict_holds_the_whole_schedule():
    model = make_net()
    opt = GrassAdamW(model, probe_steps=2, switch_every=3)
    train(model, opt, batches(7))
    g = opt.state_dict()["grass"]
    for key in ("step", "active", "importance", "probabilities", "window_sum", "window_count",
                "generator", "num_layers", "seed"):
        assert key in g
    assert g["step"] == 7 and g["active"] == list(opt.active_layer_indices)
    window = g["window_sum"].clone()
    train(model, opt, batches(1))
    assert torch.equal(g["window_sum"], window), "state_dict() hands out copies of the live buffers"


def test_load_rejects_another_model_and_changes_nothing():
    opt = GrassAdamW(make_net(), probe_steps=0)
    other = GrassAdamW(make_net(num_layers=5), probe_steps=0)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"saved for a model with 5 blocks.*this optimizer has 4 blocks"):
        opt.load_state_dict(other.state_dict())
    broken = opt.state_dict()
    del broken["grass"]["generator"]
    with pytest.raises(ValueError, match="the 'grass' entry lacks generator"):
        opt.load_state_dict(broken)
    with pytest.raises(ValueError, match="has no 'grass' entry"):
        opt.load_state_dict(torch.optim.AdamW(make_net().parameters()).state_dict())
    after = opt.state_dict()
    assert after["grass"]["step"] == before["grass"]["step"]
    assert after["grass"]["active"] == before["grass"]["active"]


# ----------------------------------------------------------------------------- errors
def _other_params_sgd(_model):
    return torch.optim.SGD(make_net(seed=1).parameters(), lr=0.1)


# (id, build(model) -> anything, exception, message regex)
ERROR_CASES = [
    ("parameters-not-module", lambda m: GrassAdamW(m.parameters()), TypeError, "needs the model"),
    ("active-layers-zero", lambda m: GrassAdamW(m, active_layers=0), ValueError,
     r"Invalid active_layers: 0 \(expected an int >= 1\)"),
    ("active-layers-too-many", lambda m: GrassAdamW(m, active_layers=5), ValueError,
     r"Invalid active_layers: 5 \(expected an int in \[1, 4\]"),
    ("active-layers-float", lambda m: GrassAdamW(m, active_layers=1.5), TypeError, "Invalid active_layers: 1.5"),
    ("active-layers-bool", lambda m: GrassAdamW(m, active_layers=True), TypeError, "Invalid active_layers: True"),
    ("switch-every-zero", lambda m: GrassAdamW(m, switch_every=0), ValueError, "Invalid switch_every: 0"),
    ("probe-steps-negative", lambda m: GrassAdamW(m, probe_steps=-1), ValueError, "Invalid probe_steps: -1"),
    ("update-every-zero", lambda m: GrassAdamW(m, update_every=0), ValueError, "Invalid update_every: 0"),
    ("temperature-zero", lambda m: GrassAdamW(m, temperature=0.0), ValueError,
     r"Invalid temperature: 0.0 \(expected a finite number > 0.0\)"),
    ("temperature-nan", lambda m: GrassAdamW(m, temperature=float("nan")), ValueError, "Invalid temperature: nan"),
    ("temperature-str", lambda m: GrassAdamW(m, temperature="hot"), TypeError, "Invalid temperature: 'hot'"),
    ("ema-zero", lambda m: GrassAdamW(m, ema=0.0), ValueError,
     r"Invalid ema: 0.0 \(expected a finite number in \(0.0, 1.0\]\)"),
    ("ema-above-one", lambda m: GrassAdamW(m, ema=1.5), ValueError, "Invalid ema: 1.5"),
    ("exploration-negative", lambda m: GrassAdamW(m, exploration=-0.1), ValueError, "Invalid exploration: -0.1"),
    ("outside-blocks", lambda m: GrassAdamW(m, outside_blocks="sample"), ValueError,
     "Invalid outside_blocks: 'sample' \\(expected one of 'train', 'freeze'\\)"),
    ("probe-low-memory", lambda m: GrassAdamW(m, probe_low_memory="yes"), TypeError, "Invalid probe_low_memory: 'yes'"),
    ("sampler-name", lambda m: GrassAdamW(m, sampler="lisa"), ValueError, "Invalid sampler: 'lisa'"),
    ("sampler-object", lambda m: GrassAdamW(m, sampler=object()), TypeError, "lacks refresh, probabilities, draw"),
    ("layers-path", lambda m: GrassAdamW(m, layers="blocks"), ValueError,
     "Invalid layers: 'blocks' is not a submodule"),
    ("layers-type", lambda m: GrassAdamW(m, layers=42), TypeError, "Invalid layers: int"),
    ("layers-foreign", lambda m: GrassAdamW(m, layers=[nn.Linear(2, 2)]), ValueError,
     r"Invalid layers\[0\]: Linear is not a submodule"),
    ("seed-negative", lambda m: GrassAdamW(m, seed=-1), ValueError, "Invalid seed: -1"),
    ("seed-str", lambda m: GrassAdamW(m, seed="1"), TypeError, "Invalid seed: '1'"),
    ("base-str", lambda m: GrassAdamW(m, "adam"), TypeError, "Invalid base_optimizer: 'adam'"),
    ("base-instance-with-lr", lambda m: GrassAdamW(m, torch.optim.SGD(m.parameters(), lr=0.1), lr=0.1),
     ValueError, "Invalid arguments lr together with a base_optimizer instance"),
    ("base-instance-with-kwargs", lambda m: GrassAdamW(m, torch.optim.SGD(m.parameters(), lr=0.1), momentum=0.9),
     ValueError, "Invalid arguments momentum together with a base_optimizer instance"),
    ("base-foreign-params", lambda m: GrassAdamW(m, _other_params_sgd(m)), ValueError,
     "not a parameter of the model given to GrassAdamW"),
    ("base-lbfgs", lambda m: GrassAdamW(m, torch.optim.LBFGS), TypeError, "LBFGS keeps one flat parameter group"),
    ("base-class-bad-kwarg", lambda m: GrassAdamW(m, torch.optim.SGD, lr=0.1, betas=(0.9, 0.9)), TypeError,
     "Invalid arguments for base_optimizer=SGD"),
    ("lr-negative", lambda m: GrassAdamW(m, lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    ("grad-scaler", lambda m: GrassAdamW(m, grad_scaler=1.0), TypeError, "Invalid grad_scaler: float"),
    ("distributed-checks", lambda m: GrassAdamW(m, distributed_checks="yes"), TypeError,
     "Invalid distributed_checks: 'yes'"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_arguments_raise_specific_errors(case):
    _, build, exc, message = case
    model = make_net()
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(exc, match=message):
        build(model)
    assert [p.requires_grad for p in model.parameters()] == before, "a failed build must not touch the model"


def test_a_failed_wrap_leaves_the_users_optimizer_as_it_was():
    model = make_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = [dict(g, params=list(g["params"])) for g in base.param_groups]
    with pytest.raises(ValueError, match="Invalid active_layers: 9"):
        GrassAdamW(model, base, active_layers=9)
    assert base.param_groups == groups


def test_settings_without_effect_are_warned(caplog):
    with caplog.at_level("WARNING", logger="grass_optim"):
        GrassAdamW(make_net(), sampler="uniform", temperature=2.0)
    assert "temperature=2.0 has no effect with sampler='uniform'" in caplog.text

"""GrassAdamW's contract as a torch.optim.Optimizer: what it exposes, its step/zero_grad/hooks, its
randomness, and its errors (a table of bad arguments, each with its message)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from grass_optim import GrassAdamW, GrassSampler
from tests.helpers import batches, loss_fn, make_net, round_trip, train

L = 4

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


def _other_params_sgd(_model):
    return torch.optim.SGD(make_net(seed=1).parameters(), lr=0.1)


class _KwargsSGD(torch.optim.SGD):
    """A base optimizer that takes ``**kwargs`` (and checks them itself)."""

    def __init__(self, params, lr=0.1, **kwargs):
        unknown = set(kwargs) - {"momentum"}
        if unknown:
            raise TypeError(f"_KwargsSGD got unexpected arguments {sorted(unknown)}")
        super().__init__(params, lr=lr, **kwargs)


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
    ("grass-kwarg-typo", lambda m: GrassAdamW(m, activ_layers=3), TypeError,
     r"Invalid argument activ_layers=3: neither a GrassAdamW setting nor an argument of base_optimizer=AdamW "
     r"\(did you mean active_layers\?\)"),
    ("grass-kwarg-typo-sgd", lambda m: GrassAdamW(m, torch.optim.SGD, lr=0.1, switch_evry=5), TypeError,
     r"Invalid argument switch_evry=5: .* base_optimizer=SGD \(did you mean switch_every\?\)"),
    ("grass-kwarg-typo-instance", lambda m: GrassAdamW(m, torch.optim.SGD(m.parameters(), lr=0.1), probe_step=0),
     TypeError, r"did you mean probe_steps\?"),
    ("base-kwarg-typo", lambda m: GrassAdamW(m, torch.optim.SGD, lr=0.1, momentm=0.9), TypeError,
     r"Invalid argument momentm=0.9: .* \(did you mean momentum\?\)"),
    ("grass-kwarg-typo-open-base", lambda m: GrassAdamW(m, _KwargsSGD, lr=0.1, swich_every=3), TypeError,
     r"Invalid argument swich_every=3: .* base_optimizer=_KwargsSGD \(did you mean switch_every\?\)"),
    ("unknown-kwarg", lambda m: GrassAdamW(m, colour="red"), TypeError,
     r"Invalid argument colour='red': .* \(GrassAdamW takes lr, .*active_layers, .*; AdamW takes .*amsgrad"),
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


def test_settings_without_effect_are_warned(caplog):
    with caplog.at_level("WARNING", logger="grass_optim"):
        GrassAdamW(make_net(), sampler="uniform", temperature=2.0)
    assert "temperature=2.0 has no effect with sampler='uniform'" in caplog.text


# ----------------------------------------------------------------------------- hooks
def test_hooks_fire_exactly_once_per_call_in_every_offload_mode(offload_mode):
    """Step hooks on GrassAdamW fire once per step(); the base optimizer's once per step that updates
    (not while probing), also in "stream", which updates block by block; state-dict hooks once per
    state_dict()/load_state_dict(), seeing the "grass" entry and the restored schedule."""
    model = make_net()
    opt = GrassAdamW(model, active_layers=2, switch_every=2, probe_steps=2, offload=offload_mode, seed=0)
    calls: Counter = Counter()
    seen: dict = {}

    def count(name):
        return lambda *args: calls.update([name])

    opt.register_step_pre_hook(count("step_pre"))
    opt.register_step_post_hook(count("step_post"))
    opt.base_optimizer.register_step_pre_hook(count("base_step_pre"))
    opt.base_optimizer.register_step_post_hook(count("base_step_post"))
    opt.register_state_dict_pre_hook(count("sd_pre"))

    def sd_post(_opt, sd):  # hooks that return something replace the state dict: these return None
        calls.update(["sd_post"])
        seen["saved"] = "grass" in sd

    def load_pre(_opt, sd):
        calls.update(["load_pre"])
        seen["loading"] = sd["grass"]["step"]

    def load_post(o):
        calls.update(["load_post"])
        seen["loaded"] = o.num_steps

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(load_post)
    global_handles = [register_optimizer_step_pre_hook(
        lambda o, *_: calls.update([f"global_pre_{type(o).__name__}"]))]
    try:
        train(model, opt, batches(7))
    finally:
        for h in global_handles:
            h.remove()
    sd = opt.state_dict()
    fresh = GrassAdamW(make_net(), active_layers=2, switch_every=2, probe_steps=2, offload=offload_mode)
    fresh.register_load_state_dict_post_hook(count("fresh_load_post"))
    fresh.load_state_dict(round_trip(sd))
    opt.load_state_dict(round_trip(sd))
    assert calls == {"step_pre": 7, "step_post": 7, "base_step_pre": 5, "base_step_post": 5,
                     "global_pre_GrassAdamW": 7, "global_pre_AdamW": 5, "sd_pre": 1, "sd_post": 1,
                     "fresh_load_post": 1, "load_pre": 1, "load_post": 1}
    assert seen == {"saved": True, "loading": 7, "loaded": 7}
    assert fresh.num_steps == 7


def test_users_load_pre_hook_may_change_the_checkpoint_before_grass_checks_it():
    model = make_net()
    opt = GrassAdamW(model, active_layers=1, switch_every=3, probe_steps=0, seed=0)
    train(model, opt, batches(4))
    sd = round_trip(opt.state_dict())
    fresh = GrassAdamW(make_net(), active_layers=1, switch_every=3, probe_steps=0, seed=1)

    def older_format(_opt, state_dict):  # e.g. a migration from an older checkpoint layout
        state_dict = dict(state_dict)
        state_dict["grass"] = {**state_dict.pop("grass_v0"), "step": 2}
        return state_dict

    fresh.register_load_state_dict_pre_hook(older_format)
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(o.num_steps), prepend=True)
    seen: list[int] = []
    sd["grass_v0"] = sd.pop("grass")
    fresh.load_state_dict(sd)
    assert fresh.num_steps == 2 and seen == [2], "GRASS's post-hook runs first, even before a prepended one"


def test_copy_and_pickle_are_refused_clearly():
    """Issue 11.7: a copy would hold other parameters than the model's and crash at step()."""
    import copy
    import pickle

    opt = GrassAdamW(make_net(), probe_steps=0)
    with pytest.raises(TypeError, match=r"cannot be copied.*copy.deepcopy\(opt.state_dict\(\)\)"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match=r"cannot be pickled.*torch.save\(opt.state_dict\(\), path\)"):
        pickle.dumps(opt)
    copy.deepcopy(opt.state_dict())  # what to do instead works


@pytest.mark.parametrize(("seed", "exc"), [(2**64, ValueError), (2**63, ValueError), (-1, ValueError)])
def test_seed_out_of_range(seed, exc):
    with pytest.raises(exc, match=rf"Invalid seed: {seed} \(expected an int in \[0, {2**63 - 1}\]\)"):
        GrassAdamW(make_net(), seed=seed)
    GrassAdamW(make_net(), seed=2**63 - 1)


class _BadDraw(GrassSampler):
    def __init__(self, result, fail_once=False):
        super().__init__()
        self.result, self.fail_once = result, fail_once

    def draw(self, probabilities, k, generator):
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("sampler failed once")
        return self.result


@pytest.mark.parametrize(("result", "message"), [
    (None, r"sampler.draw returned None \(expected 2 distinct integer indices in \[0, 4\)\)"),
    (torch.tensor([0.7, 2.2]), r"sampler.draw returned tensor\(\[0.7000, 2.2000\]\) \(expected 2 distinct integer"),
])
def test_a_sampler_returning_no_indices_is_refused(result, message):
    with pytest.raises(RuntimeError, match=message):
        GrassAdamW(make_net(), sampler=_BadDraw(result), probe_steps=0)


def test_a_sampler_that_raises_at_the_end_of_probing_leaves_probing_intact():
    """Issue 11.9: the transition is undone (no empty active set, hooks still in place); the next
    step tries again and succeeds."""
    model = make_net()
    sampler = _BadDraw(torch.tensor([0, 2]), fail_once=True)
    opt = GrassAdamW(model, sampler=sampler, probe_steps=2, seed=0)
    train(model, opt, batches(1))
    x, y = batches(1, seed=5)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    assert all(p.grad is None for p in model.layers.parameters()), "the probing hooks freed the gradients"
    with pytest.raises(RuntimeError, match="sampler failed once"):
        opt.step()
    assert opt.is_probing and opt.num_steps == 1 and opt.active_layer_indices == (0, 1, 2, 3)
    loss_fn(model, x, y).backward()
    assert all(p.grad is None for p in model.layers.parameters()), "still probing with the hooks"
    opt.step()
    assert not opt.is_probing and opt.active_layer_indices == (0, 2)


def test_shared_blocks_are_named_as_such():
    """Issue 11.9: ALBERT-style models (one layer in every slot)."""
    model = make_net()
    model.layers = nn.ModuleList([model.layers[0]] * 4)
    for kwargs in ({}, {"layers": "layers"}):
        with pytest.raises(ValueError, match=r"The blocks of 'layers' share their parameters: the same Block fills "
                                             r"4 of its slots \(as in ALBERT\)"):
            GrassAdamW(model, **kwargs)


def test_a_huge_finite_gradient_is_scored_not_dropped():
    """Issue 11.9: x1e20 gradients overflowed the squared norm in float32; the block counted as unscored."""
    model = make_net()
    opt = GrassAdamW(model, probe_steps=2, active_layers=1, seed=0)
    for x, y in batches(2):
        opt.zero_grad()
        (loss_fn(model, x, y) * 1e20).backward()
        opt.step()
    assert torch.isfinite(opt.importance).all() and float(opt.importance.min()) > 1e10

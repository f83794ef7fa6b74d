"""Resume: a run checkpointed at any point and continued in fresh objects equals the uninterrupted run,
bit for bit (parameters, optimizer state, schedule), with and across offload modes; a checkpoint of
another model is refused before anything changes."""

from __future__ import annotations

import pytest
import torch

from grass_optim import GrassAdamW
from tests.helpers import (
    SCENARIO,
    assert_same_params,
    assert_same_state,
    batches,
    make_net,
    resumable_run,
    round_trip,
    scenario_model,
    train,
    train_scenario,
)

L = 4

@pytest.mark.parametrize("save_at", [2, 17, 23], ids=["while-probing", "mid-window", "mid-refresh"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(save_at):
    model_a, opt_a, sched_a = resumable_run(None)
    model_b, opt_b, sched_b = resumable_run(save_at)
    assert sched_a == sched_b
    assert_same_params(model_a, model_b)
    assert torch.equal(opt_a.importance, opt_b.importance)
    assert torch.equal(opt_a.probabilities, opt_b.probabilities)
    assert_same_state(opt_a, model_a, opt_b, model_b)


@pytest.mark.parametrize(("save_at", "variant"), [
    (6, {"refresh_all": True}),  # saved right before a measure-every-block step (4 + 3 - 1)
    (9, {"refresh_all": True, "sampler": "l1"}),
    (11, {"sampler": "gain", "probe_steps": 0}),
], ids=["refresh_all-before-measure-step", "l1-refresh_all", "gain"])
def test_resume_with_refresh_all_and_other_signals_is_bit_identical(save_at, variant):
    model_a, opt_a, sched_a = resumable_run(None, **variant)
    model_b, opt_b, sched_b = resumable_run(save_at, **variant)
    assert sched_a == sched_b
    assert_same_params(model_a, model_b)
    torch.testing.assert_close(opt_a.importance, opt_b.importance, rtol=0, atol=0, equal_nan=True)
    assert_same_state(opt_a, model_a, opt_b, model_b)


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


@pytest.mark.parametrize(("first", "second"), [("inactive", "inactive"), ("stream", "stream"),
                                               ("inactive", None), (None, "stream"), ("stream", "inactive")])
def test_resume_across_offload_modes_is_bit_identical(first, second):
    data = batches(60)
    ref_model, ref_opt = scenario_model(), None
    ref_opt = GrassAdamW(ref_model, **SCENARIO)
    ref_log: list = []
    train_scenario(ref_model, ref_opt, data, log=ref_log)

    model = scenario_model()
    opt = GrassAdamW(model, offload=first, **SCENARIO)
    log: list = []
    train_scenario(model, opt, data[:26], log=log)
    ckpt = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
    for st in ckpt["opt"]["state"].values():
        for v in st.values():
            assert not isinstance(v, torch.Tensor) or v.device.type == "cpu"
    model2 = make_net(seed=7, num_layers=L)  # other weights: everything must come from the checkpoint
    model2.layers[1].norm.bias.requires_grad_(False)
    opt2 = GrassAdamW(model2, offload=second, **{**SCENARIO, "seed": 99})
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    if second == "inactive":
        per_block = opt2.memory_report().device_state_bytes_per_block
        assert all(per_block[i] == 0 for i in range(L) if i not in opt2.active_layer_indices)
    train_scenario(model2, opt2, data[26:], log=log)
    assert [a for a, _ in log] == [a for a, _ in ref_log]
    assert_same_params(ref_model, model2)
    assert_same_state(ref_opt, ref_model, opt2, model2)


# ----------------------------------------------------------------------------- changed settings, bad input
def _saved(steps, **kwargs):
    model = make_net()
    opt = GrassAdamW(model, seed=0, **kwargs)
    train(model, opt, batches(steps))
    return model, round_trip(opt.state_dict())


@pytest.mark.parametrize(("saved_with", "resumed_with", "expect"), [
    ({"probe_steps": 10}, {"probe_steps": 2}, "probe_end"),  # issue 11.5: saved while probing, fewer probe_steps
    ({"probe_steps": 2, "active_layers": 1}, {"probe_steps": 2, "active_layers": 3}, "redraw"),
    ({"probe_steps": 2, "active_layers": 3}, {"probe_steps": 2, "active_layers": 1}, "redraw"),
    ({"probe_steps": 2, "switch_every": 3}, {"probe_steps": 2, "switch_every": 7}, None),
    ({"probe_steps": 2, "offload": "stream"}, {"probe_steps": 2, "offload": "inactive"}, None),
], ids=["fewer-probe-steps", "more-active", "fewer-active", "other-switch-every", "other-offload"])
def test_resume_with_changed_settings_continues_sensibly(saved_with, resumed_with, expect):
    model, sd = _saved(4, **saved_with)
    fresh = make_net()
    fresh.load_state_dict(model.state_dict())
    opt = GrassAdamW(fresh, seed=1, **resumed_with)
    opt.load_state_dict(sd)
    k = resumed_with.get("active_layers", 2)
    assert not opt.is_probing and len(opt.active_layer_indices) == k, "never an empty or wrong-sized active set"
    events = opt.history["events"]
    assert (events[-1]["event"] if expect else None) == expect or expect is None
    for i, block in enumerate(fresh.layers):
        assert all(p.requires_grad == (i in opt.active_layer_indices) for p in block.parameters())
    before = [p.detach().clone() for p in fresh.parameters()]
    train(fresh, opt, batches(3, seed=9))
    assert any(not torch.equal(p, b) for p, b in zip(fresh.parameters(), before, strict=True)), "it trains"


def _corrupt(sd, key, value):
    bad = {**sd, "grass": {**sd["grass"], key: value}}
    return bad


BAD_ENTRIES = [
    ("step", -1, r"'step' is -1 \(expected an int >= 0\)"),
    ("step", 2.5, r"'step' is 2.5"),
    ("active", [0, 0], r"active blocks \[0, 0\] list a block twice"),
    ("active", [0, 1, 2], r"3 active blocks \[0, 1, 2\], but it was saved after probing with active_layers=2"),
    ("active", [0.5], r"expected a list of ints"),
    ("importance", torch.zeros(3, dtype=torch.float64),
     r"'importance' is \(3,\) \(expected a tensor of shape \(4,\)\)"),
    ("importance", torch.tensor([1.0, float("inf"), 1.0, 1.0], dtype=torch.float64), "expected finite scores"),
    ("probabilities", torch.tensor([0.5, -0.1, 0.3, 0.3], dtype=torch.float64), "finite non-negative"),
    ("window_count", torch.tensor([1, -2, 0, 0]), "expected counts >= 0"),
    ("generator", torch.zeros(3, dtype=torch.uint8), "'generator' is not the state of a CPU torch.Generator"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_ENTRIES, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_ENTRIES])
def test_a_bad_checkpoint_is_refused_and_changes_nothing(key, value, message):
    """Issue 11.6: every field checked before anything changes."""
    model, sd = _saved(5, probe_steps=2, offload="inactive")
    opt = GrassAdamW(model, probe_steps=2, offload="inactive", seed=3)
    train(model, opt, batches(3, seed=4))
    before = round_trip(opt.state_dict())
    grads_before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_corrupt(sd, key, value))
    after = round_trip(opt.state_dict())
    assert grads_before == [p.requires_grad for p in model.parameters()]
    assert after["grass"]["step"] == before["grass"]["step"] and after["grass"]["active"] == before["grass"]["active"]
    for k, v in before["grass"].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(after["grass"][k], v, rtol=0, atol=0, equal_nan=True)
    for k, st in before["state"].items():
        for name, v in st.items():
            assert torch.equal(after["state"][k][name], v)

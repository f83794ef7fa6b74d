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

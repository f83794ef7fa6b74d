"""``save_checkpoint``/``load_checkpoint`` through torch.distributed.checkpoint, in one process (no
process group): saving anywhere in the loop changes nothing, resuming from any of those points is
bit-identical to the uninterrupted run, in every offload mode; a checkpoint of another model is
refused before anything changes. The 2-rank FSDP2 tests are in ``test_distributed.py``."""

from __future__ import annotations

import warnings

import pytest
import torch

from grass_optim import GrassAdamW, load_checkpoint, save_checkpoint
from tests.helpers import assert_same_params, assert_same_state, batches, loss_fn, make_net, snapshot, train_at

STEPS = 16
KW = dict(lr=1e-2, weight_decay=0.1, active_layers=2, switch_every=5, update_every=3, probe_steps=4, seed=3)
# (iteration, where): probing with no optimizer state and no gradients (what made torch's helpers
# step), probing after backward, mid-window after step, right after a redraw (probe end at step 4,
# redraws at 9, 14), after zero_grad and after backward later on.
SAVE_AT = [(1, "zero_grad"), (2, "backward"), (6, "step"), (8, "step"), (11, "zero_grad"), (12, "backward")]


def with_state(opt, model):
    return {n for n, p in model.named_parameters() if opt.state.get(p)}


@pytest.mark.parametrize("offload", [None, "inactive", "stream"], ids=["offload-off", "inactive", "stream"])
def test_saving_anywhere_changes_nothing_and_every_save_resumes_exactly(tmp_path, offload):
    data = batches(STEPS)
    kw = {**KW, "offload": offload}
    ref_model = make_net()
    ref_opt = GrassAdamW(ref_model, **kw)
    torch.manual_seed(0)
    ref_actives = train_at(ref_model, ref_opt, data)
    ref_rng = torch.get_rng_state()

    model = make_net()
    opt = GrassAdamW(model, **kw)
    saved = {}

    def save(i, where):
        if (i, where) in SAVE_AT:
            path = tmp_path / f"{i}-{where}"
            requires_grad = [p.requires_grad for p in model.parameters()]
            save_checkpoint(path, model, opt)
            assert requires_grad == [p.requires_grad for p in model.parameters()]
            saved[(i, where)] = (path, with_state(opt, model))

    torch.manual_seed(0)
    actives = train_at(model, opt, data, at=save)
    assert len(saved) == len(SAVE_AT)
    assert saved[(1, "zero_grad")][1] == set(), "no optimizer state during probing (torch's helpers make some)"
    assert actives == ref_actives
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert_same_params(ref_model, model)
    assert with_state(opt, model) == with_state(ref_opt, ref_model)
    assert_same_state(ref_opt, ref_model, opt, model)

    for (i, where), (path, state_names) in saved.items():
        fresh = make_net(seed=99)  # other weights: everything must come from the checkpoint
        fresh_opt = GrassAdamW(fresh, **{**kw, "seed": 1234})
        load_checkpoint(path, fresh, fresh_opt)
        assert with_state(fresh_opt, fresh) == state_names, (i, where)
        start = i + 1 if where == "step" else i  # saved mid-iteration: do that iteration again
        assert fresh_opt.num_steps == start
        resumed = train_at(fresh, fresh_opt, data, start=start)
        assert resumed == ref_actives[start:], (i, where)
        assert_same_params(ref_model, fresh)
        assert_same_state(ref_opt, ref_model, fresh_opt, fresh)


def test_extra_entries_round_trip_and_no_dcp_warning_in_one_process(tmp_path):
    model = make_net()
    opt = GrassAdamW(model, **KW)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    data = batches(7)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
    counter = torch.tensor([7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_checkpoint(tmp_path, model, opt, extra={"scheduler": sched, "counter": counter, "step": 7})

    fresh = make_net(seed=5)
    fresh_opt = GrassAdamW(fresh, **KW)
    fresh_sched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh_opt, T_max=20)
    fresh_counter = torch.tensor([0])
    extra = {"scheduler": fresh_sched, "counter": fresh_counter, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path, fresh, fresh_opt, extra=extra)
    assert fresh_counter.item() == 7 and extra["step"] == 7 and extra["scheduler"] is fresh_sched
    assert fresh_sched.state_dict() == sched.state_dict()
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert_same_params(model, fresh)
    with pytest.raises(ValueError, match=r"Invalid extra: the names \['optim'\]"):
        save_checkpoint(tmp_path / "x", model, opt, extra={"optim": counter})


def _trained(num_layers=4, d=8, steps=6):
    model = make_net(num_layers=num_layers, d=d)
    opt = GrassAdamW(model, **{**KW, "probe_steps": 2})
    train_at(model, opt, batches(steps))
    return model, opt


@pytest.mark.parametrize(("other", "message"), [
    ({"num_layers": 5}, r"with 6 param groups of \[4, 4, 4, 4, 4, 4\] parameters, this one has 5 groups"),
    ({"d": 16}, r"'model.embed.weight' has shape \(16, 3\), this model's has \(8, 3\)"),
], ids=["more-blocks", "wider"])
def test_a_checkpoint_of_another_model_is_refused_and_changes_nothing(tmp_path, other, message):
    model, opt = _trained(**other)
    save_checkpoint(tmp_path, model, opt)
    target, target_opt = _trained(steps=7)
    params, before = snapshot(target), target_opt.state_dict()
    requires_grad = [p.requires_grad for p in target.parameters()]
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path, target, target_opt)
    assert all(torch.equal(p, params[n]) for n, p in target.named_parameters())
    assert requires_grad == [p.requires_grad for p in target.parameters()]
    after = target_opt.state_dict()
    assert after["grass"]["step"] == before["grass"]["step"] == 7
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k][n], v) for k, st in before["state"].items() for n, v in st.items())


def test_refuses_other_objects(tmp_path):
    import torch.distributed.checkpoint as dcp

    model, opt = _trained()
    with pytest.raises(ValueError, match="not the model this GrassAdamW was built on"):
        save_checkpoint(tmp_path / "a", make_net(), opt)
    with pytest.raises(TypeError, match="optimizer must be a GrassAdamW, got AdamW"):
        save_checkpoint(tmp_path / "a", model, torch.optim.AdamW(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no 'optim.grass' entry, so it was not written by grass_optim"):
        load_checkpoint(tmp_path / "plain", model, opt)
    save_checkpoint(tmp_path / "b", model, opt, extra={"step": 6})
    fresh = make_net(seed=1)
    fresh_opt = GrassAdamW(fresh, **{**KW, "probe_steps": 2})
    params = snapshot(fresh)
    with pytest.raises(ValueError, match=r"Invalid extra: the checkpoint .* has no entries \['sched'\] "
                                         r"\(it has \['step'\]\)"):
        load_checkpoint(tmp_path / "b", fresh, fresh_opt, extra={"step": 0, "sched": torch.zeros(1)})
    assert fresh_opt.num_steps == 0 and not fresh_opt.state, "the optimizer is loaded only after every check"
    assert all(torch.equal(p, params[n]) for n, p in fresh.named_parameters())


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, dtype=torch.int64)], ids=["shape", "dtype"])
def test_an_extra_tensor_of_another_shape_or_dtype_is_refused_before_anything_changes(tmp_path, bad):
    """Checked first: DCP would fail on it only after the optimizer had been loaded."""
    model, opt = _trained()
    save_checkpoint(tmp_path, model, opt, extra={"counter": torch.zeros(2)})
    fresh = make_net(seed=1)
    fresh_opt = GrassAdamW(fresh, **{**KW, "probe_steps": 2})
    params = snapshot(fresh)
    with pytest.raises(ValueError, match=r"Invalid extra: 'counter' is torch\.\w+ of shape \(\d,?\) here, "
                                         r"torch.float32 of shape \(2,\) in the checkpoint"):
        load_checkpoint(tmp_path, fresh, fresh_opt, extra={"counter": bad})
    assert fresh_opt.num_steps == 0 and not fresh_opt.state
    assert all(torch.equal(p, params[n]) for n, p in fresh.named_parameters())

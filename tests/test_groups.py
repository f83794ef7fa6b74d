"""grass_optim.groups: the base optimizer, built or wrapped, its per-block groups, and its step."""

from __future__ import annotations

import pytest
import torch

from grass_optim import GrassAdamW
from grass_optim.groups import step_groups_of, step_hooks_once
from tests.helpers import batches, make_net, train


def test_wrapping_keeps_the_instance_and_its_state():
    model = make_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, base, batches(2))
    buf = base.state[model.head.weight]["momentum_buffer"].clone()
    opt = GrassAdamW(model, base, probe_steps=0)
    assert opt.base_optimizer is base
    assert torch.equal(opt.state[model.head.weight]["momentum_buffer"], buf)


def test_a_failed_wrap_leaves_the_users_optimizer_as_it_was():
    model = make_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = [dict(g, params=list(g["params"])) for g in base.param_groups]
    with pytest.raises(ValueError, match="Invalid active_layers: 9"):
        GrassAdamW(model, base, active_layers=9)
    assert base.param_groups == groups


def test_groups_are_split_per_block_keeping_each_users_hyperparameters():
    model = make_net()
    base = torch.optim.SGD([{"params": model.layers.parameters(), "lr": 0.1},
                            {"params": [*model.embed.parameters(), *model.head.parameters()], "lr": 0.01}],
                           momentum=0.9)
    groups_list = base.param_groups
    opt = GrassAdamW(model, base, active_layers=2, probe_steps=0)
    assert opt.param_groups is base.param_groups is groups_list, "the same list, rewritten in place"
    assert [(g["grass_block"], g["lr"], g["momentum"]) for g in opt.param_groups] == [
        (0, 0.1, 0.9), (1, 0.1, 0.9), (2, 0.1, 0.9), (3, 0.1, 0.9), (None, 0.01, 0.9)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.filterwarnings("error::UserWarning")  # "lr_scheduler.step() before optimizer.step()"
@pytest.mark.parametrize("offload", [None, "stream"])
def test_a_scheduler_on_the_wrapped_optimizer_drives_every_group(offload):
    """The wrapped instance is the optimizer that steps (groups rewritten in place, see
    groups.build_base_optimizer): a scheduler built on it after wrapping drives every per-block
    group, and in "stream" (which steps it block by block) it still sees one optimizer step per step."""
    model = make_net()
    base = torch.optim.AdamW(model.parameters(), lr=1.0)
    opt = GrassAdamW(model, base, active_layers=1, switch_every=2, probe_steps=0, offload=offload, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda s: 0.5 ** s)
    train(model, opt, batches(3), after_step=lambda _: sched.step())
    assert {g["lr"] for g in opt.param_groups} == {0.125}
    assert len(opt.param_groups) == 5


def test_step_groups_of_steps_only_that_blocks_groups_and_hooks_fire_once():
    model = make_net()
    opt = GrassAdamW(model, torch.optim.SGD(model.parameters(), lr=0.1), active_layers=4, probe_steps=0)
    base = opt.base_optimizer
    calls = []
    base.register_step_pre_hook(lambda *_: calls.append("pre"))
    base.register_step_post_hook(lambda *_: calls.append("post"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = base.param_groups
    with step_hooks_once(base):
        step_groups_of(base, 2)
        step_groups_of(base, None)
    assert base.param_groups is groups, "the full group list is put back"
    assert calls == ["pre", "post"]
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n.startswith("layers.2.") or not n.startswith("layers.")), n

"""grass_optim.freezing: only the active blocks (and the outside, when trained) have requires_grad;
the user's freezes stay; GRASS's own freezes are known to a second optimizer on the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from grass_optim import GrassAdamW
from grass_optim.freezing import BlockFreezer, is_trainable, set_frozen_by_grass
from grass_optim.layers import find_layers
from tests.helpers import batches, loss_fn, make_net, train

L = 4

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


def test_a_second_optimizer_on_the_same_model_sees_grass_frozen_blocks_as_trainable():
    model = make_net()
    opt = GrassAdamW(model, active_layers=1, probe_steps=0, seed=0)
    train(model, opt, batches(2))
    sd = opt.state_dict()
    again = GrassAdamW(model, active_layers=1, probe_steps=0, seed=1)
    assert again.state_dict()["grass"]["layer_numel"] == sd["grass"]["layer_numel"] == [88] * L
    again.load_state_dict(sd)
    assert again.active_layer_indices == opt.active_layer_indices


def test_block_freezer_manages_only_parameters_in_the_optimizer_that_were_trainable():
    model = make_net()
    model.layers[0].fc.bias.requires_grad_(False)  # frozen by the user
    left_out = model.layers[1].fc.weight  # not in the optimizer
    in_opt = {id(p) for p in model.parameters() if p is not left_out}
    freezer = BlockFreezer(find_layers(model), in_opt, train_outside=False)
    managed = [{id(p) for p in ps} for ps in freezer.blocks]
    assert id(model.layers[0].fc.bias) not in managed[0] and id(left_out) not in managed[1]
    assert freezer.numel == [8 * 8 + 8 + 8, 8 + 8 + 8, 8 * 8 + 8 + 8 + 8, 8 * 8 + 8 + 8 + 8]
    model.layers[2].fc.weight.grad = torch.ones(8, 8)
    freezer.apply({0, 1})
    assert not model.layers[0].fc.bias.requires_grad, "a user's freeze is never undone"
    assert left_out.requires_grad, "a parameter outside the optimizer is never touched"
    assert all(p.requires_grad for n, p in model.layers[0].named_parameters() if n != "fc.bias")
    assert not any(p.requires_grad for i in (2, 3) for p in model.layers[i].parameters())
    assert model.layers[2].fc.weight.grad is None, "a frozen block drops its gradient"
    assert not model.embed.weight.requires_grad and not model.head.bias.requires_grad  # outside frozen


def test_registry_tells_grass_freezes_from_the_users():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    set_frozen_by_grass(p, True)
    q.requires_grad_(False)
    assert not p.requires_grad and is_trainable(p)
    assert not is_trainable(q)
    set_frozen_by_grass(p, False)
    assert p.requires_grad and is_trainable(p)


# ----------------------------------------------------------------------------- who owns requires_grad
def _snapshot_blocks(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_helper_that_unfreezes_everything_does_not_train_inactive_blocks(caplog):
    """Issue 11.1: model.requires_grad_(True) after the optimizer is built; the next step updates only
    the active blocks (and the outside), and GRASS freezes the others again."""
    model = make_net()
    opt = GrassAdamW(model, active_layers=1, switch_every=100, probe_steps=0, seed=0)
    train(model, opt, batches(2))
    active = set(opt.active_layer_indices)
    model.requires_grad_(True)
    before = _snapshot_blocks(model)
    with caplog.at_level("WARNING", logger="grass_optim"):
        train(model, opt, batches(1, seed=7))
    for n, p in model.named_parameters():
        block = int(n.split(".")[1]) if n.startswith("layers.") else None
        if block is not None and block not in active:
            assert torch.equal(p, before[n]), f"inactive {n} was updated"
            assert not p.requires_grad, f"{n} frozen again"
    assert "set to requires_grad=True by someone else" in caplog.text


def test_a_freeze_made_mid_run_is_adopted_never_undone():
    """Issue 11.2: the user freezes the embedding (always trained) and a parameter of an active block;
    redraws never unfreeze them and they are never updated again."""
    model = make_net()
    opt = GrassAdamW(model, active_layers=2, switch_every=2, probe_steps=0, seed=0)
    train(model, opt, batches(1))
    frozen = [model.embed.weight, next(model.layers[opt.active_layer_indices[0]].parameters())]
    for p in frozen:
        p.requires_grad_(False)
    kept = [p.detach().clone() for p in frozen]
    train(model, opt, batches(12, seed=3))
    for p, k in zip(frozen, kept, strict=True):
        assert not p.requires_grad and torch.equal(p, k)


def test_restore_model_gives_the_model_back_and_a_second_optimizer_sees_the_users_freezes():
    """Issue 11.3: after training, GRASS's freezes are undone (explicitly, with `with`, or when the
    optimizer is dropped); a freeze the user makes afterwards is theirs, and a new GrassAdamW respects it."""
    model = make_net()
    model.layers[1].norm.bias.requires_grad_(False)  # the user's own freeze
    with GrassAdamW(model, active_layers=1, switch_every=3, probe_steps=0, seed=0) as opt:
        train(model, opt, batches(4))
        assert any(not p.requires_grad for p in model.layers.parameters() if p is not model.layers[1].norm.bias)
    assert all(p.requires_grad for p in model.parameters() if p is not model.layers[1].norm.bias)
    assert not model.layers[1].norm.bias.requires_grad, "the user's freeze stays"

    opt = GrassAdamW(model, active_layers=1, switch_every=3, probe_steps=0, seed=0)
    train(model, opt, batches(4))
    del opt  # no reference cycle: given back at once, not when the garbage collector runs
    assert all(p.requires_grad for p in model.parameters() if p is not model.layers[1].norm.bias)

    for p in model.layers[3].parameters():  # the user now freezes block 3 on purpose
        p.requires_grad_(False)
    before = [p.detach().clone() for p in model.layers[3].parameters()]
    again = GrassAdamW(model, active_layers=1, switch_every=1, probe_steps=0, seed=0)
    assert again.probabilities[3] == 0
    train(model, again, batches(8))
    assert all(torch.equal(p, b) for p, b in zip(model.layers[3].parameters(), before, strict=True))


def test_restored_model_is_taken_back_at_the_next_step():
    model = make_net()
    opt = GrassAdamW(model, active_layers=1, switch_every=100, probe_steps=0, seed=0)
    active = opt.active_layer_indices
    opt.restore_model()
    assert all(p.requires_grad for p in model.parameters())
    before = _snapshot_blocks(model)
    train(model, opt, batches(1))
    for n, p in model.named_parameters():
        if n.startswith("layers.") and int(n.split(".")[1]) not in active:
            assert torch.equal(p, before[n]) and not p.requires_grad


def test_a_parameter_frozen_at_construction_and_unfrozen_later_is_refused():
    model = make_net()
    model.embed.weight.requires_grad_(False)
    opt = GrassAdamW(model, probe_steps=0, seed=0)
    train(model, opt, batches(1))
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"parameter 'embed.weight' was frozen .* when GrassAdamW was built, "
                                           r"and now requires grad"):
        train(model, opt, batches(1))


class _Adapter(torch.nn.Module):
    """What PEFT's LoRA does to a linear layer: keeps it (frozen) and adds trainable parameters."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Parameter(torch.zeros(2, base.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, 2))

    def forward(self, x):
        return self.base_layer(x) + x @ self.lora_a.T @ self.lora_b.T


def test_wrapping_the_model_after_the_optimizer_is_refused():
    """Issue 11.4: get_peft_model (simulated) after GrassAdamW: the optimizer would train the frozen
    base weights and never the adapters. The next step refuses, saying how to do it right."""
    model = make_net()
    opt = GrassAdamW(model, probe_steps=0, seed=0)
    for block in model.layers:
        block.fc = _Adapter(block.fc)
    for n, p in model.named_parameters():
        p.requires_grad_("lora" in n)
    with pytest.raises(RuntimeError, match="Build GrassAdamW after wrapping the model"):
        train(model, opt, batches(1))

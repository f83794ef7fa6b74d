"""grass_optim.freezing: only the active blocks (and the outside, when trained) have requires_grad;
the user's freezes stay; GRASS's own freezes are known to a second optimizer on the same model."""

from __future__ import annotations

import copy

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

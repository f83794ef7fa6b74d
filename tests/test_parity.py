"""Parity: GrassAdamW against the optimizers it must reduce to, bit for bit.

* every block active, no probing: the bare base optimizer (AdamW, SGD, Adam, Adagrad, RMSprop, with
  an LR schedule);
* fewer blocks active: an AdamW whose gradients of the inactive blocks are dropped, and that skips the
  probing steps (so inactive blocks are untouched and keep their state).

Offloading against offloading off is in tests/test_offload.py; resume against an uninterrupted run in
tests/test_resume.py.
"""

from __future__ import annotations

import pytest
import torch

from grass_optim import GrassAdamW
from tests.helpers import assert_same_params, assert_same_state, batches, decay_groups, loss_fn, make_net, train

L = 4  # blocks in the test net

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
     lambda m: torch.optim.AdamW(decay_groups(m), lr=1e-2),
     lambda m: GrassAdamW(m, torch.optim.AdamW(decay_groups(m), lr=1e-2), active_layers=L, probe_steps=0)),
    ("sgd-momentum-class",
     lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
     lambda m: GrassAdamW(m, torch.optim.SGD, lr=0.05, momentum=0.9, active_layers=L, probe_steps=0)),
    ("sgd-nesterov-instance",
     lambda m: torch.optim.SGD(decay_groups(m), lr=0.05, momentum=0.9, nesterov=True),
     lambda m: GrassAdamW(m, torch.optim.SGD(decay_groups(m), lr=0.05, momentum=0.9, nesterov=True),
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
    assert_same_state(ref_opt, ref, opt, model)


def test_equals_adamw_with_inactive_gradients_dropped():
    """GRASS == AdamW that skips the blocks GRASS froze and skips every probing step, so frozen
    blocks are untouched (no decay, no state change) and keep their state for when they return."""
    model, ref = make_net(), make_net()
    opt = GrassAdamW(model, lr=1e-2, weight_decay=0.5, active_layers=1, switch_every=3, update_every=2,
                     probe_steps=4, seed=0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.5)
    block_of = {id(p): i for i, b in enumerate(ref.layers) for p in b.parameters()}
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
    assert_same_state(ref_opt, ref, opt, model)


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

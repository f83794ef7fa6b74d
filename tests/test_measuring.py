"""grass_optim.measuring: the per-block gradient RMS that reaches the scores, while probing (with the
low-memory hooks or kept gradients) and while training; against norms computed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from grass_optim import GrassAdamW
from tests.helpers import RecordingSampler, batches, loss_fn, make_net, train

L = 4

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
    rec = RecordingSampler()
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


def test_without_probing_first_measurements_are_not_mixed_with_a_placeholder():
    model = make_net()
    rec = RecordingSampler()
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

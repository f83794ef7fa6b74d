"""grass_optim.measuring: the per-block gradient RMS that reaches the scores, while probing (with the
low-memory hooks or kept gradients) and while training; against norms computed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from grass_optim import GainSampler, GrassAdamW, GrassSampler
from tests.helpers import RecordingSampler, assert_same_params, batches, loss_fn, make_net, train

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


def _train_amp(model, opt, scaler, data):
    """bf16 autocast, a GradScaler around backward and step."""
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def test_grad_scaler_works_while_probing_and_after():
    model = make_net()
    opt = GrassAdamW(model, probe_steps=2, active_layers=1, switch_every=2, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _train_amp(model, opt, scaler, batches(6))
    assert opt.num_steps == 6 and torch.isfinite(opt.importance).all()


# ----------------------------------------------------------------------------- refresh_all
class _Cycle(GrassSampler):
    """Draws blocks in a fixed cycle whatever the scores (so runs with and without refresh_all take
    the same updates), and records what each refresh was handed."""

    def __init__(self):
        super().__init__()
        self.calls, self.turn = [], 0

    def refresh(self, importance, window_mean, measured):
        self.calls.append((window_mean.clone(), measured.clone()))
        return super().refresh(importance, window_mean, measured)

    def draw(self, probabilities, k, generator):
        n = probabilities.numel()
        out = torch.tensor([(self.turn + j) % n for j in range(k)])
        self.turn += k
        return out


def _refresh_run(refresh_all, *, offload=None, low_memory=True, steps=13, observe=None, switch_every=3):
    model = make_net()
    rec = _Cycle()
    opt = GrassAdamW(model, lr=1e-2, weight_decay=0.1, sampler=rec, active_layers=1, switch_every=switch_every,
                     probe_steps=0, refresh_all=refresh_all, offload=offload, probe_low_memory=low_memory, seed=0)
    for x, y in batches(steps):
        if observe is not None:
            observe(model, opt)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return model, opt, rec


@pytest.mark.parametrize("offload", [None, "inactive", "stream"])
@pytest.mark.parametrize("low_memory", [True, False], ids=["hooks", "kept-grads"])
def test_refresh_all_measures_every_block_and_updates_only_the_active_one(offload, low_memory):
    """Same draws, so the same updates as without refresh_all, bit for bit; but every refresh sees
    every block measured, and the measure step leaves the inactive blocks' weights, optimizer state
    and placement alone."""
    ref_model, ref_opt, ref_rec = _refresh_run(False, offload=offload)
    seen = []

    def observe(model, opt):
        if opt.schedule.measures_all:
            grads_before = [p.requires_grad for p in model.layers.parameters()]
            seen.append((opt.active_layer_indices, all(grads_before), opt.memory_report()))

    model, opt, rec = _refresh_run(True, offload=offload, low_memory=low_memory, observe=observe)
    assert_same_params(ref_model, model)
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert ref_opt.state[p].keys() == opt.state[q].keys()
        for k in ref_opt.state[p]:
            assert torch.equal(ref_opt.state[p][k], opt.state[q][k])
    assert len(seen) == 4  # steps 2, 5, 8, 11: the step before each refresh
    assert all(all_on for _, all_on, _ in seen), "every block gets gradients on a measure step"
    if offload is not None:  # parked state stays parked while the inactive blocks are measured
        for active, _, report in seen:
            assert all(b == 0 for i, b in enumerate(report.device_state_bytes_per_block) if i not in active)
    assert [m.all() for _, m in rec.calls] == [True] * 4
    assert [int(m.sum()) for _, m in ref_rec.calls] == [1] * 4
    assert torch.isfinite(opt.importance).all(), "every block has a score after the first refresh"


def test_refresh_all_every_step_still_updates_each_newly_drawn_block():
    """switch_every=1 with refresh_all: every step gives every block gradients and redraws; the blocks
    with gradients never change, but which are updated (and which the hooks free) does."""
    ref_model, ref_opt, _ = _refresh_run(False, switch_every=1)
    model, opt, rec = _refresh_run(True, switch_every=1)
    assert_same_params(ref_model, model)
    assert len(rec.calls) == 13 and all(m.all() for _, m in rec.calls)


def test_refresh_all_scores_are_the_measure_steps_rms_for_inactive_blocks():
    ref = make_net()
    ref.load_state_dict(make_net().state_dict())
    expected = {}

    def observe(model, opt):
        if opt.schedule.measures_all and opt.num_steps == 2:
            ref.load_state_dict(model.state_dict())
            x, y = batches(13)[2]
            ref.zero_grad()
            loss_fn(ref, x, y).backward()
            for i, block in enumerate(ref.layers):
                if i not in opt.active_layer_indices:
                    expected[i] = _rms(block)

    _, _, rec = _refresh_run(True, observe=observe)
    mean, _ = rec.calls[0]
    assert len(expected) == L - 1
    for i, want in expected.items():
        assert math.isclose(float(mean[i]), want, rel_tol=1e-5)


def test_refresh_all_scores_with_a_grad_scaler_equal_the_unscaled_run():
    def run(scaler_on):
        model = make_net()
        rec = _Cycle()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6, enabled=scaler_on)
        opt = GrassAdamW(model, lr=1e-2, sampler=rec, active_layers=1, switch_every=3, probe_steps=0,
                         refresh_all=True, seed=0, grad_scaler=scaler if scaler_on else None)
        _train_amp(model, opt, scaler, batches(9))
        return rec.calls

    for (got, measured), (want, _) in zip(run(True), run(False), strict=True):
        assert measured.all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_refresh_all_with_accumulation_measures_once_per_optimizer_step():
    """Kept gradients (probe_low_memory=False): the measure step's norms are those of the
    accumulated gradient, as with one big batch; the hooks would take them per micro-batch (the
    caveat documented for probing)."""
    def run(k):
        model = make_net()
        rec = _Cycle()
        opt = GrassAdamW(model, lr=1e-2, sampler=rec, active_layers=1, switch_every=3, probe_steps=0,
                         refresh_all=True, probe_low_memory=False, seed=0)
        for x, y in batches(9, batch=32):
            opt.zero_grad()
            for xm, ym in zip(x.chunk(k), y.chunk(k), strict=True):
                (loss_fn(model, xm, ym) / k).backward()
            opt.step()
        return model, rec.calls

    big_model, big = run(1)
    model, acc = run(4)
    assert len(acc) == len(big) == 3
    for (m, meas), (rm, rmeas) in zip(acc, big, strict=True):
        assert meas.all() and rmeas.all()
        torch.testing.assert_close(m, rm, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), big_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- other signals
@pytest.mark.parametrize("low_memory", [True, False], ids=["hooks", "kept-grads"])
def test_l1_probing_scores_are_the_mean_l1_norm(low_memory):
    model, ref = make_net(), make_net()
    T = 4
    opt = GrassAdamW(model, sampler="l1", probe_steps=T, probe_low_memory=low_memory, seed=0)
    expected = torch.zeros(L, dtype=torch.float64)
    for x, y in batches(T):
        ref.zero_grad()
        loss_fn(ref, x, y).backward()
        for i, block in enumerate(ref.layers):
            expected[i] += sum(float(p.grad.double().abs().sum()) for p in block.parameters()) / T
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    torch.testing.assert_close(opt.importance, expected, rtol=1e-5, atol=0)


class _GainRecorder(GainSampler):
    def __init__(self):
        super().__init__()
        self.calls = []

    def refresh(self, importance, window_mean, measured):
        self.calls.append((window_mean.clone(), measured.clone()))
        return super().refresh(importance, window_mean, measured)


@pytest.mark.parametrize("offload", [None, "stream"])
def test_gain_is_the_first_order_loss_decrease_of_each_update(offload):
    """The recorded gain of an updated block is <g, theta_before - theta_after>, summed over its
    parameters, averaged over the window; blocks not updated have none."""
    model = make_net()
    rec = _GainRecorder()
    opt = GrassAdamW(model, lr=1e-2, sampler=rec, active_layers=2, switch_every=3, seed=0, offload=offload)
    sums, counts = torch.zeros(L, dtype=torch.float64), torch.zeros(L)
    for x, y in batches(3):
        active = opt.active_layer_indices
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        before = {id(p): p.detach().clone() for p in model.parameters()}
        grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
        opt.step()
        for i in active:
            sums[i] += sum(float((grads[id(p)].double() * (before[id(p)].double() - p.detach().double())).sum())
                           for p in model.layers[i].parameters())
            counts[i] += 1
    (mean, measured), = rec.calls
    assert measured.tolist() == [c > 0 for c in counts.tolist()]
    expected = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-9)
    assert (mean[measured] > 0).all(), "descent steps decrease the loss to first order"


def test_gain_sampler_needs_no_probing_and_trains_like_the_others():
    model = make_net()
    opt = GrassAdamW(model, sampler="gain", active_layers=1, switch_every=2, seed=0)
    assert opt.config.probe_steps == 0 and not opt.is_probing
    train(model, opt, batches(12))
    scored = torch.isfinite(opt.importance)
    assert int(scored.sum()) >= 2 and torch.isnan(opt.importance[~scored]).all(), "trained blocks have scores"
    assert math.isclose(float(opt.probabilities.sum()), 1.0)


def test_a_parameter_without_a_gradient_costs_no_index_copy_at_every_step():
    """An active block's parameter that gets no gradient (unused in the forward): the index of the
    others is built once per active set and reused (on an accelerator a copy at every step would be
    a host synchronisation), and the scores are those of the parameters that have gradients."""
    model = make_net(num_layers=3)
    model.layers[1].unused = nn.Linear(8, 8)  # in the block, never called
    opt = GrassAdamW(model, lr=1e-2, active_layers=3, switch_every=50, probe_steps=0, seed=0)
    indices = []
    for x, y in batches(6):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        _, index = opt._measurer._with_grads(opt.schedule)
        indices.append(index)
    assert all(i is indices[0] for i in indices)
    assert len(opt._measurer._subsets) == 1
    assert indices[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # 4 used parameters per block

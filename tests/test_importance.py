"""Tests of grass_optim.importance: per-block gradient statistics as pure functions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grass_optim.importance import accumulate_window, block_grad_rms, block_sq_norms, ema_update, window_mean

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None)


def _naive_sq_norms(grads, block_index, num_blocks):
    """Per tensor, in float64: sum of squares, added to its block."""
    out = [0.0] * num_blocks
    for g, b in zip(grads, block_index.tolist(), strict=True):
        out[b] += float(g.to_dense().to(F64).pow(2).sum())
    return torch.tensor(out, dtype=F64)


# ------------------------------------------------------------------------------------- block_sq_norms
@SETTINGS
@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(0, 10))
def test_block_sq_norms_matches_naive(seed, num_blocks, num_grads):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    grads = []
    for i in range(num_grads):
        shape = tuple(int(x) for x in torch.randint(0, 5, (int(torch.randint(1, 3, (1,), generator=g)),),
                                                    generator=g))
        scale = float(10.0 ** torch.randint(-3, 3, (1,), generator=g))
        grads.append((torch.randn(shape, generator=g) * scale).to(dtypes[i % 3]))
    index = torch.randint(0, num_blocks, (num_grads,), generator=g)
    out = block_sq_norms(grads, index, num_blocks)
    assert out.dtype == torch.float64 and out.shape == (num_blocks,)
    # float32 norms, squared and summed in float64: relative error ~1e-6.
    torch.testing.assert_close(out.to(F64), _naive_sq_norms(grads, index, num_blocks), rtol=1e-5, atol=1e-30)


def test_block_sq_norms_hand_computed_mixed_dtypes():
    grads = [
        torch.tensor([3.0, 4.0]),  # 25
        torch.tensor([[1.0, 2.0], [2.0, 0.0]], dtype=torch.bfloat16),  # 9
        torch.full((3,), 300.0, dtype=torch.float16),  # 270000: fp16 squares would overflow
        torch.zeros(0),  # empty: 0
        torch.tensor([-2.0], dtype=torch.bfloat16),  # 4
    ]
    index = torch.tensor([0, 2, 1, 3, 0])
    out = block_sq_norms(grads, index, 5)
    assert out.tolist() == [29.0, 270000.0, 9.0, 0.0, 0.0]


def test_block_sq_norms_empty_list():
    out = block_sq_norms([], torch.zeros(0, dtype=torch.long), 4)
    assert out.dtype == torch.float64 and torch.equal(out, torch.zeros(4, dtype=torch.float64))


def test_block_sq_norms_of_a_huge_finite_gradient_do_not_overflow():
    """||g||^2 of a gradient of 1e20 overflows float32 (3.4e38): squares are taken in float64."""
    out = block_sq_norms([torch.full((4,), 1e20)], torch.tensor([0]), 1)
    assert torch.isfinite(out).all() and math.isclose(float(out[0]), 4e40, rel_tol=1e-6)


def test_block_sq_norms_sparse_gradient():
    # Uncoalesced: the two values at index 0 add up to 3 before squaring (dense norm^2 = 9 + 16).
    s = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), torch.tensor([1.0, 2.0, 4.0]), (5,),
                                check_invariants=False)
    out = block_sq_norms([s, torch.tensor([1.0])], torch.tensor([1, 1]), 2)
    assert out.tolist() == [0.0, 26.0]


def test_block_sq_norms_propagates_non_finite():
    """Overflow/NaN reaches the block (and is then filtered by accumulate_window)."""
    out = block_sq_norms([torch.tensor([math.inf]), torch.tensor([math.nan]), torch.ones(1)],
                         torch.tensor([0, 1, 2]), 3)
    assert math.isinf(out[0]) and math.isnan(out[1]) and out[2] == 1.0


def test_block_sq_norms_float64_gradients():
    grads = [torch.tensor([3.0, 4.0], dtype=F64), torch.tensor([1.0], dtype=torch.float32)]
    out = block_sq_norms(grads, torch.tensor([0, 0]), 1)
    assert out.tolist() == [26.0]


# ------------------------------------------------------------------------------------- block_grad_rms
def test_block_grad_rms_values():
    sq = torch.tensor([25.0, 0.0, 8.0, 0.0])
    numels = torch.tensor([4, 10, 2, 0])  # a block of size 0 gives 0
    assert block_grad_rms(sq, numels).tolist() == [2.5, 0.0, 2.0, 0.0]


@SETTINGS
@given(st.lists(st.tuples(st.floats(0.0, 1e30), st.integers(0, 10**9)), min_size=1, max_size=16))
def test_block_grad_rms_formula(pairs):
    sq = torch.tensor([p[0] for p in pairs], dtype=F64)
    n = torch.tensor([p[1] for p in pairs])
    out = block_grad_rms(sq, n)
    for (s, k), r in zip(pairs, out.tolist(), strict=True):
        assert math.isclose(r, math.sqrt(s / max(k, 1)), rel_tol=1e-12, abs_tol=1e-300)


def test_block_grad_rms_end_to_end_from_gradients():
    grads = [torch.full((4,), 2.0), torch.full((2, 3), -1.0, dtype=torch.bfloat16), torch.full((2,), 5.0)]
    index = torch.tensor([0, 1, 0])
    numels = torch.tensor([6, 6])
    rms = block_grad_rms(block_sq_norms(grads, index, 2), numels)
    torch.testing.assert_close(rms, torch.tensor([math.sqrt((16 + 50) / 6), 1.0], dtype=F64))


# ---------------------------------------------------------------------------------- accumulate_window
@pytest.mark.parametrize("count_dtype", [torch.int64, torch.int32, torch.float32])
def test_accumulate_window_excludes_non_finite_and_unmeasured(count_dtype):
    window_sum = torch.zeros(5)
    window_count = torch.zeros(5, dtype=count_dtype)
    steps = [
        (torch.tensor([1.0, math.nan, 3.0, 7.0, math.inf]), torch.tensor([True, True, True, False, True])),
        (torch.tensor([3.0, 2.0, -math.inf, 9.0, 4.0]), torch.tensor([True, True, True, False, True])),
        (torch.tensor([math.nan, 6.0, 1.0, 9.0, 1.0]), torch.tensor([False, True, False, False, False])),
    ]
    for rms, measured in steps:
        accumulate_window(window_sum, window_count, rms, measured)
    assert window_sum.tolist() == [4.0, 8.0, 3.0, 0.0, 4.0]
    assert window_count.tolist() == [2, 2, 1, 0, 1]
    assert window_count.dtype == count_dtype
    assert torch.equal(window_mean(window_sum, window_count), torch.tensor([2.0, 4.0, 3.0, 0.0, 4.0]))


@SETTINGS
@given(st.lists(st.lists(st.tuples(st.one_of(st.floats(0.0, 1e6), st.sampled_from([math.nan, math.inf, -math.inf])),
                                   st.booleans()), min_size=4, max_size=4), min_size=1, max_size=8))
def test_accumulate_window_matches_python(steps):
    window_sum = torch.zeros(4, dtype=F64)
    window_count = torch.zeros(4, dtype=torch.long)
    for step in steps:
        accumulate_window(window_sum, window_count, torch.tensor([v for v, _ in step], dtype=F64),
                          torch.tensor([m for _, m in step]))
    for b in range(4):
        ok = [step[b][0] for step in steps if step[b][1] and math.isfinite(step[b][0])]
        assert window_count[b] == len(ok)
        assert math.isclose(float(window_sum[b]), math.fsum(ok), rel_tol=1e-12, abs_tol=1e-300)
        mean = float(window_mean(window_sum, window_count)[b])
        assert math.isfinite(mean)
        if ok:
            assert math.isclose(mean, math.fsum(ok) / len(ok), rel_tol=1e-12)
        else:
            assert mean == 0.0


# -------------------------------------------------------------------------------------- window_mean
def test_window_mean_zero_where_never_measured():
    out = window_mean(torch.tensor([6.0, 0.0, 5.0, 0.0]), torch.tensor([3, 0, 2, 0]))
    assert out.tolist() == [2.0, 0.0, 2.5, 0.0]
    assert bool(torch.isfinite(out).all())
    # A stale sum with count 0 is ignored, not divided by 0.
    assert window_mean(torch.tensor([1.0]), torch.tensor([0])).tolist() == [0.0]


# --------------------------------------------------------------------------------------- ema_update
@SETTINGS
@given(st.lists(st.tuples(st.floats(0.0, 1e6), st.floats(0.0, 1e6), st.booleans()), min_size=1, max_size=16),
       st.floats(1e-6, 1.0))
def test_ema_update_formula(rows, alpha):
    imp = torch.tensor([r[0] for r in rows], dtype=F64)
    win = torch.tensor([r[1] for r in rows], dtype=F64)
    measured = torch.tensor([r[2] for r in rows])
    out = ema_update(imp, win, measured, alpha)
    for (i, w, m), o in zip(rows, out.tolist(), strict=True):
        if m:
            assert math.isclose(o, alpha * w + (1 - alpha) * i, rel_tol=1e-12, abs_tol=1e-300)
        else:
            assert o == i


def test_ema_update_edge_cases():
    imp, win = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, math.nan, 7.0])
    measured = torch.tensor([True, False, True])
    assert ema_update(imp, win, measured, 1.0).tolist() == [5.0, 2.0, 7.0]  # alpha=1: the window
    assert ema_update(imp, win, measured, 0.5).tolist() == [3.0, 2.0, 5.0]
    assert ema_update(imp, win, torch.zeros(3, dtype=torch.bool), 0.5).tolist() == [1.0, 2.0, 3.0]
    assert imp.tolist() == [1.0, 2.0, 3.0]  # not in place


def test_ema_update_first_measurement_replaces_a_missing_score():
    imp = torch.tensor([math.nan, math.nan, 2.0], dtype=F64)
    win = torch.tensor([0.25, 9.0, 4.0], dtype=F64)
    out = ema_update(imp, win, torch.tensor([True, False, True]), 0.5)
    assert out[0] == 0.25 and math.isnan(out[1]) and out[2] == 3.0

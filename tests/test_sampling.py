"""Property tests of grass_optim.sampling: scores -> probabilities -> draws of distinct blocks."""

from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from grass_optim.sampling import (
    GainSampler,
    GrassSampler,
    L1Sampler,
    Sampler,
    StaticSampler,
    UniformSampler,
    default_probe_steps,
    inclusion_probabilities,
    resolve_sampler,
    sample_without_replacement,
    scale_free_softmax,
    unused_settings,
)

F64 = torch.float64
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------- strategies
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e300, -1e300, 1e-300, -1e-300, 5e-324, -5e-324,
           1.7976931348623157e308, -1.7976931348623157e308, 2.2250738585072014e-308]
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
score = st.one_of(finite, st.sampled_from(SPECIAL))
scores_lists = st.lists(score, min_size=1, max_size=64)
temperatures = st.floats(min_value=1e-3, max_value=1e3)
explorations = st.floats(min_value=0.0, max_value=1.0)
seeds = st.integers(min_value=0, max_value=2**63 - 1)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def probability_vectors(draw, min_size: int = 1, max_size: int = 16, allow_zeros: bool = False):
    """Strictly positive (or, with ``allow_zeros``, non-negative with a positive entry) weights."""
    low = 0.0 if allow_zeros else 1e-6
    w = draw(st.lists(st.floats(min_value=low, max_value=1.0), min_size=min_size, max_size=max_size))
    assume(sum(w) > 0)
    p = t64(w)
    return p / p.sum()


# ------------------------------------------------------------------------------- scale_free_softmax
@FAST
@given(scores_lists, temperatures, explorations)
def test_softmax_is_a_distribution_for_any_finite_scores(scores, temperature, exploration):
    p = scale_free_softmax(t64(scores), temperature, exploration)
    assert p.dtype == F64
    assert p.shape == (len(scores),)
    assert bool(torch.isfinite(p).all())
    assert bool((p >= 0).all())
    assert abs(float(p.sum()) - 1.0) <= 1e-9


@pytest.mark.parametrize("scores", [
    [0.0], [5.0], [-5.0], [1e300, 1e300], [1e-300], [5e-324, 5e-324, 5e-324],
    [1.7976931348623157e308, -1.7976931348623157e308], [1e300, 1e-300, 0.0, -1e300],
    [0.0] * 1000, list(range(1000)),
])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
def test_softmax_extreme_scores(scores, temperature):
    p = scale_free_softmax(t64(scores), temperature, 0.0)
    assert bool(torch.isfinite(p).all()) and bool((p >= 0).all())
    assert abs(float(p.sum()) - 1.0) <= 1e-9


@FAST
@given(st.one_of(finite, st.sampled_from(SPECIAL)), st.integers(1, 200), temperatures, explorations)
def test_softmax_ties_give_uniform(value, length, temperature, exploration):
    """All-equal (including all-zero) scores: every entry identical, and 1/L up to rounding."""
    p = scale_free_softmax(torch.full((length,), value, dtype=F64), temperature, exploration)
    assert bool((p == p[0]).all()), p
    assert abs(float(p[0]) - 1.0 / length) <= 1e-15


def test_softmax_all_zero_is_exactly_uniform_small_cases():
    for length in (1, 2, 4, 8, 16):  # 1/L exact in binary: the result is bit-exact
        p = scale_free_softmax(torch.zeros(length, dtype=F64))
        assert torch.equal(p, torch.full((length,), 1.0 / length, dtype=F64))


def test_softmax_single_element():
    for value in (0.0, -3.0, 1e300, 5e-324):
        assert torch.equal(scale_free_softmax(t64([value]), 1e-3, 0.3), t64([1.0]))


def test_softmax_known_value():
    """s = m / mean(|m|): [1, 3] -> [0.5, 1.5]; then softmax(s / tau), mixed with the uniform."""
    tau, eps = 0.7, 0.2
    s = t64([0.5, 1.5]) / tau
    expected = (1 - eps) * torch.softmax(s, 0) + eps / 2
    torch.testing.assert_close(scale_free_softmax(t64([1.0, 3.0]), tau, eps), expected, rtol=1e-14, atol=0)


def test_softmax_accepts_other_dtypes_and_shapes():
    p = scale_free_softmax(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16))
    assert p.dtype == F64 and p.shape == (4,)
    torch.testing.assert_close(p, scale_free_softmax(t64([1.0, 2.0, 3.0, 4.0])))


# Scores whose magnitudes, also after scaling by c in [1e-100, 1e100], stay normal floats (no
# subnormal precision loss, no overflow): then only rounding separates the two results.
moderate = st.one_of(st.just(0.0), st.floats(1e-100, 1e100), st.floats(-1e100, -1e-100))


@FAST
@given(st.lists(moderate, min_size=1, max_size=32), st.floats(1e-100, 1e100), temperatures, explorations)
def test_softmax_is_scale_free(scores, c, temperature, exploration):
    """p(c * m) == p(m) for c > 0, within rtol 1e-8 (logits reach L / tau = 3.2e4: rounding of the
    mean is amplified by that much), atol 1e-12."""
    s = t64(scores)
    p = scale_free_softmax(s, temperature, exploration)
    q = scale_free_softmax(s * c, temperature, exploration)
    torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-12)


@FAST
@given(st.lists(moderate, min_size=1, max_size=32), st.integers(-60, 60), temperatures, explorations)
def test_softmax_scale_by_power_of_two_is_bit_exact(scores, j, temperature, exploration):
    s = t64(scores)
    assert torch.equal(scale_free_softmax(s * 2.0**j, temperature, exploration),
                       scale_free_softmax(s, temperature, exploration))


@FAST
@given(scores_lists, temperatures, explorations)
def test_softmax_exploration_floor(scores, temperature, exploration):
    p = scale_free_softmax(t64(scores), temperature, exploration)
    assert bool((p >= exploration / len(scores) - 1e-12).all())


@FAST
@given(temperatures, scores_lists)
def test_softmax_full_exploration_is_uniform(temperature, scores):
    p = scale_free_softmax(t64(scores), temperature, 1.0)
    assert bool((p == p[0]).all())
    torch.testing.assert_close(p, torch.full_like(p, 1.0 / len(scores)), rtol=1e-15, atol=0)


@FAST
@given(scores_lists, temperatures, explorations)
def test_softmax_is_monotone(scores, temperature, exploration):
    """A higher score never gets a lower probability (checked exactly, on every sorted pair)."""
    s = t64(scores)
    p = scale_free_softmax(s, temperature, exploration)
    order = torch.argsort(s, stable=True)
    ps, ss = p[order], s[order]
    for i in range(len(scores) - 1):
        if ss[i + 1] > ss[i]:
            assert ps[i + 1] >= ps[i], (ss[i].item(), ss[i + 1].item(), ps[i].item(), ps[i + 1].item())
        else:  # equal scores (including 0.0 and -0.0): equal probabilities
            assert ps[i + 1] == ps[i]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_softmax_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="finite"):
        scale_free_softmax(t64([1.0, bad, 2.0]))


def test_softmax_rejects_empty():
    with pytest.raises(ValueError, match="at least one"):
        scale_free_softmax(torch.zeros(0, dtype=F64))


def test_softmax_higher_temperature_flattens():
    s = t64([1.0, 2.0, 5.0])
    peaks = [float(scale_free_softmax(s, tau).max()) for tau in (0.1, 1.0, 10.0, 1000.0)]
    assert peaks == sorted(peaks, reverse=True)
    assert abs(peaks[-1] - 1 / 3) < 1e-3


# -------------------------------------------------------------------------- sample_without_replacement
@FAST
@given(probability_vectors(max_size=32), st.data(), seeds)
def test_draw_returns_k_distinct_sorted_indices(p, data, seed):
    k = data.draw(st.integers(1, p.numel()))
    idx = sample_without_replacement(p, k, gen(seed))
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert len(set(idx.tolist())) == k
    assert bool((idx >= 0).all()) and bool((idx < p.numel()).all())
    assert idx.tolist() == sorted(idx.tolist())


@FAST
@given(probability_vectors(max_size=32), st.data(), seeds)
def test_draw_is_deterministic_given_generator(p, data, seed):
    k = data.draw(st.integers(1, p.numel()))
    assert torch.equal(sample_without_replacement(p, k, gen(seed)), sample_without_replacement(p, k, gen(seed)))


def test_draw_generator_state_round_trip():
    p = scale_free_softmax(t64([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]))
    g = gen(1234)
    sample_without_replacement(p, 3, g)  # advance a little
    state = g.get_state()
    first = [sample_without_replacement(p, 3, g) for _ in range(20)]
    g.set_state(state)
    second = [sample_without_replacement(p, 3, g) for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # ... and the draws are not all the same (the generator does advance).
    assert len({tuple(t.tolist()) for t in first}) > 1
    # A fresh generator restored from the saved state agrees too.
    h = torch.Generator()
    h.set_state(state)
    assert torch.equal(sample_without_replacement(p, 3, h), first[0])


def test_draw_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    p = scale_free_softmax(t64([1.0, 2.0, 3.0, 4.0]), 0.5, 0.1)
    g = gen(7)
    a = [sample_without_replacement(p, 2, g) for _ in range(10)]
    for sampler in (GrassSampler(), StaticSampler(), UniformSampler(), Sampler()):
        sampler.draw(sampler.probabilities(t64([1.0, 2.0, 3.0, 4.0])), 2, g)
    inclusion_probabilities(p, 2)
    assert torch.equal(torch.random.get_rng_state(), before)
    # ... and the draws do not depend on the global RNG either.
    torch.manual_seed(999)
    g = gen(7)
    assert all(torch.equal(x, sample_without_replacement(p, 2, g)) for x in a)


@pytest.mark.parametrize("k", [0, -1, 5, 100])
def test_draw_bad_k_raises(k):
    p = torch.full((4,), 0.25, dtype=F64)
    with pytest.raises(ValueError, match=re.escape(f"Invalid k: {k}")):
        sample_without_replacement(p, k, gen(0))


@MEDIUM
@given(st.lists(st.booleans(), min_size=1, max_size=24), st.data(), seeds)
def test_draw_never_picks_zero_probability_when_enough_positive(positive, data, seed):
    assume(any(positive))
    w = t64([data.draw(st.floats(1e-6, 1.0)) if pos else 0.0 for pos in positive])
    n_pos = sum(positive)
    k = data.draw(st.integers(1, n_pos))
    g = gen(seed)
    for _ in range(5):
        idx = sample_without_replacement(w / w.sum(), k, g)
        assert all(positive[i] for i in idx.tolist())


def test_draw_with_k_equal_length_returns_everything():
    p = t64([0.7, 0.0, 0.2, 0.1, 0.0])
    assert sample_without_replacement(p, 5, gen(0)).tolist() == [0, 1, 2, 3, 4]


def test_draw_accepts_unnormalised_weights():
    """Only ratios matter (the docstring: "proportional to"): with the same noise, unnormalised
    weights give the same draw (every key shifts by log(sum), up to rounding)."""
    w = t64([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    for seed in range(50):
        assert torch.equal(sample_without_replacement(w, 3, gen(seed)),
                           sample_without_replacement(w / w.sum(), 3, gen(seed)))


def _empirical_inclusion(p: torch.Tensor, k: int, n: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    counts = torch.zeros(p.numel(), dtype=F64)
    for _ in range(n):
        counts[sample_without_replacement(p, k, g)] += 1
    return counts / n


def _assert_within_5_se(freq: torch.Tensor, q: torch.Tensor, n: int) -> None:
    """|freq - q| <= 5 standard errors sqrt(q(1-q)/n) (+1e-12 for q in {0, 1}). With a fixed seed
    the test is deterministic; 5 SE would be exceeded by chance with probability ~6e-7 per entry."""
    se = torch.sqrt(q * (1 - q) / n)
    assert bool((torch.abs(freq - q) <= 5 * se + 1e-12).all()), (freq, q, se)


@pytest.mark.parametrize(("weights", "k"), [
    ([0.05, 0.1, 0.15, 0.2, 0.5], 2),
    ([0.4, 0.3, 0.1, 0.1, 0.05, 0.05], 3),
    ([1.0, 1.0, 1.0, 8.0], 1),
])
def test_empirical_inclusion_matches_exact(weights, k):
    n = 20000
    p = t64(weights) / sum(weights)
    freq = _empirical_inclusion(p, k, n, seed=2024)
    _assert_within_5_se(freq, inclusion_probabilities(p, k), n)


def test_empirical_inclusion_grass_probabilities():
    n = 10000
    p = GrassSampler(temperature=0.5, exploration=0.05).probabilities(t64([0.1, 0.3, 0.2, 0.8, 0.05, 0.4, 0.1]))
    freq = _empirical_inclusion(p, 2, n, seed=11)
    _assert_within_5_se(freq, inclusion_probabilities(p, 2), n)


# ----------------------------------------------------------------------------- inclusion_probabilities
def test_inclusion_hand_computed():
    """p = (1/2, 3/10, 1/5), k = 2, drawing in order without replacement:
    P(0) = 1/2 + (3/10)(1/2)/(7/10) + (1/5)(1/2)/(4/5) = 1/2 + 3/14 + 1/8 = 47/56
    P(1) = 3/10 + (1/2)(3/10)/(1/2) + (1/5)(3/10)/(4/5) = 3/10 + 3/10 + 3/40 = 27/40
    P(2) = 1/5 + (1/2)(1/5)/(1/2) + (3/10)(1/5)/(7/10) = 1/5 + 1/5 + 3/35 = 17/35
    (47/56 + 27/40 + 17/35 = 2)."""
    assert Fraction(47, 56) + Fraction(27, 40) + Fraction(17, 35) == 2
    expected = t64([47 / 56, 27 / 40, 17 / 35])
    torch.testing.assert_close(inclusion_probabilities(t64([0.5, 0.3, 0.2]), 2), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(inclusion_probabilities(t64([0.5, 0.3, 0.2]), 1), t64([0.5, 0.3, 0.2]),
                               rtol=1e-14, atol=0)


def _brute_force_inclusion(p: list[float], k: int) -> list[float]:
    """Sum over all ordered k-prefixes of the draw order (independent of the library's subset DP)."""
    out = [0.0] * len(p)
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, sum(p)
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            out[i] += prob
    return out


@MEDIUM
@given(probability_vectors(min_size=1, max_size=6), st.data())
def test_inclusion_matches_brute_force(p, data):
    k = data.draw(st.integers(0, p.numel()))
    expected = t64(_brute_force_inclusion(p.tolist(), k))
    torch.testing.assert_close(inclusion_probabilities(p, k), expected, rtol=1e-9, atol=1e-12)


@MEDIUM
@given(probability_vectors(min_size=1, max_size=9, allow_zeros=True), st.data())
def test_inclusion_sums_to_k_and_is_a_probability(p, data):
    k = data.draw(st.integers(0, p.numel()))
    q = inclusion_probabilities(p, k)
    assert abs(float(q.sum()) - k) <= 1e-9
    assert bool((q >= -1e-12).all()) and bool((q <= 1 + 1e-12).all())
    if k == p.numel():
        torch.testing.assert_close(q, torch.ones_like(q))
    if k == 0:
        assert torch.equal(q, torch.zeros_like(q))


@pytest.mark.parametrize("length", [1, 2, 5, 9, 16])
def test_inclusion_uniform_is_k_over_l(length):
    p = UniformSampler().probabilities(torch.rand(length, dtype=F64, generator=gen(length)))
    for k in (range(length + 1) if length < 16 else (0, 1, 2, 16)):  # the enumeration is 2^L
        torch.testing.assert_close(inclusion_probabilities(p, k), torch.full((length,), k / length, dtype=F64))


def test_inclusion_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at most 16"):
        inclusion_probabilities(torch.full((17,), 1 / 17, dtype=F64), 1)
    with pytest.raises(ValueError, match=re.escape("Invalid k: 4")):
        inclusion_probabilities(torch.full((3,), 1 / 3, dtype=F64), 4)
    with pytest.raises(ValueError, match=re.escape("Invalid k: -1")):
        inclusion_probabilities(torch.full((3,), 1 / 3, dtype=F64), -1)


# ------------------------------------------------------------------------------------------- samplers
@FAST
@given(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=32), st.data())
def test_static_refresh_never_changes_scores(importance, data):
    n = len(importance)
    window = t64(data.draw(st.lists(st.floats(0.0, 1e3), min_size=n, max_size=n)))
    measured = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    imp = t64(importance)
    out = StaticSampler(ema=data.draw(st.floats(0.01, 1.0))).refresh(imp.clone(), window, measured)
    assert torch.equal(out, imp)
    assert torch.equal(Sampler().refresh(imp.clone(), window, measured), imp)


def test_static_refresh_adopts_only_a_first_measurement():
    imp = torch.tensor([math.nan, math.nan, 2.0], dtype=F64)
    out = StaticSampler().refresh(imp, torch.tensor([5.0, 6.0, 7.0], dtype=F64), torch.tensor([True, False, True]))
    assert out[0] == 5.0 and math.isnan(out[1]) and out[2] == 2.0


@FAST
@given(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=32), st.data(), st.floats(1e-6, 1.0))
def test_grass_refresh_is_ema_on_measured_only(importance, data, ema):
    n = len(importance)
    window = data.draw(st.lists(st.floats(0.0, 1e3), min_size=n, max_size=n))
    measured = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    out = GrassSampler(ema=ema).refresh(t64(importance), t64(window), torch.tensor(measured))
    for i in range(n):
        if measured[i]:
            assert math.isclose(float(out[i]), ema * window[i] + (1 - ema) * importance[i], rel_tol=1e-12,
                                abs_tol=1e-300)
        else:
            assert float(out[i]) == importance[i]


def test_grass_refresh_ignores_window_of_unmeasured_blocks():
    out = GrassSampler(ema=0.5).refresh(t64([1.0, 2.0]), t64([math.nan, 4.0]), torch.tensor([False, True]))
    assert out.tolist() == [1.0, 3.0]


@FAST
@given(st.lists(finite, min_size=1, max_size=64))
def test_uniform_probabilities_ignore_scores(scores):
    p = UniformSampler().probabilities(t64(scores))
    assert p.dtype == F64 and p.shape == (len(scores),)
    assert bool((p == 1.0 / len(scores)).all())


def test_uniform_sampler_flags_and_empirical_equal_inclusion():
    assert UniformSampler.uses_importance is False and GrassSampler.uses_importance is True
    n, L, k = 10000, 7, 3
    s = UniformSampler()
    p = s.probabilities(t64([5.0, 0.0, 1e9, 1.0, 2.0, 3.0, 1e-9]))
    g = gen(3)
    counts = torch.zeros(L, dtype=F64)
    for _ in range(n):
        counts[s.draw(p, k, g)] += 1
    _assert_within_5_se(counts / n, torch.full((L,), k / L, dtype=F64), n)


def test_grass_probabilities_are_the_scale_free_softmax():
    s = t64([0.3, 0.1, 0.9, 0.0])
    for tau, eps in ((1.0, 0.0), (0.25, 0.1), (4.0, 1.0)):
        torch.testing.assert_close(GrassSampler(tau, 0.5, eps).probabilities(s), scale_free_softmax(s, tau, eps),
                                   rtol=0, atol=0)
        torch.testing.assert_close(StaticSampler(tau, 0.5, eps).probabilities(s), scale_free_softmax(s, tau, eps),
                                   rtol=0, atol=0)


def test_base_sampler_draw_is_sample_without_replacement():
    p = t64([0.1, 0.2, 0.3, 0.4])
    for seed in range(10):
        assert torch.equal(Sampler().draw(p, 2, gen(seed)), sample_without_replacement(p, 2, gen(seed)))


# A block with 50x the score of the others, temperature 1, no exploration: its draw probability is
# 1 / (1 + (L-1) exp(-49 L / (49 + L))), which grows quickly with L. Exact values (k = 1):
# L=2: 0.872, L=4: 0.931, L=6: 0.977, L=8: 0.9928, L=12: 0.99928, L=16: 0.99991; for k >= 2 and
# L >= 4 it is >= 0.9967. Threshold tested: P(included) >= 0.99 for every L >= 8 and every k.
@pytest.mark.parametrize("length", [8, 12, 16])
def test_dominant_block_is_almost_always_included(length):
    s = torch.ones(length, dtype=F64)
    s[length // 2] = 50.0
    p = GrassSampler(temperature=1.0).probabilities(s)
    # Inclusion only grows with k (the first k draws are a prefix of the first k + 1), so small k
    # are the hard cases; the enumeration is exponential in k, so check k = 1..3 and k = L.
    incl = [float(inclusion_probabilities(p, k)[length // 2]) for k in (1, 2, 3, length)]
    assert incl == sorted(incl) and incl[0] >= 0.99
    closed_form = 1 / (1 + (length - 1) * math.exp(-49 * length / (49 + length)))
    assert math.isclose(float(p[length // 2]), closed_form, rel_tol=1e-12)
    n = 2000
    g = gen(length)
    hits = sum(length // 2 in sample_without_replacement(p, 1, g).tolist() for _ in range(n))
    assert hits / n >= 0.98


def test_dominant_block_small_l_exact_values():
    """The scale-free normalisation makes 50x less decisive when L is small (see the table above)."""
    got = {}
    for length in (2, 4, 6):
        s = torch.ones(length, dtype=F64)
        s[0] = 50.0
        got[length] = float(inclusion_probabilities(scale_free_softmax(s), 1)[0])
    assert got[2] == pytest.approx(0.8723, abs=1e-4)
    assert got[4] == pytest.approx(0.9308, abs=1e-4)
    assert got[6] == pytest.approx(0.9767, abs=1e-4)


@pytest.mark.parametrize(("kwargs", "exc", "name"), [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": True}, TypeError, "temperature"),
    ({"temperature": math.inf}, ValueError, "temperature"),
    ({"temperature": math.nan}, ValueError, "temperature"),
    ({"ema": 0.0}, ValueError, "ema"),
    ({"ema": 1.5}, ValueError, "ema"),
    ({"ema": "0.5"}, TypeError, "ema"),
    ({"exploration": -0.1}, ValueError, "exploration"),
    ({"exploration": 1.1}, ValueError, "exploration"),
    ({"exploration": None}, TypeError, "exploration"),
])
def test_grass_sampler_validates(kwargs, exc, name):
    (value,) = kwargs.values()
    with pytest.raises(exc, match=re.escape(f"Invalid {name}: {value!r}")):
        GrassSampler(**kwargs)


def test_sampler_repr():
    assert repr(GrassSampler(2.0, 0.25, 0.1)) == "GrassSampler(temperature=2.0, ema=0.25, exploration=0.1)"
    assert repr(UniformSampler()) == "UniformSampler()"


# -------------------------------------------------------------------------------------- resolve_sampler
HYPER = {"temperature": 0.5, "ema": 0.25, "exploration": 0.1}


def test_resolve_sampler_strings():
    g = resolve_sampler("grass", **HYPER)
    s = resolve_sampler("static", **HYPER)
    u = resolve_sampler("uniform", **HYPER)
    assert type(g) is GrassSampler and type(s) is StaticSampler and type(u) is UniformSampler
    for x in (g, s):
        assert (x.temperature, x.ema, x.exploration) == (0.5, 0.25, 0.1)


@pytest.mark.parametrize("name", ["grassy", "GRASS", "", "lisa"])
def test_resolve_sampler_bad_string(name):
    with pytest.raises(ValueError, match=re.escape(f"Invalid sampler: {name!r}")):
        resolve_sampler(name, **HYPER)


# The sampler hyperparameters GrassAdamW takes, checked whatever the sampler (even where unused).
BAD_HYPER = [
    # (argument, value, exception)
    ("temperature", 0.0, ValueError),
    ("temperature", 0, ValueError),
    ("temperature", -0.5, ValueError),
    ("temperature", math.inf, ValueError),
    ("temperature", math.nan, ValueError),
    ("temperature", True, TypeError),
    ("temperature", "1.0", TypeError),
    ("temperature", None, TypeError),
    ("ema", 0.0, ValueError),
    ("ema", 1.0000001, ValueError),
    ("ema", -0.1, ValueError),
    ("ema", math.nan, ValueError),
    ("ema", False, TypeError),
    ("ema", [0.5], TypeError),
    ("exploration", -1e-9, ValueError),
    ("exploration", 1.5, ValueError),
    ("exploration", math.inf, ValueError),
    ("exploration", True, TypeError),
]


@pytest.mark.parametrize("sampler", ["grass", "static", "uniform", "object"])
@pytest.mark.parametrize(("name", "value", "exc"), BAD_HYPER, ids=[f"{n}={v!r}" for n, v, _ in BAD_HYPER])
def test_resolve_sampler_validates_hyperparameters_for_every_sampler(sampler, name, value, exc):
    arg = UniformSampler() if sampler == "object" else sampler
    with pytest.raises(exc, match=re.escape(f"Invalid {name}: {value!r}")):
        resolve_sampler(arg, **{**HYPER, name: value})


def test_resolve_sampler_accepts_boundaries_as_floats():
    g = resolve_sampler("grass", temperature=1, ema=1, exploration=1)
    assert (g.temperature, g.ema, g.exploration) == (1.0, 1.0, 1.0)
    assert all(type(x) is float for x in (g.temperature, g.ema, g.exploration))
    assert resolve_sampler("grass", temperature=1e-12, ema=1e-12, exploration=0).exploration == 0.0


def test_each_sampler_declares_the_settings_it_uses_and_its_signal():
    assert set(GrassSampler.settings) == {"temperature", "ema", "exploration", "update_every", "refresh_all"}
    assert set(L1Sampler.settings) == set(GrassSampler.settings)
    assert set(StaticSampler.settings) == {"temperature", "exploration", "refresh_all"}
    assert set(GainSampler.settings) == {"temperature", "ema", "exploration", "update_every"}  # no refresh_all
    assert UniformSampler.settings == ()
    assert Sampler.settings == ("update_every", "refresh_all")  # a custom refresh runs every update_every steps
    assert [s.signal for s in (Sampler, GrassSampler, StaticSampler, L1Sampler, GainSampler)] == [
        "rms", "rms", "rms", "l1", "gain"]
    assert [default_probe_steps(resolve_sampler(n)) for n in ("grass", "static", "l1", "gain", "uniform")] == [
        10, 10, 10, 0, 0]


def test_resolve_sampler_names_and_signals():
    assert type(resolve_sampler("l1", **HYPER)) is L1Sampler and type(resolve_sampler("gain", **HYPER)) is GainSampler
    with pytest.raises(ValueError, match="expected 'grass', 'static', 'uniform', 'l1', 'gain' or an object"):
        resolve_sampler("rms")

    class OddSignal(GrassSampler):
        signal = "l2"

    with pytest.raises(ValueError, match="its signal 'l2' is not one of 'rms', 'l1', 'gain'"):
        resolve_sampler(OddSignal())


GIVEN = {"temperature": 2.0, "ema": 0.3, "exploration": 0.1, "update_every": 5, "refresh_all": True}


@pytest.mark.parametrize(("sampler", "unused"), [
    ("grass", []),
    ("static", ["ema", "update_every"]),
    ("uniform", ["temperature", "ema", "exploration", "update_every", "refresh_all"]),
    ("gain", ["refresh_all"]),
    (GrassSampler(), ["temperature", "ema", "exploration"]),  # an object carries its own hyperparameters
    (UniformSampler(), ["temperature", "ema", "exploration", "update_every", "refresh_all"]),
    ("duck", ["temperature", "ema", "exploration"]),  # no `settings`: treated as a Sampler
], ids=["grass", "static", "uniform", "gain", "GrassSampler()", "UniformSampler()", "duck-typed"])
def test_unused_settings(sampler, unused):
    arg = _DuckSampler() if sampler == "duck" else sampler
    assert unused_settings(arg, resolve_sampler(arg), GIVEN) == unused


class _NoDraw:
    def refresh(self, importance, window_mean, measured):
        return importance

    def probabilities(self, importance):
        return importance


class _DrawNotCallable(_NoDraw):
    draw = 3


@pytest.mark.parametrize(("obj", "missing"), [
    (object(), "refresh, probabilities, draw()"),
    (None, "refresh, probabilities, draw()"),
    (3, "refresh, probabilities, draw()"),
    (_NoDraw(), "draw()"),
    (_DrawNotCallable(), "draw()"),
])
def test_resolve_sampler_rejects_objects_lacking_methods(obj, missing):
    with pytest.raises(TypeError, match=re.escape(f"lacks {missing}")):
        resolve_sampler(obj, **HYPER)


class _DuckSampler:
    """A user sampler that does not subclass Sampler: always the first k blocks."""

    def refresh(self, importance, window_mean, measured):
        return importance

    def probabilities(self, importance):
        return torch.full_like(importance, 1.0 / importance.numel())

    def draw(self, probabilities, k, generator):
        return torch.arange(k)


def test_resolve_sampler_accepts_duck_typed_object():
    duck = _DuckSampler()
    assert resolve_sampler(duck, **HYPER) is duck
    sub = GrassSampler(temperature=3.0)
    assert resolve_sampler(sub, **HYPER) is sub  # an object is used as is, not rebuilt from HYPER

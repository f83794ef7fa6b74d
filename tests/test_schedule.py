"""Property tests of grass_optim.schedule: the GRASS schedule as a plain object, without a model.

Each example draws a schedule (blocks and their sizes, gamma, T_p, T_s, T_u, sampler, seed) and a
run of per-step measurements (random squared norms, some blocks unmeasured, some values NaN or
inf), then checks the invariants the optimizer relies on.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grass_optim.config import GrassConfig
from grass_optim.sampling import resolve_sampler
from grass_optim.schedule import REDRAW_EVENTS, VECTORS, Schedule

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def schedules(draw):
    """(config kwargs, numel, sampler name, seed)."""
    numel = draw(st.lists(st.sampled_from([0, 1, 7, 50]), min_size=1, max_size=8))
    if not any(numel):
        numel[0] = 3
    sampleable = sum(1 for n in numel if n)
    cfg = {"active_layers": draw(st.integers(1, sampleable)), "switch_every": draw(st.integers(1, 6)),
           "probe_steps": draw(st.integers(0, 4)), "update_every": draw(st.integers(1, 6))}
    return cfg, numel, draw(st.sampled_from(["grass", "static", "uniform"])), draw(st.integers(0, 2**63 - 1))


measurements = st.lists(st.lists(st.one_of(st.floats(0.0, 1e6), st.sampled_from([math.nan, math.inf, 0.0])),
                                 min_size=8, max_size=8), min_size=1, max_size=30)


def _build(cfg, numel, sampler, seed) -> Schedule:
    return Schedule(GrassConfig.build(**cfg), resolve_sampler(sampler), numel, seed)


def _one_step(s: Schedule, values: list[float], skip: int) -> str | None:
    """Measure the blocks that get gradients (one of them left out when ``skip`` says so), advance."""
    blocks = s.active_blocks
    sq = torch.zeros(s.num_blocks)
    hits = torch.zeros(s.num_blocks, dtype=torch.int64)
    for j, i in enumerate(blocks):
        if skip and j == skip % len(blocks):
            continue  # a block whose parameters got no gradient this step
        sq[i], hits[i] = values[i], 1
    s.record(sq, hits)
    return s.advance()


def _trace(s: Schedule, steps: list[list[float]]) -> list[tuple]:
    out = []
    for k, values in enumerate(steps):
        event = _one_step(s, values, skip=k % 3)
        out.append((s.step, event, s.active_blocks, s.importance.tolist(), s.current_probabilities.tolist()))
    return out


@PROPS
@given(schedules(), measurements)
def test_events_fall_exactly_on_the_schedule(spec, steps):
    cfg, numel, sampler, seed = spec
    s = _build(cfg, numel, sampler, seed)
    T_p, T_s, T_u = cfg["probe_steps"], cfg["switch_every"], cfg["update_every"]
    for _ in steps:
        event = _one_step(s, [1.0] * 8, skip=0)
        n = s.step - T_p
        if n < 0:
            expected = None
        elif n == 0 and T_p > 0:
            expected = "probe_end"
        else:
            refresh, redraw = n % T_u == 0, n % T_s == 0
            expected = {(True, True): "refresh+redraw", (True, False): "refresh", (False, True): "redraw"}.get(
                (refresh, redraw))
        assert event == expected, (s.step, cfg)


@PROPS
@given(schedules(), st.sampled_from(["grass", "static", "l1", "gain"]), st.integers(0, 12))
def test_refresh_all_gives_every_block_gradients_exactly_on_the_step_before_each_refresh(spec, sampler, steps):
    cfg, numel, _, seed = spec
    s = _build({**cfg, "refresh_all": True}, numel, sampler, seed)
    sampleable = tuple(i for i, n in enumerate(numel) if n)
    for _ in range(steps):
        n_next = s.step + 1 - cfg["probe_steps"]
        expect_all = sampler != "gain" and not s.is_probing and n_next > 0 and n_next % cfg["update_every"] == 0
        assert s.measures_all == expect_all
        assert s.gradient_blocks == (sampleable if (expect_all or s.is_probing) else s.active_blocks)
        assert s.active_blocks == (sampleable if s.is_probing else s.active)  # only the active set updates
        _one_step(s, [1.0] * 8, skip=0)


@PROPS
@given(schedules(), measurements)
def test_exactly_gamma_sampleable_blocks_are_active_after_probing(spec, steps):
    cfg, numel, sampler, seed = spec
    s = _build(cfg, numel, sampler, seed)
    sampleable = {i for i, n in enumerate(numel) if n}
    active_sets = []
    for values in steps:
        _one_step(s, values, skip=0)
        blocks = s.active_blocks
        if s.is_probing:
            assert set(blocks) == sampleable
        else:
            assert len(blocks) == len(set(blocks)) == cfg["active_layers"]
            assert set(blocks) <= sampleable and list(blocks) == sorted(blocks)
        active_sets.append(blocks)
        p = s.current_probabilities
        assert torch.isfinite(p).all() and (p >= 0).all() and math.isclose(float(p.sum()), 1.0, rel_tol=1e-9)
        assert all(p[i] == 0 for i in range(len(numel)) if i not in sampleable)
    # The active set changes only at the steps that redraw.
    for (before, after), k in zip(zip(active_sets, active_sets[1:], strict=False), range(2, len(steps) + 1),
                                  strict=False):
        n = k - cfg["probe_steps"]
        if before != after and n > 0:
            assert n % cfg["switch_every"] == 0


@PROPS
@given(schedules(), measurements)
def test_scores_change_only_for_blocks_measured_in_the_window(spec, steps):
    cfg, numel, sampler, seed = spec
    s = _build(cfg, numel, sampler, seed)
    measured: set[int] = set()
    for k, values in enumerate(steps):
        before = s.importance
        blocks, skip = s.active_blocks, k % 3
        measured |= {i for j, i in enumerate(blocks) if not (skip and j == skip % len(blocks))
                     and math.isfinite(values[i])}
        event = _one_step(s, values, skip=skip)
        changed = {i for i in range(len(numel)) if not _same(before[i], s.importance[i])}
        if event in ("refresh", "refresh+redraw", "probe_end"):
            assert changed <= measured, (changed, measured)
            measured = set()
        else:
            assert not changed
        finite_or_unscored = torch.isfinite(s.importance) | torch.isnan(s.importance)
        assert finite_or_unscored.all()
        assert all(s.importance[i] == 0 for i, n in enumerate(numel) if n == 0)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a == b) or bool(torch.isnan(a) and torch.isnan(b))


@PROPS
@given(schedules(), measurements, st.data())
def test_resume_at_any_step_continues_identically(spec, steps, data):
    cfg, numel, sampler, seed = spec
    cut = data.draw(st.integers(0, len(steps)))
    reference = _trace(_build(cfg, numel, sampler, seed), steps)
    first = _build(cfg, numel, sampler, seed)
    trace = _trace(first, steps[:cut])
    saved = first.state_dict()
    resumed = _build(cfg, numel, sampler, seed + 1)  # another seed: everything must come from the checkpoint
    resumed.load_state_dict(saved)
    offset = len(trace)
    for k, values in enumerate(steps[cut:]):
        event = _one_step(resumed, values, skip=(offset + k) % 3)
        trace.append((resumed.step, event, resumed.active_blocks, resumed.importance.tolist(),
                      resumed.current_probabilities.tolist()))
    assert _nan_safe(trace) == _nan_safe(reference)


def _nan_safe(trace):
    return [(step, event, active, [None if math.isnan(x) else x for x in imp], p)
            for step, event, active, imp, p in trace]


def test_state_dict_lists_every_field_once_and_hands_out_copies():
    s = _build({"active_layers": 2, "switch_every": 2, "probe_steps": 1, "update_every": 1}, [3, 3, 3], "grass", 0)
    sd = s.state_dict()
    assert set(VECTORS) <= set(sd)
    for name in VECTORS:
        assert sd[name] is not getattr(s, name) and sd[name].data_ptr() != getattr(s, name).data_ptr()
        assert sd[name].device.type == "cpu"
    assert sd["config"] == {"active_layers": 2, "switch_every": 2, "probe_steps": 1, "update_every": 1,
                            "refresh_all": False}


def test_a_version_1_checkpoint_is_read():
    s = _build({"active_layers": 1, "switch_every": 2, "probe_steps": 2, "update_every": 2}, [3, 3, 3], "grass", 0)
    s.record(torch.tensor([4.0, 9.0, 1.0]), torch.tensor([1, 1, 1]))
    s.hook_sum += torch.tensor([1.0, 2.0, 3.0])
    v2 = s.state_dict()
    v1 = {{"hook_sum": "probe_sq", "hook_hits": "probe_hits"}.get(k, k): v for k, v in v2.items()} | {"version": 1}
    fresh = _build({"active_layers": 1, "switch_every": 2, "probe_steps": 2, "update_every": 2}, [3, 3, 3], "grass", 1)
    fresh.load_state_dict(v1)
    _assert_same_state(fresh.state_dict(), v2)


def test_check_state_dict_names_the_problem_and_changes_nothing():
    s = _build({"active_layers": 1, "switch_every": 2, "probe_steps": 0, "update_every": 2}, [3, 3, 3], "grass", 0)
    good = s.state_dict()
    before = s.state_dict()
    cases = [
        ({k: v for k, v in good.items() if k != "generator"}, "the 'grass' entry lacks generator"),
        ({**good, "version": 99}, "GRASS state version 99"),
        ({**good, "num_layers": 4, "layer_numel": [3, 3, 3, 3]}, "saved for a model with 4 blocks"),
        ({**good, "active": [5]}, r"active blocks \[5\] are not trainable blocks"),
        ({**good, "window_sum": torch.zeros(2)}, r"'window_sum' is \(2,\) \(expected a tensor of shape \(3,\)\)"),
        ({**good, "importance": [0.0, 0.0, 0.0]}, r"'importance' is list"),
        ([], "the 'grass' entry is a list"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            s.load_state_dict(bad)
    _assert_same_state(before, s.state_dict())


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, b[k], rtol=0, atol=0, equal_nan=True, msg=k)
        else:
            assert v == b[k], k


def test_samplers_returning_bad_values_are_refused():
    class BadDraw:
        settings = ()

        def refresh(self, importance, window_mean, measured):
            return importance

        def probabilities(self, importance):
            return torch.ones_like(importance)

        def draw(self, probabilities, k, generator):
            return [0] * k

    cfg = GrassConfig.build(active_layers=2, switch_every=1, probe_steps=0)
    with pytest.raises(RuntimeError, match=r"sampler.draw returned \[0, 0\] \(expected 2 distinct indices"):
        Schedule(cfg, BadDraw(), [3, 3, 3], seed=0)


def test_moving_to_a_device_keeps_the_values():
    s = _build({"active_layers": 1, "switch_every": 2, "probe_steps": 1, "update_every": 2}, [3, 3], "grass", 0)
    s.record(torch.tensor([4.0, 9.0]), torch.tensor([1, 1]))
    before = s.state_dict()
    s.to("cpu")
    _assert_same_state(before, s.state_dict())
    assert {"probe_end", "redraw", "refresh+redraw"} == REDRAW_EVENTS

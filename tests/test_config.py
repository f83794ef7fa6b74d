"""Tests of grass_optim.config: the validation helpers and GrassConfig (schedule and placement settings).

The sampler's own hyperparameters (temperature, ema, exploration) are validated by
``sampling.resolve_sampler``: see tests/test_sampling.py.
"""

from __future__ import annotations

import re

import pytest

from grass_optim.config import (
    DEFAULT_ACTIVE_LAYERS,
    DEFAULT_OUTSIDE_BLOCKS,
    DEFAULT_PROBE_LOW_MEMORY,
    DEFAULT_PROBE_STEPS,
    DEFAULT_SWITCH_EVERY,
    GrassConfig,
    check_history,
)

GOOD = {"active_layers": 2, "switch_every": 50, "probe_steps": None, "update_every": None, "outside_blocks": "train",
        "probe_low_memory": True}


def _build(default_probe_steps: int = DEFAULT_PROBE_STEPS, **overrides):
    return GrassConfig.build(**{**GOOD, **overrides}, default_probe_steps=default_probe_steps)


BAD = [
    # (argument, value, exception)
    ("active_layers", 0, ValueError),
    ("active_layers", -1, ValueError),
    ("active_layers", True, TypeError),  # bools are not ints here
    ("active_layers", 2.0, TypeError),
    ("active_layers", "2", TypeError),
    ("active_layers", None, TypeError),
    ("switch_every", 0, ValueError),
    ("switch_every", False, TypeError),
    ("switch_every", 10.5, TypeError),
    ("probe_steps", -1, ValueError),
    ("probe_steps", True, TypeError),
    ("probe_steps", 1.0, TypeError),
    ("update_every", 0, ValueError),
    ("update_every", True, TypeError),
    ("update_every", "5", TypeError),
    ("outside_blocks", "Train", ValueError),
    ("outside_blocks", "none", ValueError),
    ("outside_blocks", "", ValueError),
    ("probe_low_memory", 1, TypeError),
    ("probe_low_memory", "yes", TypeError),
    ("probe_low_memory", None, TypeError),
    ("refresh_all", 1, TypeError),
    ("refresh_all", "yes", TypeError),
    ("offload", "gpu", ValueError),
    ("offload", 1, ValueError),
    ("offload_overlap", 1, TypeError),
    ("offload_overlap", None, TypeError),
]


@pytest.mark.parametrize(("name", "value", "exc"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_config_rejects_bad_values(name, value, exc):
    with pytest.raises(exc, match=re.escape(f"Invalid {name}: {value!r}")):
        _build(**{name: value})


@pytest.mark.parametrize("value", [1, None, 2.5])
def test_config_rejects_non_string_outside_blocks(value):
    """A non-string choice is rejected with a message naming it."""
    with pytest.raises(TypeError, match=re.escape(f"Invalid outside_blocks: {value!r}")):
        _build(outside_blocks=value)


def test_config_defaults_and_resolution():
    cfg = _build()
    assert cfg == GrassConfig()  # the dataclass defaults and build() agree
    assert (cfg.active_layers, cfg.switch_every, cfg.probe_steps, cfg.update_every) == (
        DEFAULT_ACTIVE_LAYERS, DEFAULT_SWITCH_EVERY, DEFAULT_PROBE_STEPS, DEFAULT_SWITCH_EVERY)
    assert (cfg.outside_blocks, cfg.probe_low_memory, cfg.offload, cfg.refresh_all) == (
        DEFAULT_OUTSIDE_BLOCKS, DEFAULT_PROBE_LOW_MEMORY, None, False)
    assert _build(default_probe_steps=0).probe_steps == 0  # e.g. the uniform sampler: no probing
    assert _build(default_probe_steps=0, probe_steps=3).probe_steps == 3  # an explicit value wins
    assert _build(switch_every=7).update_every == 7  # update_every follows switch_every
    assert _build(switch_every=7, update_every=3).update_every == 3
    assert [_build(offload=v).offload for v in (None, False, True, "inactive", "stream")] == [
        None, None, "inactive", "inactive", "stream"]
    assert cfg.schedule_settings() == {"active_layers": 2, "switch_every": 50, "probe_steps": 10, "update_every": 50,
                                       "refresh_all": False}


def test_config_accepts_boundaries():
    cfg = _build(active_layers=1, switch_every=1, probe_steps=0, update_every=1, outside_blocks="freeze",
                 probe_low_memory=False)
    assert (cfg.active_layers, cfg.switch_every, cfg.probe_steps, cfg.update_every) == (1, 1, 0, 1)


def test_config_is_frozen():
    cfg = _build()
    with pytest.raises(AttributeError):
        cfg.active_layers = 3  # type: ignore[misc]


@pytest.mark.parametrize(("value", "error"), [("step", ValueError), ("events", ValueError), (1, TypeError),
                                              (None, TypeError)])
def test_history_setting_is_checked(value, error):
    with pytest.raises(error, match=re.escape(f"Invalid history: {value!r} (expected True, False or 'steps')")):
        check_history(value)
    for ok in (True, False, "steps"):
        check_history(ok)

"""Every default of GrassAdamW, in one place, the validation helpers, and the schedule's settings.

The reasons for each default are in ``docs/algorithm.md`` ("Defaults"); keep the two in step. The
sampler's own hyperparameters (temperature, ema, exploration) have their defaults here too, but
live in the sampler object (``sampling.py``), not in :class:`GrassConfig`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

# AdamW's own defaults, used when GrassAdamW builds the AdamW itself (``base_optimizer=None``).
DEFAULT_LR = 1e-3
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
DEFAULT_WEIGHT_DECAY = 1e-2

# GRASS hyperparameters (GRASS.md notation in brackets).
DEFAULT_ACTIVE_LAYERS = 2  # gamma: LISA's usual choice; the paper's ablations use a few blocks
DEFAULT_SWITCH_EVERY = 50  # T_s: LISA's interval K (optimizer steps between redraws)
DEFAULT_PROBE_STEPS = 10  # T_p: enough steps for a stable per-block mean; 0 for "uniform"
DEFAULT_TEMPERATURE = 1.0  # tau, applied to scores divided by their mean (scale-free)
DEFAULT_EMA = 0.5  # alpha: weight of the newest window in the refresh
DEFAULT_EXPLORATION = 0.0  # floor mixed with uniform; 0 keeps the published method
DEFAULT_OUTSIDE_BLOCKS = "train"  # embeddings/norm/head are always trained, as in LISA
DEFAULT_PROBE_LOW_MEMORY = True  # free each gradient as soon as its norm is taken while probing
DEFAULT_REFRESH_ALL = False  # refresh only the blocks trained in the window: the published method
DEFAULT_OFFLOAD = None  # state stays where torch.optim puts it unless asked
DEFAULT_OFFLOAD_OVERLAP = True  # copies run on side streams, overlapped with compute
# update_every (T_u, steps between refreshes of the scores) defaults to switch_every: the scores are
# refreshed right before each redraw, from exactly the window the leaving blocks were trained in.

OUTSIDE_BLOCKS_CHOICES = ("train", "freeze")
SAMPLER_CHOICES = ("grass", "static", "uniform")
OFFLOAD_MODES = ("inactive", "stream")


def resolve_offload(offload: Any) -> str | None:
    """``None``/``False`` -> off, ``True`` -> ``"inactive"``, or one of :data:`OFFLOAD_MODES`."""
    if offload is None or offload is False:
        return None
    if offload is True:
        return "inactive"
    if isinstance(offload, str) and offload in OFFLOAD_MODES:
        return offload
    raise ValueError(f"Invalid offload: {offload!r} (expected None, False, True, 'inactive' or 'stream')")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is an int in ``[low, high]``."""
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if not _is_int(value):
        raise TypeError(f"Invalid {name}: {value!r} (expected {allowed})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"Invalid {name}: {value!r} (expected {allowed})")


def check_real(name: str, value: Any, low: float, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a finite real in the given range."""
    lo = "(" if low_open else "["
    if high is None:
        allowed = f"a finite number {'>' if low_open else '>='} {low}"
    else:
        allowed = f"a finite number in {lo}{low}, {high}{')' if high_open else ']'}"
    if not _is_real(value):
        raise TypeError(f"Invalid {name}: {value!r} (expected {allowed})")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected {allowed})")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"Invalid {name}: {value!r} (expected {allowed})")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r} (expected True or False)")


def check_history(value: Any) -> None:
    if value is True or value is False or value == "steps":
        return
    raise (ValueError if isinstance(value, str) else TypeError)(
        f"Invalid history: {value!r} (expected True, False or 'steps')")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")


# Settings that change the schedule: a resume with other values does not continue the same run.
SCHEDULE_FIELDS = ("active_layers", "switch_every", "probe_steps", "update_every", "refresh_all")


@dataclass(frozen=True)
class GrassConfig:
    """The validated schedule and placement settings. Built by :class:`~grass_optim.GrassAdamW`.

    ``probe_steps`` and ``update_every`` are resolved here (``None`` means the documented default),
    so the rest of the code never sees ``None``. ``active_layers`` is checked against the number of
    blocks by the optimizer, which is the first to know it. The sampler's hyperparameters
    (temperature, ema, exploration) belong to the sampler: ``opt.sampler``.
    """

    active_layers: int = DEFAULT_ACTIVE_LAYERS
    switch_every: int = DEFAULT_SWITCH_EVERY
    probe_steps: int = DEFAULT_PROBE_STEPS
    update_every: int = DEFAULT_SWITCH_EVERY
    refresh_all: bool = DEFAULT_REFRESH_ALL
    outside_blocks: str = DEFAULT_OUTSIDE_BLOCKS
    probe_low_memory: bool = DEFAULT_PROBE_LOW_MEMORY
    offload: str | None = DEFAULT_OFFLOAD
    offload_overlap: bool = DEFAULT_OFFLOAD_OVERLAP

    @classmethod
    def build(cls, *, active_layers: Any = DEFAULT_ACTIVE_LAYERS, switch_every: Any = DEFAULT_SWITCH_EVERY,
              probe_steps: Any = None, update_every: Any = None, refresh_all: Any = DEFAULT_REFRESH_ALL,
              outside_blocks: Any = DEFAULT_OUTSIDE_BLOCKS, probe_low_memory: Any = DEFAULT_PROBE_LOW_MEMORY,
              offload: Any = DEFAULT_OFFLOAD, offload_overlap: Any = DEFAULT_OFFLOAD_OVERLAP,
              default_probe_steps: int = DEFAULT_PROBE_STEPS) -> GrassConfig:
        """Validate and resolve. ``default_probe_steps`` is what ``probe_steps=None`` means: the
        sampler's own default (``sampling.default_probe_steps``; 0 for a sampler that needs no probing)."""
        check_int("active_layers", active_layers, 1)
        check_int("switch_every", switch_every, 1)
        if probe_steps is None:
            probe_steps = default_probe_steps
        check_int("probe_steps", probe_steps, 0)
        if update_every is None:
            update_every = switch_every
        check_int("update_every", update_every, 1)
        check_bool("refresh_all", refresh_all)
        check_choice("outside_blocks", outside_blocks, OUTSIDE_BLOCKS_CHOICES)
        check_bool("probe_low_memory", probe_low_memory)
        offload = resolve_offload(offload)
        check_bool("offload_overlap", offload_overlap)
        return cls(active_layers=int(active_layers), switch_every=int(switch_every), probe_steps=int(probe_steps),
                   update_every=int(update_every), refresh_all=refresh_all, outside_blocks=outside_blocks,
                   probe_low_memory=probe_low_memory, offload=offload, offload_overlap=offload_overlap)

    def schedule_settings(self) -> dict[str, int | bool]:
        """The settings that change the schedule (checkpointed, compared on resume, in the history)."""
        return {f: getattr(self, f) for f in SCHEDULE_FIELDS}

"""The GRASS schedule as a plain object: every number that changes the future, and its transitions.

A :class:`Schedule` knows the blocks only as indices ``0..L-1`` with a parameter count each; it
needs no model, no optimizer and no gradients, so its invariants are tested on their own
(``tests/test_schedule.py``). One optimizer step is, in order:

1. the per-block signal (the sampler's ``signal``: gradient RMS by default) of the blocks in
   :attr:`Schedule.gradient_blocks` is measured elsewhere (``measuring.py``), on the gradients'
   device, without a host synchronisation;
2. the update of the active set happens elsewhere (nothing while :attr:`Schedule.is_probing`);
3. :meth:`Schedule.advance` adds the signal to the open window (:meth:`Schedule.record`), counts
   the step and, when due, ends probing, refreshes the scores from the window and redraws the
   active set; it returns which of these happened. It is all or nothing, so a step that failed
   before it (and is tried again) never counts its signal twice.

Everything that changes the future is listed once, in the constants below, and
:meth:`~Schedule.state_dict`, :meth:`~Schedule.check_state_dict`, :meth:`~Schedule.load_state_dict`
and :meth:`~Schedule.to` follow those lists: a new field is one new line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .config import GrassConfig
from .importance import accumulate_window, window_mean
from .sampling import Sampler

__all__ = ["REDRAW_EVENTS", "STATE_VERSION", "Schedule"]

STATE_VERSION = 2  # 1: the hook sums were called probe_sq / probe_hits (read and renamed on load)

# Checkpoint keys, by lifecycle. Identity of the run: checked against this schedule, never restored.
VERSION, NUM_LAYERS, LAYER_NUMEL, CONFIG = "version", "num_layers", "layer_numel", "config"
# Restored on load.
STEP, SEED, ACTIVE, GENERATOR, SAMPLER = "step", "seed", "active", "generator", "sampler"
# Restored on load: one entry per block. name -> (dtype, lives on the gradients' device).
VECTORS: dict[str, tuple[torch.dtype, bool]] = {
    "importance": (torch.float64, False),  # scores; NaN: not measured yet, 0: block never drawn
    "probabilities": (torch.float64, False),  # the distribution of the next draws
    "window_sum": (torch.float32, True),  # sum of the per-step signal since the last refresh
    "window_count": (torch.int64, True),  # steps measured since the last refresh
    "hook_sum": (torch.float64, True),  # partial sums the gradient hooks collected this step (squares: wide)
    "hook_hits": (torch.int64, True),  # gradients the hooks saw this step
}
_RENAMED_IN_2 = {"probe_sq": "hook_sum", "probe_hits": "hook_hits"}
REQUIRED = (VERSION, NUM_LAYERS, LAYER_NUMEL, STEP, SEED, ACTIVE, *VECTORS, GENERATOR)  # SAMPLER, CONFIG optional

# Events returned by advance(); those that change the active set.
PROBE_END, REFRESH, REDRAW, REFRESH_REDRAW = "probe_end", "refresh", "redraw", "refresh+redraw"
REDRAW_EVENTS = frozenset({PROBE_END, REDRAW, REFRESH_REDRAW})


class RankAgreement(Protocol):
    """Checks that data-parallel ranks agree (``distributed.RankChecks``); raises otherwise."""

    def window(self, mean: Tensor, measured: Tensor) -> None: ...

    def active(self, active: Sequence[int]) -> None: ...


class Schedule:
    """Probing, windows, refreshes and redraws of GRASS over ``len(numel)`` blocks.

    Args:
        config (GrassConfig): the schedule's settings.
        sampler: the sampler (:mod:`grass_optim.sampling` protocol).
        numel (sequence of int): trainable parameters per block; a block with 0 is never drawn.
        seed (int): seed of the schedule's own CPU ``torch.Generator`` (the global RNG is never used).
        device (torch.device): where the per-step accumulators live (the gradients' device).
        ranks (RankAgreement, optional): multi-process agreement checks at refreshes and redraws.
    """

    # The per-block vectors, one per entry of VECTORS (which the code iterates); declared for type checkers.
    importance: Tensor
    probabilities: Tensor
    window_sum: Tensor
    window_count: Tensor
    hook_sum: Tensor
    hook_hits: Tensor

    def __init__(self, config: GrassConfig, sampler: Any, numel: Sequence[int], seed: int,
                 device: torch.device | str = "cpu", ranks: RankAgreement | None = None) -> None:
        self.config = config
        self.sampler = sampler
        self.ranks = ranks
        self.numel = [int(n) for n in numel]
        self.sampleable = torch.tensor([n > 0 for n in self.numel], dtype=torch.bool)  # CPU, for the sampler
        if config.active_layers > int(self.sampleable.sum()):
            raise ValueError(f"Invalid active_layers: {config.active_layers} (expected an int in "
                             f"[1, {int(self.sampleable.sum())}]: the blocks with trainable parameters)")
        self.device = torch.device(device)
        self.step = 0
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.active: tuple[int, ...] = ()
        for name, (dtype, on_device) in VECTORS.items():
            setattr(self, name, torch.zeros(self.num_blocks, dtype=dtype, device=self.device if on_device else "cpu"))
        self.importance = torch.where(self.sampleable, math.nan, 0.0).to(torch.float64)
        if config.probe_steps == 0:  # no probing: the first draw is now, from unscored (average) blocks
            self.probabilities = self._compute_probabilities()
            self.active = self._draw()

    # ------------------------------------------------------------------ read-only view
    @property
    def num_blocks(self) -> int:
        return len(self.numel)

    @property
    def is_probing(self) -> bool:
        """True during the first ``probe_steps`` steps (measure every block, update none)."""
        return self.step < self.config.probe_steps

    @property
    def active_blocks(self) -> tuple[int, ...]:
        """The blocks trained now: every sampleable block while probing (measured, not updated), else
        the active set."""
        if self.is_probing:
            return self._sampleable_blocks()
        return self.active

    @property
    def measures_all(self) -> bool:
        """True on the step before each refresh with ``refresh_all``: every block gets gradients (their
        signal is measured), only the active set is updated. Only for a sampler that lists
        ``"refresh_all"`` in its ``settings`` (not ``"uniform"``, which ignores scores, nor ``"gain"``,
        whose signal only an update gives)."""
        uses = "refresh_all" in getattr(self.sampler, "settings", Sampler.settings)
        if not (self.config.refresh_all and uses) or self.is_probing:
            return False
        return (self.step + 1 - self.config.probe_steps) % self.config.update_every == 0

    @property
    def gradient_blocks(self) -> tuple[int, ...]:
        """The blocks that get gradients this step: every sampleable block while probing and on a
        ``refresh_all`` step, else the active set."""
        return self._sampleable_blocks() if self.measures_all else self.active_blocks

    def _sampleable_blocks(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.sampleable.nonzero().flatten().tolist())

    @property
    def current_probabilities(self) -> Tensor:
        """The distribution over the blocks (uniform over the sampleable ones while probing); a copy."""
        if self.is_probing:
            return self._uniform()
        return self.probabilities.clone()

    # ------------------------------------------------------------------ transitions
    def record(self, values: Tensor, hits: Tensor) -> None:
        """Add this step's signal ``values`` of the blocks with ``hits > 0`` to the window.

        Runs on the device without reading anything back: ordinary steps never synchronise.
        Non-finite values never enter the scores.
        """
        accumulate_window(self.window_sum, self.window_count, values, hits > 0)

    def hook_sums(self) -> tuple[Tensor, Tensor]:
        """Copies of the partial sums and hit counts the gradient hooks collected this step (reset
        when the step is counted, by :meth:`advance`, or by :meth:`drop_hook_sums`)."""
        return self.hook_sum.clone(), self.hook_hits.clone()

    def drop_hook_sums(self) -> None:
        """Forget this step's hook sums (their gradients were cleared before any step used them)."""
        self.hook_sum.zero_()
        self.hook_hits.zero_()

    def advance(self, record: tuple[Tensor, Tensor] | None = None) -> str | None:
        """Count one optimizer step: :meth:`record` its signal (``(values, hits)``, if any), forget the
        hook sums, and end probing, refresh and redraw when due.

        Returns ``"probe_end"``, ``"refresh"``, ``"redraw"``, ``"refresh+redraw"`` or ``None``.
        With ``n`` steps since probing ended: probing ends at ``n == 0`` (a refresh on the probing
        window, then the first draw); a refresh when ``n % update_every == 0``, then a redraw when
        ``n % switch_every == 0``, so a redraw on the same step uses the newest scores.

        All or nothing: if it raises (a sampler can), the schedule is as before the call, the step's
        signal not recorded, so that a step tried again counts its signal once.
        """
        c = self.config
        n = self.step + 1 - c.probe_steps
        probe_end = n == 0 and c.probe_steps > 0  # every block measured while probing gets its probing mean
        refreshed = probe_end or (n > 0 and n % c.update_every == 0)
        redrawn = probe_end or (n > 0 and n % c.switch_every == 0)
        if not (refreshed or redrawn):
            self._count(record)
            return None
        # A transition calls the sampler, which may raise: then nothing of it happened (the step is not
        # counted either, so the next step tries again), instead of, say, probing over with no active set.
        before = self._snapshot()
        try:
            self._count(record)
            if refreshed:
                self._refresh()
            if redrawn:
                self.active = self._draw()
        except BaseException:
            self.apply_checked(before)
            raise
        if probe_end:
            return PROBE_END
        if refreshed and redrawn:
            return REFRESH_REDRAW
        return REFRESH if refreshed else REDRAW

    def _count(self, record: tuple[Tensor, Tensor] | None) -> None:
        if record is not None:
            self.record(*record)
        self.drop_hook_sums()  # they were this step's (read by the record, or not needed)
        self.step += 1

    def reconcile(self) -> str | None:
        """Make a restored state fit this schedule's settings, which may differ from the checkpoint's:
        past the end of probing with no active set (saved while probing, resumed with fewer
        ``probe_steps``), probing ends now; an active set of another size (another ``active_layers``),
        it is redrawn now. Returns the event, or None when nothing was needed."""
        if self.is_probing or (len(self.active) == self.config.active_layers
                               and all(bool(self.sampleable[i]) for i in self.active)):
            return None
        before = self._snapshot()
        try:
            if not self.active:
                self._refresh()
                self.active = self._draw()
                return PROBE_END
            self.active = self._draw()
            return REDRAW
        except BaseException:
            self.apply_checked(before)
            raise

    def _snapshot(self) -> dict[str, Any]:
        """Everything :meth:`apply_checked` sets, as copies: to undo a transition that raised."""
        return {STEP: self.step, SEED: self.seed, ACTIVE: self.active, GENERATOR: self.generator.get_state(),
                SAMPLER: self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
                **{name: getattr(self, name).clone() for name in VECTORS}}

    def set_sampleable(self, sampleable: Sequence[bool]) -> None:
        """Blocks that lost every trainable parameter (a freeze was adopted) are never drawn again;
        the active set keeps them until the next redraw."""
        mask = torch.tensor(list(sampleable), dtype=torch.bool)
        lost = self.sampleable & ~mask
        if bool(lost.any()):
            self.sampleable = mask
            self.importance = torch.where(lost, 0.0, self.importance)
            self.probabilities = torch.where(lost, 0.0, self.probabilities)
            if self.probabilities.sum() > 0:
                self.probabilities = self.probabilities / self.probabilities.sum()

    def to(self, device: torch.device | str) -> None:
        """Move the per-step accumulators (e.g. when the model moved after construction)."""
        self.device = torch.device(device)
        for name, (_, on_device) in VECTORS.items():
            if on_device:
                setattr(self, name, getattr(self, name).to(self.device))

    # ------------------------------------------------------------------ the math, in order
    def _refresh(self) -> None:
        mean = window_mean(self.window_sum, self.window_count).to("cpu", torch.float64)
        measured = (self.window_count > 0).cpu()
        if self.ranks is not None:
            self.ranks.window(mean, measured)
        self.window_sum.zero_()
        self.window_count.zero_()
        s = self.sampleable
        new = self.sampler.refresh(self.importance[s], mean[s], measured[s])
        new = torch.as_tensor(new, dtype=torch.float64).flatten()
        if new.numel() != int(s.sum()) or bool(torch.isinf(new).any()):
            raise RuntimeError(f"sampler.refresh returned {new.tolist()} (expected {int(s.sum())} scores, "
                               "finite or NaN for blocks without a score yet)")
        self.importance = self.importance.clone()
        self.importance[s] = new
        self.probabilities = self._compute_probabilities()

    def _uniform(self) -> Tensor:
        s = self.sampleable.to(torch.float64)
        return s / s.sum()

    def _compute_probabilities(self) -> Tensor:
        s = self.sampleable
        scores = self.importance[s]
        known = ~torch.isnan(scores)
        # A block without a score yet counts as average: neither favoured nor starved.
        fill = scores[known].mean() if bool(known.any()) else torch.tensor(1.0, dtype=torch.float64)
        scores = torch.where(known, scores, fill)
        p = torch.as_tensor(self.sampler.probabilities(scores), dtype=torch.float64).flatten()
        if p.numel() != int(s.sum()) or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or p.sum() <= 0:
            raise RuntimeError(f"sampler.probabilities returned {p.tolist()} (expected {int(s.sum())} "
                               "finite non-negative numbers with a positive sum)")
        full = torch.zeros(self.num_blocks, dtype=torch.float64)
        full[s] = p / p.sum()
        return full

    def _draw(self) -> tuple[int, ...]:
        sampleable = [int(i) for i in self.sampleable.nonzero().flatten().tolist()]
        k = self.config.active_layers
        if k > len(sampleable):
            raise RuntimeError(f"GrassAdamW: only {len(sampleable)} blocks have trainable parameters left (the others "
                               f"were frozen after it was built), fewer than active_layers={k}")
        drawn = self.sampler.draw(self.probabilities[sampleable], k, self.generator)
        indices = torch.as_tensor(drawn) if drawn is not None else None
        if indices is None or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise RuntimeError(f"sampler.draw returned {drawn!r} (expected {k} distinct integer indices in "
                               f"[0, {len(sampleable)}))")
        picked = [int(i) for i in indices.flatten().tolist()]
        if len(picked) != k or len(set(picked)) != k or not all(0 <= i < len(sampleable) for i in picked):
            raise RuntimeError(f"sampler.draw returned {picked} (expected {k} distinct indices in "
                               f"[0, {len(sampleable)}))")
        active = tuple(sorted(sampleable[i] for i in picked))
        if self.ranks is not None:
            self.ranks.active(active)
        return active

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Every field that changes the future, as copies (plain tensors, ints and lists)."""
        sampler_state = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None
        return {
            VERSION: STATE_VERSION, NUM_LAYERS: self.num_blocks, LAYER_NUMEL: list(self.numel),
            STEP: self.step, SEED: self.seed, ACTIVE: list(self.active),
            **{name: getattr(self, name).to("cpu", copy=True) for name in VECTORS},
            GENERATOR: self.generator.get_state(), SAMPLER: sampler_state, CONFIG: self.config.schedule_settings(),
        }

    def check_state_dict(self, state: Any) -> dict[str, Any]:
        """Validate a :meth:`state_dict` against this schedule without changing anything.

        Returns the values :meth:`load_state_dict` would set; raises ``ValueError`` naming what is wrong.
        """
        if not isinstance(state, dict):
            raise ValueError(f"Invalid state_dict: the 'grass' entry is a {type(state).__name__}, not a dict")
        if state.get(VERSION) == 1:  # the same fields under older names
            state = {_RENAMED_IN_2.get(k, k): v for k, v in state.items()} | {VERSION: STATE_VERSION}
        missing = [k for k in REQUIRED if k not in state]
        if missing:
            raise ValueError(f"Invalid state_dict: the 'grass' entry lacks {', '.join(missing)}")
        if state[VERSION] != STATE_VERSION:
            raise ValueError(f"Invalid state_dict: GRASS state version {state[VERSION]!r} "
                             f"(this grass_optim reads version {STATE_VERSION})")
        if state[NUM_LAYERS] != self.num_blocks or list(state[LAYER_NUMEL]) != self.numel:
            raise ValueError(
                f"Invalid state_dict: saved for a model with {state[NUM_LAYERS]} blocks of sizes "
                f"{list(state[LAYER_NUMEL])}, but this optimizer has {self.num_blocks} blocks of sizes {self.numel}")
        for key in (STEP, SEED):
            if not _is_int(state[key]) or state[key] < 0:
                raise ValueError(f"Invalid state_dict: 'grass' entry {key!r} is {state[key]!r} (expected an int >= 0)")
        raw_active = state[ACTIVE]
        if not isinstance(raw_active, (list, tuple)) or not all(_is_int(i) for i in raw_active):
            raise ValueError(f"Invalid state_dict: 'grass' entry 'active' is {raw_active!r} (expected a list of ints)")
        active = [int(i) for i in raw_active]
        if any(not (0 <= i < self.num_blocks and bool(self.sampleable[i])) for i in active):
            raise ValueError(f"Invalid state_dict: active blocks {active} are not trainable blocks of this model")
        if len(set(active)) != len(active):
            raise ValueError(f"Invalid state_dict: active blocks {active} list a block twice")
        saved = state.get(CONFIG) or {}
        saved_k, saved_probe = saved.get("active_layers"), saved.get("probe_steps")
        if _is_int(saved_k) and _is_int(saved_probe) and state[STEP] >= saved_probe and len(active) != saved_k:
            raise ValueError(f"Invalid state_dict: {len(active)} active blocks {active}, but it was saved after "
                             f"probing with active_layers={saved_k}")
        out: dict[str, Any] = {STEP: int(state[STEP]), SEED: int(state[SEED]), ACTIVE: tuple(sorted(active)),
                               SAMPLER: state.get(SAMPLER)}
        for name, (dtype, on_device) in VECTORS.items():
            value = state[name]
            if not isinstance(value, Tensor) or value.shape != (self.num_blocks,):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"Invalid state_dict: 'grass' entry {name!r} is {got} "
                                 f"(expected a tensor of shape ({self.num_blocks},))")
            converted = value.to(self.device if on_device else "cpu", dtype, copy=True)
            if not _valid_vector(name, converted):
                raise ValueError(f"Invalid state_dict: 'grass' entry {name!r} is {value.tolist()} ({_RULES[name]})")
            out[name] = converted
        generator = state[GENERATOR]
        if (not isinstance(generator, Tensor) or generator.dtype != torch.uint8
                or generator.numel() != self.generator.get_state().numel()):
            raise ValueError("Invalid state_dict: 'grass' entry 'generator' is not the state of a CPU torch.Generator "
                             "(a uint8 tensor from Generator.get_state())")
        out[GENERATOR] = generator
        return out

    def changed_settings(self, state: dict[str, Any]) -> list[str]:
        """``"name: saved -> now"`` for each schedule setting that differs from the checkpoint's."""
        saved, now = state.get(CONFIG) or {}, self.config.schedule_settings()
        return [f"{k}: {saved[k]} -> {v}" for k, v in now.items() if k in saved and saved[k] != v]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (validated first: a bad one changes nothing)."""
        self.apply_checked(self.check_state_dict(state))

    def apply_checked(self, values: dict[str, Any]) -> None:
        """Set the values returned by :meth:`check_state_dict` (cannot fail)."""
        self.step, self.seed, self.active = values[STEP], values[SEED], values[ACTIVE]
        for name in VECTORS:  # in place: the gradient hooks hold views of hook_sum and hook_hits
            getattr(self, name).copy_(values[name])
        self.generator.set_state(values[GENERATOR].cpu())
        if values[SAMPLER] is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(values[SAMPLER])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_RULES = {"importance": "expected finite scores, or NaN for blocks not scored yet",
          "probabilities": "expected finite non-negative numbers",
          "window_sum": "expected finite numbers", "hook_sum": "expected finite non-negative numbers",
          "window_count": "expected counts >= 0", "hook_hits": "expected counts >= 0"}


def _valid_vector(name: str, t: Tensor) -> bool:
    if name == "importance":
        return not bool(torch.isinf(t).any())
    if name in ("window_count", "hook_hits"):
        return bool((t >= 0).all())
    if not bool(torch.isfinite(t).all()):
        return False
    return name == "window_sum" or bool((t >= 0).all())

"""Which blocks to train: scores -> probabilities -> a draw of distinct blocks, and which per-block
signal the scores are made of.

The math lives in pure functions of tensors and a ``torch.Generator``; the sampler classes only
bundle them with their hyperparameters. A sampler is anything with the three methods of
:class:`Sampler` (subclass it, or write the methods on your own object):

* ``refresh(importance, window_mean, measured) -> Tensor``: new scores after a window, given the
  old scores, the mean gradient RMS of the window, and which blocks were measured in it;
* ``probabilities(importance) -> Tensor``: a distribution over the blocks;
* ``draw(probabilities, k, generator) -> Tensor``: ``k`` distinct block indices.

The tensors handed to a sampler are 1-D CPU tensors over the blocks that can be sampled (float64
scores, a bool ``measured`` mask); the optimizer maps indices back to block numbers. In
``refresh``, a block never measured before has score NaN; ``probabilities`` always gets finite
scores (the optimizer gives unscored blocks the mean score). A sampler may also set ``uses_importance =
False`` (then the default ``probe_steps`` is 0), may declare in ``settings`` which GrassAdamW
arguments change what it does (the others are warned about when given), may choose in ``signal``
what is measured for its scores (:data:`SIGNALS`), and may define ``state_dict()`` /
``load_state_dict()``, which the optimizer checkpoints with its own state.

The signals, measured per block ``l`` at each step in which it has gradients ``g`` (``N_l``
parameters):

* ``"rms"`` (GRASS, the published method): the gradient RMS ``sqrt(||g||^2 / N_l)``;
* ``"l1"``: ``||g||_1``, the first-order loss decrease of one sign-like (Adam) step of unit size on
  the block: what updating it *would* give now;
* ``"gain"``: ``<g, theta_before - theta_after>`` over the step's update, the first-order loss
  decrease the update of the block *did* give (summed over a window, a path integral of the loss
  change). Only blocks that were updated have it: probing and ``refresh_all`` measure nothing for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config import DEFAULT_EMA, DEFAULT_EXPLORATION, DEFAULT_PROBE_STEPS, DEFAULT_TEMPERATURE, check_int, check_real
from .importance import ema_update

__all__ = [
    "SAMPLER_ARGUMENTS",
    "SIGNALS",
    "GainSampler",
    "GrassSampler",
    "L1Sampler",
    "Sampler",
    "StaticSampler",
    "UniformSampler",
    "inclusion_probabilities",
    "sample_without_replacement",
    "scale_free_softmax",
]


def scale_free_softmax(scores: Tensor, temperature: float = DEFAULT_TEMPERATURE,
                       exploration: float = DEFAULT_EXPLORATION) -> Tensor:
    r"""``p = (1 - eps) * softmax(s / tau) + eps / L`` with ``s = m / mean(|m|)``.

    Dividing by the mean makes ``temperature`` independent of the size of the gradients (RMS
    values are tiny and shrink during training). All-zero scores give the uniform distribution.
    Computed in float64, after dividing by the largest magnitude, so any finite input works.
    """
    check_real("temperature", temperature, 0.0, low_open=True)
    check_real("exploration", exploration, 0.0, 1.0)
    m = scores.detach().to(device="cpu", dtype=torch.float64).flatten()
    if m.numel() == 0:
        raise ValueError("scale_free_softmax needs at least one score")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"scale_free_softmax needs finite scores, got {m.tolist()}")
    peak = m.abs().max()
    if peak > 0:
        m = m / peak  # now in [-1, 1]: the mean below cannot overflow or underflow to 0
        m = m / m.abs().mean()
    p = torch.softmax(m / temperature, dim=0)
    if exploration > 0:
        p = (1.0 - exploration) * p + exploration / p.numel()
    return p / p.sum()


def sample_without_replacement(probabilities: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Draw ``k`` distinct indices, each draw proportional to ``probabilities`` among those left.

    Gumbel-top-k: the ``k`` largest ``log p_i + G_i`` with ``G_i`` standard Gumbel noise from
    ``generator`` (a CPU generator; the global RNG is never used). Returns them sorted.
    """
    p = probabilities.detach().to(device="cpu", dtype=torch.float64).flatten()
    check_int("k", k, 1, p.numel())
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not p.sum() > 0:
        raise ValueError(f"Invalid probabilities: {p.tolist()} (expected finite non-negative numbers with a "
                         "positive sum)")
    u = torch.rand(p.numel(), generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u))  # u == 0 gives -inf: never chosen over a real draw
    # Zero-probability entries rank below every positive one (log p + G > -800 for any float64
    # p > 0 and u >= 2**-53), and uniformly among themselves when k exceeds the positive ones.
    keys = torch.where(p > 0, torch.log(p), torch.full_like(p, -1e4)) + gumbel
    return torch.sort(torch.topk(keys, k).indices).values


def inclusion_probabilities(probabilities: Tensor, k: int) -> Tensor:
    """Exact ``P(i is among the k drawn)`` for :func:`sample_without_replacement`.

    Enumerates the draw order over subsets (exponential in the number of blocks), so it is meant for
    tests and for explaining small cases; at most 16 entries.
    """
    p = [float(x) for x in probabilities.detach().to(dtype=torch.float64).flatten()]
    n = len(p)
    if n > 16:
        raise ValueError(f"inclusion_probabilities enumerates subsets; got {n} entries (at most 16)")
    if not 0 <= k <= n:
        raise ValueError(f"Invalid k: {k} (expected an int in [0, {n}])")
    result = [0.0] * n
    # reach[mask] = probability that the first popcount(mask) draws are exactly the set `mask`.
    reach = {0: 1.0}
    for _ in range(k):
        nxt: dict[int, float] = {}
        for mask, prob in reach.items():
            left = [i for i in range(n) if not mask >> i & 1]
            mass = sum(p[i] for i in left)
            for i in left:
                # Zero mass left: Gumbel-top-k then picks among the rest as if uniformly.
                q = p[i] / mass if mass > 0 else 1.0 / len(left)
                if q > 0:
                    nxt[mask | 1 << i] = nxt.get(mask | 1 << i, 0.0) + prob * q
        reach = nxt
    for mask, prob in reach.items():
        for i in range(n):
            if mask >> i & 1:
                result[i] += prob
    return torch.tensor(result, dtype=torch.float64)


# GrassAdamW arguments that build a sampler named by a string; a sampler object carries its own.
SAMPLER_ARGUMENTS = ("temperature", "ema", "exploration")
# What a sampler's scores are made of (its ``signal``); see the module docstring.
SIGNALS = ("rms", "l1", "gain")


class Sampler:
    """Base class for samplers; see the module docstring for the protocol.

    Defaults: scores are kept as they are (``refresh`` is the identity), the distribution is
    uniform, and the draw is :func:`sample_without_replacement`.

    ``settings`` names the GrassAdamW arguments this sampler's behaviour depends on: its
    hyperparameters among :data:`SAMPLER_ARGUMENTS` (used when GrassAdamW builds it from a name),
    and ``"update_every"``/``"refresh_all"`` when its ``refresh`` does something (it is called every
    ``update_every`` steps). A setting given to GrassAdamW but not used is warned about. ``signal``
    names what the schedule measures for it (:data:`SIGNALS`; default ``"rms"``).
    """

    uses_importance: bool = True
    settings: tuple[str, ...] = ("update_every", "refresh_all")
    signal: str = "rms"

    def refresh(self, importance: Tensor, window_mean: Tensor, measured: Tensor) -> Tensor:
        return importance

    def probabilities(self, importance: Tensor) -> Tensor:
        return torch.full_like(importance, 1.0 / importance.numel(), dtype=torch.float64)

    def draw(self, probabilities: Tensor, k: int, generator: torch.Generator) -> Tensor:
        return sample_without_replacement(probabilities, k, generator)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class GrassSampler(Sampler):
    """Adaptive GRASS: EMA refresh of measured blocks, scale-free softmax with temperature."""

    settings: tuple[str, ...] = ("temperature", "ema", "exploration", "update_every", "refresh_all")

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, ema: float = DEFAULT_EMA,
                 exploration: float = DEFAULT_EXPLORATION) -> None:
        check_real("temperature", temperature, 0.0, low_open=True)
        check_real("ema", ema, 0.0, 1.0, low_open=True)
        check_real("exploration", exploration, 0.0, 1.0)
        self.temperature = float(temperature)
        self.ema = float(ema)
        self.exploration = float(exploration)

    def refresh(self, importance: Tensor, window_mean: Tensor, measured: Tensor) -> Tensor:
        return ema_update(importance, window_mean, measured, self.ema)

    def probabilities(self, importance: Tensor) -> Tensor:
        return scale_free_softmax(importance, self.temperature, self.exploration)


class StaticSampler(GrassSampler):
    """"Static GRASS" (the paper's ablation): the probing scores, never refreshed.

    A block gets its score from its first measurement (the probing window, or its first training
    window if it was not measured while probing) and keeps it.
    """

    settings: tuple[str, ...] = ("temperature", "exploration", "refresh_all")

    def refresh(self, importance: Tensor, window_mean: Tensor, measured: Tensor) -> Tensor:
        return torch.where(torch.isnan(importance) & measured, window_mean, importance)


class L1Sampler(GrassSampler):
    """GRASS's refresh and softmax over ``||g||_1``, the loss decrease one sign-like (Adam) step on
    the block would give, instead of the gradient RMS."""

    signal = "l1"


class GainSampler(GrassSampler):
    """A bandit over blocks: a block's score is the first-order loss decrease its own updates gave
    per step, ``<g, theta_before - theta_after>``, averaged over the windows it was trained in (EMA).

    Blocks never trained count as average, so every block gets tried; the score says what training
    a block *did*, not how large its gradient is (a re-initialised block has small gradients but
    large gains). Needs no probing (nothing is updated while probing), and ``refresh_all`` gives it
    nothing (a block that is not updated has no gain).
    """

    signal = "gain"
    settings: tuple[str, ...] = ("temperature", "ema", "exploration", "update_every")


class UniformSampler(Sampler):
    """LISA: every block equally likely, whatever the scores."""

    uses_importance = False
    settings: tuple[str, ...] = ()


_NAMED: dict[str, Any] = {"grass": GrassSampler, "static": StaticSampler, "uniform": UniformSampler,
                          "l1": L1Sampler, "gain": GainSampler}
_NAMES = ", ".join(map(repr, _NAMED))


def resolve_sampler(sampler: Any, *, temperature: float = DEFAULT_TEMPERATURE, ema: float = DEFAULT_EMA,
                    exploration: float = DEFAULT_EXPLORATION) -> Sampler:
    """Turn the ``sampler=`` argument into a sampler object (validating a user's object).

    ``temperature``, ``ema`` and ``exploration`` are validated whatever the sampler, so a bad value
    is an error even where it would have no effect.
    """
    if isinstance(sampler, str) and sampler not in _NAMED:
        raise ValueError(f"Invalid sampler: {sampler!r} (expected {_NAMES} "
                         "or an object with refresh(), probabilities() and draw() methods)")
    if isinstance(sampler, type):
        raise TypeError(f"Invalid sampler: the class {sampler.__name__} (expected an instance, e.g. "
                        f"{sampler.__name__}())")
    if not isinstance(sampler, str):
        missing = [m for m in ("refresh", "probabilities", "draw") if not callable(getattr(sampler, m, None))]
        if missing:
            raise TypeError(f"Invalid sampler: {sampler!r} lacks {', '.join(missing)}() (expected {_NAMES} "
                            "or an object implementing the grass_optim.Sampler protocol)")
    signal = getattr(sampler, "signal", "rms")
    if not isinstance(sampler, str) and signal not in SIGNALS:
        raise ValueError(f"Invalid sampler: its signal {signal!r} is not one of {', '.join(map(repr, SIGNALS))}")
    check_real("temperature", temperature, 0.0, low_open=True)
    check_real("ema", ema, 0.0, 1.0, low_open=True)
    check_real("exploration", exploration, 0.0, 1.0)
    if isinstance(sampler, str):
        return UniformSampler() if sampler == "uniform" else _NAMED[sampler](temperature, ema, exploration)
    return sampler


def unused_settings(sampler: Any, resolved: Any, given: dict[str, Any]) -> list[str]:
    """The settings in ``given`` (name -> value, only those that differ from their default) that
    have no effect with this sampler: those it does not declare in ``settings``, and, for a sampler
    object (not a name), every one of :data:`SAMPLER_ARGUMENTS`, which it carries itself."""
    declared = set(getattr(resolved, "settings", Sampler.settings))
    if not isinstance(sampler, str):
        declared -= set(SAMPLER_ARGUMENTS)
    return [name for name in given if name not in declared]


def default_probe_steps(sampler: Any) -> int:
    """What ``probe_steps=None`` means for this sampler: 10, or 0 for a sampler that does not use the
    scores (``uses_importance = False``) or whose signal probing cannot measure (``"gain"``)."""
    if not getattr(sampler, "uses_importance", True) or getattr(sampler, "signal", "rms") == "gain":
        return 0
    return DEFAULT_PROBE_STEPS

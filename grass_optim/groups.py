"""The base optimizer: building or wrapping it, its per-block param groups, and stepping it.

GrassAdamW does no arithmetic of its own: a base optimizer (``torch.optim.AdamW`` unless told
otherwise) updates the parameters. This module splits its param groups per block (each group
records its block under :data:`GROUP_BLOCK`), and steps it over every group or, for
``offload="stream"``, over one block's groups at a time while its step hooks fire once.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import config as C
from .freezing import is_trainable
from .layers import LayerPartition

__all__ = ["GROUP_BLOCK", "build_base_optimizer", "check_optimizer_kwargs", "step_hooks_once", "step_groups_of"]

# Param-group key: block index of the group, or None for parameters outside the blocks. It lives in
# the base optimizer's groups, so it is checkpointed with them.
GROUP_BLOCK = "grass_block"


def split_groups(groups: Sequence[dict[str, Any]], partition: LayerPartition) -> list[dict[str, Any]]:
    """One group per (user group, part of the model): outside first, then block 0, 1, ...

    Each new group keeps the user group's hyperparameters and records its block in GROUP_BLOCK.
    """
    out = []
    for group in groups:
        params = list(group["params"])
        names = group.get("param_names")
        parts: dict[int | None, list[int]] = {}
        for i, p in enumerate(params):
            if not partition.contains(p):
                raise ValueError(f"Invalid base_optimizer: it holds a parameter of shape {tuple(p.shape)} "
                                 "that is not a parameter of the model given to GrassAdamW")
            parts.setdefault(partition.owner(p), []).append(i)
        for part in (None, *range(partition.num_layers)):
            if part not in parts:
                continue
            new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            new["params"] = [params[i] for i in parts[part]]
            if names is not None:
                new["param_names"] = [names[i] for i in parts[part]]
            new[GROUP_BLOCK] = part
            out.append(new)
    return out


def build_base_optimizer(model: nn.Module, base: Any, partition: LayerPartition, active_layers: int,
                         adamw_kwargs: dict[str, Any], optimizer_kwargs: dict[str, Any]) -> Optimizer:
    """The base optimizer over per-block groups: built (``None``: AdamW, or a class) or wrapped.

    A wrapped instance has its ``param_groups`` rewritten **in place** (same list, new group dicts),
    on purpose: the user's optimizer *is* the one that steps. Its state (keyed by parameter) carries
    over, and the user's references to it (``base.state_dict()``, a GradScaler, a scheduler built on
    it after wrapping) describe and drive what is really trained; a copy would leave them on an
    optimizer nothing steps. A scheduler built on it *before* wrapping counted the old groups and
    fails at its next step: build schedulers after GrassAdamW. Everything is checked before the
    instance is touched, so a refused wrap leaves it as it was.
    """
    given = {k: v for k, v in adamw_kwargs.items() if v is not None}
    if base is None or (isinstance(base, type) and issubclass(base, Optimizer)):
        cls = torch.optim.AdamW if base is None else base
        _check_base_class(cls)
        if base is None:
            given = {"lr": C.DEFAULT_LR, "betas": C.DEFAULT_BETAS, "eps": C.DEFAULT_EPS,
                     "weight_decay": C.DEFAULT_WEIGHT_DECAY, **given}
        groups = split_groups([{"params": list(model.parameters())}], partition)
        _check_active_layers(groups, partition, active_layers)
        try:
            return cls(groups, **given, **optimizer_kwargs)
        except TypeError as err:
            raise TypeError(f"Invalid arguments for base_optimizer={cls.__name__}: {err}") from None
    if isinstance(base, Optimizer):
        _check_base_class(type(base))
        extra = sorted(given) + sorted(optimizer_kwargs)
        if extra:
            raise ValueError(
                f"Invalid arguments {', '.join(extra)} together with a base_optimizer instance: "
                f"the wrapped {type(base).__name__} keeps its own hyperparameters; set them when "
                "you build it, or pass the class instead of an instance")
        groups = split_groups(base.param_groups, partition)
        _check_active_layers(groups, partition, active_layers)  # before the user's optimizer is touched
        base.param_groups[:] = groups
        return base
    raise TypeError(f"Invalid base_optimizer: {base!r} (expected None, a torch.optim.Optimizer "
                    "subclass, or an instance of one built over the model's parameters)")


def check_optimizer_kwargs(base: Any, optimizer_kwargs: dict[str, Any], grass_names: Sequence[str]) -> None:
    """Refuse a keyword that neither GrassAdamW nor the base optimizer takes, naming the closest of
    both (``activ_layers=`` is a misspelled GRASS setting, not the base optimizer's problem).

    Keywords GrassAdamW does not know go to the base optimizer; a class that takes ``**kwargs`` is
    trusted to check its own, except for a near miss of a GRASS setting.
    """
    cls: type = torch.optim.AdamW if base is None else base if isinstance(base, type) else type(base)
    if not issubclass(cls, Optimizer):
        return  # build_base_optimizer says what base_optimizer may be
    params = inspect.signature(cls).parameters
    open_ended = not isinstance(base, Optimizer) and any(p.kind is p.VAR_KEYWORD for p in params.values())
    taken = [] if isinstance(base, Optimizer) else [
        n for n, p in params.items() if n != "params" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for name in optimizer_kwargs:
        if name in taken:
            continue
        close = difflib.get_close_matches(name, [*grass_names, *taken], n=1, cutoff=0.75)
        if not close and (open_ended or isinstance(base, Optimizer)):
            continue  # its own check, or build_base_optimizer's (an instance takes no hyperparameters)
        if open_ended and close[0] in taken:
            continue
        hint = f"did you mean {close[0]}?" if close else (
            f"GrassAdamW takes {', '.join(grass_names)}; {cls.__name__} takes {', '.join(taken)}")
        raise TypeError(f"Invalid argument {name}={optimizer_kwargs[name]!r}: neither a GrassAdamW setting nor an "
                        f"argument of base_optimizer={cls.__name__} ({hint})")


def _check_active_layers(groups: list[dict[str, Any]], partition: LayerPartition, active_layers: int) -> None:
    trainable = {g[GROUP_BLOCK] for g in groups if g[GROUP_BLOCK] is not None
                 and any(is_trainable(p) for p in g["params"])}
    if active_layers > len(trainable):
        raise ValueError(f"Invalid active_layers: {active_layers} (expected an int in "
                         f"[1, {len(trainable)}]: the model has {partition.num_layers} blocks, "
                         f"{len(trainable)} of them with trainable parameters in the optimizer)")


def _check_base_class(cls: type) -> None:
    if getattr(cls, "_grass_facade", False):
        raise TypeError("Invalid base_optimizer: GrassAdamW cannot wrap another GrassAdamW")
    if issubclass(cls, torch.optim.LBFGS):
        raise TypeError("Invalid base_optimizer: LBFGS keeps one flat parameter group and "
                        "re-evaluates the closure, so it cannot train blocks by turns")


# ---------------------------------------------------------------------------------------- stepping
@contextmanager
def step_hooks_once(opt: Optimizer) -> Iterator[None]:
    """Fire ``opt``'s step hooks (its own and the global ones) once around the enclosed steps, as
    ``Optimizer.profile_hook_step`` fires them around one ``opt.step()``: the enclosed code runs
    :func:`step_groups_of`, which calls the unhooked step, any number of times.

    Step arguments are fixed here (no closure), so a pre-hook's replacement arguments are not used.
    """
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(opt).__name__}.step"):
        for hook in chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
            hook(opt, (opt,), {})
        yield
        if hasattr(opt.step, "_wrapped_by_lr_sched"):
            opt._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler's patched step records
        for hook in chain(opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
            hook(opt, (opt,), {})


def step_groups_of(opt: Optimizer, block: int | None) -> None:
    """Run ``opt``'s step, without its hooks, on the groups of one block (``None``: the outside)."""
    groups = opt.param_groups
    subset = [g for g in groups if g[GROUP_BLOCK] == block]
    if not subset:
        return
    step = type(opt).step
    # torch.optim wraps every subclass's step() with its hooks (Optimizer._patch_step_function).
    unhooked = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
    opt.param_groups = subset
    try:
        unhooked(opt)
    finally:
        opt.param_groups = groups

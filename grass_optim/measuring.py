"""Measuring: each optimizer step, the sampler's signal for every block that got gradients.

The signal (``sampler.signal``, see :mod:`grass_optim.sampling`) is ``"rms"`` (gradient RMS),
``"l1"`` (``||g||_1``) or ``"gain"`` (``<g, theta_before - theta_after>`` over the update). It is
measured three ways, and handed as ``(values, hits)`` to :meth:`Schedule.advance
<grass_optim.schedule.Schedule.advance>`, which records it when the step is counted:

* from the gradients ``step()`` sees: one batched reduction over the gradients of the blocks that
  keep them (the active set while training);
* from gradient hooks, for the blocks that get gradients but are not updated (every block while
  probing, the inactive ones on a ``refresh_all`` step) when ``probe_low_memory=True``: a
  post-accumulate-grad hook adds the block's partial sum (``||g||^2``, or ``||g||_1``) to the
  schedule's ``hook_sum`` and frees the gradient at once, so those steps never hold every gradient;
* for ``"gain"``: from two batched dot products ``<g, theta>`` per updated block, one before and one
  after the update (no copy of the parameters).

Nothing here reads a value back to the host: ordinary steps never synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from . import distributed as D
from .importance import block_dots, block_grad_rms, block_partial_sums, foreach_norms
from .schedule import Schedule

__all__ = ["BlockMeasurer", "Record", "check_grad_scaler"]

# One step's signal: (per-block values, per-block hits), for Schedule.advance.
Record = tuple[Tensor, Tensor]

# The per-gradient partial sum of each signal: ||g||_2^2 for "rms" (then sqrt(sum / N) per block),
# ||g||_1 for "l1"; also the power of the loss scale in it.
_ORD = {"rms": 2, "l1": 1, "gain": 2}


def check_grad_scaler(scaler: Any) -> None:
    if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
        raise TypeError(f"Invalid grad_scaler: {type(scaler).__name__} (expected None or a torch.amp.GradScaler)")


class BlockMeasurer:
    """The sampler's signal for the managed block parameters.

    Args:
        blocks (list of lists of Tensor): the managed parameters of each block.
        signal (str): ``"rms"``, ``"l1"`` or ``"gain"``.
        hooks (bool): measure blocks that are not updated (probing, ``refresh_all``) with gradient
            hooks that free each gradient (``probe_low_memory``).
        sharded (bool): parameters are DTensor shards (FSDP2): partial sums are added across ranks.
        grad_scaler (GradScaler, optional): its scale is divided out of the hooks' sums.
    """

    def __init__(self, blocks: Sequence[Sequence[Tensor]], *, signal: str = "rms", hooks: bool, sharded: bool,
                 grad_scaler: Any = None) -> None:
        self.blocks = blocks
        self.signal = signal
        self.hooks = hooks
        self.sharded = sharded
        check_grad_scaler(grad_scaler)
        self.grad_scaler = grad_scaler
        self._numel: Tensor | None = None
        self._handles: list[Any] = []
        self._hooked: tuple[int, ...] = ()
        self._plan: tuple[tuple[int, ...], list[Tensor], Tensor, Tensor] | None = None
        self._before_update: Tensor | None = None
        self._subsets: dict[tuple[int, ...], Tensor] = {}  # see _with_grads

    # ------------------------------------------------------------------ the step
    def measure(self, schedule: Schedule) -> Record | None:
        """Before the update: this step's signal of every block that got gradients, as ``(values,
        hits)`` for :meth:`Schedule.advance <grass_optim.schedule.Schedule.advance>` (None for
        ``"gain"``, measured around the update). Changes nothing: a step that fails after it and is
        tried again measures again."""
        if self.signal == "gain":
            return None  # only an update gives a gain: see after_update()
        ord = _ORD[self.signal]
        partial = torch.zeros(schedule.num_blocks, dtype=torch.float64, device=schedule.device)
        hits = torch.zeros(schedule.num_blocks, dtype=torch.int64, device=schedule.device)
        if self._hooked:
            # The hooks already reduced these blocks' gradients during backward (seen before unscaling).
            hook_sum, hook_hits = schedule.hook_sums()
            if self.grad_scaler is not None:
                hook_sum = hook_sum / self._loss_scale(hook_sum.device) ** ord
            if self.sharded:
                D.sum_over_ranks(hook_hits)
            partial += hook_sum
            hits += hook_hits
        params, index = self._with_grads(schedule)
        if params:
            partial += block_partial_sums(_grads(params), index, schedule.num_blocks, ord)
            hits.index_fill_(0, index, 1)
        if self.sharded:
            D.sum_over_ranks(partial)  # each rank holds a shard: a block's sum is global, not per-shard
        return self._finish(partial), hits

    def before_update(self, schedule: Schedule) -> None:
        """``"gain"``: ``<g, theta>`` of each updated block, before the update."""
        if self.signal == "gain":
            self._before_update = self._grad_dot_params(schedule)

    def after_update(self, schedule: Schedule, skipped: Collection[int] = ()) -> Record | None:
        """``"gain"``: ``<g, theta_before> - <g, theta_after>`` of each block updated now, as ``(values,
        hits)`` (the ``skipped`` blocks were updated by an earlier, failed try of this step: no gain now)."""
        if self.signal != "gain" or self._before_update is None:
            return None
        gain = self._before_update - self._grad_dot_params(schedule)
        self._before_update = None
        measured = torch.zeros(schedule.num_blocks, dtype=torch.int64, device=schedule.device)
        measured.index_fill_(0, self._with_grads(schedule)[1], 1)
        if skipped:
            measured[list(skipped)] = 0
        return gain.to(torch.float32), measured

    # ------------------------------------------------------------------ following the schedule
    def prepare(self, schedule: Schedule) -> None:
        """Follow the schedule's phase: hook the blocks that get gradients but are not updated (when
        ``hooks``), and plan the batched reduction over the others (built on a step that already
        synchronises)."""
        updated = set(() if schedule.is_probing else schedule.active)
        want = tuple(i for i in schedule.gradient_blocks if i not in updated) if self.hooks else ()
        if want != self._hooked:
            self.remove_hooks()
            sum_views, hit_views = schedule.hook_sum.unbind(0), schedule.hook_hits.unbind(0)
            for i in want:
                for p in self.blocks[i]:
                    self._handles.append(p.register_post_accumulate_grad_hook(
                        _hook(sum_views[i], hit_views[i], _ORD[self.signal])))
            self._hooked = want
        self._measure_plan(schedule)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooked = ()

    def moved(self, schedule: Schedule) -> None:
        """The schedule's buffers moved to another device: rebuild what points at the old ones."""
        self.remove_hooks()
        self._plan = None
        self._numel = None
        self.prepare(schedule)

    # ------------------------------------------------------------------ internals
    def _finish(self, partial: Tensor) -> Tensor:
        if self.signal == "rms":
            if self._numel is None or self._numel.device != partial.device:
                self._numel = torch.tensor([sum(p.numel() for p in ps) for ps in self.blocks],
                                           dtype=torch.float64, device=partial.device)
            return block_grad_rms(partial, self._numel)
        return partial  # l1: the block's ||g||_1

    def _grad_dot_params(self, schedule: Schedule) -> Tensor:
        """Per-block ``<g, theta>`` of the blocks measured from their gradients (float64)."""
        params, index = self._with_grads(schedule)
        out = block_dots(_grads(params), [D.local(p.detach()) for p in params], index, schedule.num_blocks)
        if self.sharded:
            D.sum_over_ranks(out)
        return out

    def _loss_scale(self, device: torch.device) -> Tensor:
        """The GradScaler's current scale as a tensor; its own tensor when it has one (no sync)."""
        scale = getattr(self.grad_scaler, "_scale", None)
        if isinstance(scale, Tensor):
            return scale.to(device, torch.float32)
        return torch.tensor(float(self.grad_scaler.get_scale()), device=device)

    def _with_grads(self, schedule: Schedule) -> tuple[list[Tensor], Tensor]:
        """The planned parameters that have a gradient, and their block indices on the device."""
        _, params, index, owners_cpu = self._measure_plan(schedule)
        if all(p.grad is not None for p in params):
            return params, index
        # Parameters without a gradient (unused in this forward): usually the same ones step after
        # step, so their index is cached per set (cleared with the plan) instead of copied each step.
        keep = tuple(i for i, p in enumerate(params) if p.grad is not None)
        cached = self._subsets.get(keep)
        if cached is None:
            cached = owners_cpu[list(keep)]
            if schedule.device.type != "cpu":  # pinned and non-blocking: the host does not wait
                cached = cached.pin_memory().to(schedule.device, non_blocking=True)
            if len(self._subsets) >= 64:  # e.g. MoE experts routed differently at every step
                self._subsets.clear()
            self._subsets[keep] = cached
        return [params[i] for i in keep], cached

    def _measure_plan(self, schedule: Schedule) -> tuple[tuple[int, ...], list[Tensor], Tensor, Tensor]:
        """The blocks measured from their gradients (those that get gradients and are not hooked) and
        their parameters with block indices, built once per set."""
        hooked = set(self._hooked)
        blocks = tuple(i for i in schedule.gradient_blocks if i not in hooked)
        if self._plan is None or self._plan[0] != blocks:
            params = [p for i in blocks for p in self.blocks[i]]
            owners = torch.tensor([i for i in blocks for _ in self.blocks[i]], dtype=torch.int64)
            # A host-to-device copy: done when the set changes (a step that already synchronises),
            # so that the steps in between never wait for the device.
            self._plan = (blocks, params, owners.to(schedule.device), owners)
            self._subsets = {}
        return self._plan


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    """The (local shards of the) gradients of parameters known to have one."""
    return [D.local(cast(Tensor, p.grad)) for p in params]


def _hook(sum_view: Tensor, hit_view: Tensor, ord: int) -> Callable[[Tensor], None]:
    """Post-accumulate-grad hook: add the gradient's partial sum to its block's, free the gradient.

    Closes over two 0-d views into the schedule's per-block sums (not over the optimizer), so a
    forgotten hook cannot keep the optimizer alive. Eager even when backward runs under
    ``torch.compile``: traced, its in-place adds to those views were dropped (scores of 0).
    """
    @torch.compiler.disable
    def hook(param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        g = grad.coalesce().values() if grad.is_sparse else grad
        norm = foreach_norms([D.local(g)], ord)[0].to(sum_view.device, torch.float64)
        sum_view.add_(norm.square() if ord == 2 else norm)
        hit_view.add_(1)
        param.grad = None
    return hook

"""Measuring: each optimizer step, the squared gradient norm of every block that got gradients.

Two ways, both ending in :meth:`Schedule.record <grass_optim.schedule.Schedule.record>`:

* from the gradients ``step()`` sees (training, and probing with ``probe_low_memory=False`` or in
  multi-process runs): one batched norm over the active blocks' gradients;
* while probing with ``probe_low_memory=True``: a post-accumulate-grad hook on every block
  parameter adds ``||grad||^2`` to its block's sum in the schedule and frees the gradient at once,
  so probing never holds all gradients; ``step()`` then reads the sums.

Nothing here reads a value back to the host: ordinary steps never synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import distributed as D
from .importance import block_sq_norms, foreach_norms
from .schedule import Schedule

__all__ = ["BlockMeasurer", "check_grad_scaler"]


def check_grad_scaler(scaler: Any) -> None:
    if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
        raise TypeError(f"Invalid grad_scaler: {type(scaler).__name__} (expected None or a torch.amp.GradScaler)")


class BlockMeasurer:
    """Per-block squared gradient norms of the managed block parameters.

    Args:
        blocks (list of lists of Tensor): the managed parameters of each block.
        probe_hooks (bool): measure probing steps with the low-memory hooks.
        sharded (bool): parameters are DTensor shards (FSDP2): norms are summed across ranks.
        grad_scaler (GradScaler, optional): its scale is divided out of the hooks' sums.
    """

    def __init__(self, blocks: Sequence[Sequence[Tensor]], *, probe_hooks: bool, sharded: bool,
                 grad_scaler: Any = None) -> None:
        self.blocks = blocks
        self.probe_hooks = probe_hooks
        self.sharded = sharded
        check_grad_scaler(grad_scaler)
        self.grad_scaler = grad_scaler
        self._handles: list[Any] = []
        self._plan: tuple[tuple[int, ...], list[Tensor], Tensor, Tensor] | None = None

    def measure(self, schedule: Schedule) -> None:
        """Add this step's per-block norms to the schedule's window; no host synchronisation."""
        if schedule.is_probing and self.probe_hooks:
            # The hooks already reduced each gradient to its squared norm during backward.
            sq, hits = schedule.take_probe_sums()
            if self.grad_scaler is not None:
                sq = sq / self._loss_scale(sq.device).square()
            if self.sharded:
                D.sum_over_ranks(hits)
        else:
            grads, index = self._gathered_grads(schedule)
            sq = block_sq_norms([D.local(g) for g in grads], index, schedule.num_blocks)
            hits = torch.zeros(schedule.num_blocks, dtype=torch.int64, device=schedule.device).index_fill_(0, index, 1)
        if self.sharded:
            D.sum_over_ranks(sq)  # each rank holds a shard: a block's norm is global, not per-shard
        schedule.record(sq, hits)

    def prepare(self, schedule: Schedule) -> None:
        """Follow the schedule's phase: build the list of parameters to measure for the blocks that get
        gradients now (on a step that already synchronises), and install the probing hooks while
        probing, remove them after."""
        self._measure_plan(schedule)
        want = schedule.is_probing and self.probe_hooks
        if want and not self._handles:
            sq_views, hit_views = schedule.probe_sq.unbind(0), schedule.probe_hits.unbind(0)
            for i, params in enumerate(self.blocks):
                for p in params:
                    self._handles.append(p.register_post_accumulate_grad_hook(_probe_hook(sq_views[i], hit_views[i])))
        elif not want:
            self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def moved(self, schedule: Schedule) -> None:
        """The schedule's buffers moved to another device: rebuild what points at the old ones."""
        self.remove_hooks()
        self._plan = None
        self.prepare(schedule)

    def _loss_scale(self, device: torch.device) -> Tensor:
        """The GradScaler's current scale as a tensor; its own tensor when it has one (no sync)."""
        scale = getattr(self.grad_scaler, "_scale", None)
        if isinstance(scale, Tensor):
            return scale.to(device, torch.float32)
        return torch.tensor(float(self.grad_scaler.get_scale()), device=device)

    def _gathered_grads(self, schedule: Schedule) -> tuple[list[Tensor], Tensor]:
        _, params, index, owners_cpu = self._measure_plan(schedule)
        grads = [p.grad for p in params]
        if all(g is not None for g in grads):
            return grads, index  # type: ignore[return-value]
        keep = [i for i, g in enumerate(grads) if g is not None]  # unused parameters: rare path
        return [grads[i] for i in keep], owners_cpu[keep].to(schedule.device)  # type: ignore[misc]

    def _measure_plan(self, schedule: Schedule) -> tuple[tuple[int, ...], list[Tensor], Tensor, Tensor]:
        """Parameters of the blocks that get gradients and their block indices, built once per active set."""
        active = schedule.active_blocks
        if self._plan is None or self._plan[0] != active:
            params = [p for i in active for p in self.blocks[i]]
            owners = torch.tensor([i for i in active for _ in self.blocks[i]], dtype=torch.int64)
            # A host-to-device copy: done when the active set changes (a step that already
            # synchronises), so that the steps in between never wait for the device.
            self._plan = (active, params, owners.to(schedule.device), owners)
        return self._plan


def _probe_hook(sq_view: Tensor, hit_view: Tensor) -> Callable[[Tensor], None]:
    """Post-accumulate-grad hook for probing: keep ``||grad||^2`` of the block, free the gradient.

    Closes over two 0-d views into the schedule's per-block sums (not over the optimizer), so a
    forgotten hook cannot keep the optimizer alive.
    """
    def hook(param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        g = grad.coalesce().values() if grad.is_sparse else grad
        sq_view.add_(foreach_norms([D.local(g)])[0].to(sq_view.device, torch.float32).square())
        hit_view.add_(1)
        param.grad = None
    return hook

"""Memory accounting: what the optimizer holds now (:class:`MemoryReport`) and what a setup will
need on the device before training starts (:func:`estimate_memory`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import DEFAULT_ACTIVE_LAYERS, DEFAULT_OUTSIDE_BLOCKS, OUTSIDE_BLOCKS_CHOICES, check_choice, check_int
from .layers import find_layers, is_trainable

logger = logging.getLogger(__name__)

__all__ = ["MemoryEstimate", "MemoryReport", "estimate_memory"]

# Blocks whose state a "stream" step holds on the device at once: the one being updated and the
# one being prefetched (the write-back of the previous one is in flight, its memory about to be freed).
STREAM_RESIDENT_BLOCKS = 2


@dataclass(frozen=True)
class MemoryReport:
    """Where the optimizer state is now, in bytes, and how much has been copied so far.

    State tensors of one or more dimensions (moments, momentum buffers) are counted where they
    are; 0-d tensors (AdamW's ``step``) never move and are counted apart, in ``scalar_state_bytes``.
    """

    device_state_bytes: int  # state tensors on the parameters' device
    host_state_bytes: int  # state tensors parked in host buffers (or kept on the host by the base)
    scalar_state_bytes: int  # 0-d state tensors, wherever they are
    pinned_bytes: int  # page-locked host memory allocated for parking (0 without an accelerator)
    host_buffer_bytes: int  # all host buffers allocated for parking, pinned or not
    bytes_to_host: int  # copied device -> host since construction
    bytes_to_device: int  # copied host -> device since construction
    device_state_bytes_per_block: tuple[int, ...]
    device_state_bytes_outside: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted device bytes per method: weights, gradients and optimizer state.

    ``rows[method]`` has keys ``weights``, ``gradients``, ``optimizer_state`` and ``total``.
    Methods: ``adamw``; ``lisa`` (uniform sampling, states kept on the device: once every block has
    been visited they all are there); ``grass`` (same, without offloading); ``grass-inactive`` and
    ``grass-stream`` (the offload modes). Activations are not included.
    """

    rows: dict[str, dict[str, int]]
    num_layers: int
    active_layers: int
    block_numel: tuple[int, ...]
    outside_numel: int
    outside_dominates: bool

    def table(self) -> str:
        """A Markdown table in GiB."""
        gib = 1024**3
        lines = ["| method | weights | gradients | optimizer state | total |", "|---|---|---|---|---|"]
        for name, r in self.rows.items():
            lines.append(f"| {name} | {r['weights'] / gib:.2f} | {r['gradients'] / gib:.2f} | "
                         f"{r['optimizer_state'] / gib:.2f} | {r['total'] / gib:.2f} |")
        return "\n".join(lines)


def estimate_memory(model: nn.Module, *, active_layers: int = DEFAULT_ACTIVE_LAYERS,
                    layers: str | Sequence[nn.Module] | None = None,
                    outside_blocks: str = DEFAULT_OUTSIDE_BLOCKS, state_tensors_per_param: int = 2,
                    state_dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Predict device memory for weights, gradients and optimizer state, before training.

    Bounds are taken over the ``active_layers`` largest blocks, so they hold whichever are drawn.
    Only trainable parameters (``requires_grad=True``, or frozen by a GrassAdamW because their
    block is inactive) get gradients and state.

    Args:
        model (nn.Module): the model (its parameters may be on any device, or on ``meta``).
        active_layers (int, optional): blocks trained at a time (default: 2).
        layers (str or list of nn.Module, optional): as in :class:`~grass_optim.GrassAdamW`.
        outside_blocks (str, optional): ``"train"`` or ``"freeze"`` (default: "train").
        state_tensors_per_param (int, optional): state tensors the optimizer keeps per parameter,
            2 for AdamW's moments, 1 for SGD with momentum (default: 2).
        state_dtype (torch.dtype, optional): dtype of the state; ``None`` means each parameter's
            own dtype, as torch.optim allocates it (default: None).
    """
    part = find_layers(model, layers)
    check_int("active_layers", active_layers, 1, part.num_layers)
    check_choice("outside_blocks", outside_blocks, OUTSIDE_BLOCKS_CHOICES)
    check_int("state_tensors_per_param", state_tensors_per_param, 0)

    def size(p: torch.Tensor) -> int:
        return p.numel() * p.element_size()

    def state(p: torch.Tensor) -> int:
        item = p.element_size() if state_dtype is None else torch.empty((), dtype=state_dtype).element_size()
        return state_tensors_per_param * p.numel() * item

    weights = sum(size(p) for p in {id(p): p for p in model.parameters()}.values())
    blocks = [[p for p in ps if is_trainable(p)] for ps in part.block_params]
    outside = [p for p in part.outside_params if is_trainable(p)] if outside_blocks == "train" else []
    block_grad = sorted((sum(size(p) for p in ps) for ps in blocks), reverse=True)
    block_state = sorted((sum(state(p) for p in ps) for ps in blocks), reverse=True)
    out_grad, out_state = sum(size(p) for p in outside), sum(state(p) for p in outside)
    all_trainable = [p for ps in blocks for p in ps] + [p for p in part.outside_params if is_trainable(p)]

    def row(grads: int, opt_state: int) -> dict[str, int]:
        return {"weights": weights, "gradients": grads, "optimizer_state": opt_state,
                "total": weights + grads + opt_state}

    grads = sum(block_grad[:active_layers]) + out_grad
    kept_all = sum(block_state) + out_state
    rows = {
        "adamw": row(sum(size(p) for p in all_trainable), sum(state(p) for p in all_trainable)),
        "lisa": row(grads, kept_all),
        "grass": row(grads, kept_all),
        "grass-inactive": row(grads, sum(block_state[:active_layers]) + out_state),
        "grass-stream": row(grads, sum(block_state[:min(active_layers, STREAM_RESIDENT_BLOCKS)]) + out_state),
    }
    block_numel = tuple(sum(p.numel() for p in ps) for ps in blocks)
    outside_numel = sum(p.numel() for p in outside)
    active_numel = sum(sorted(block_numel, reverse=True)[:active_layers])
    dominates = outside_numel > active_numel
    if dominates:
        logger.warning(
            "estimate_memory: the always-trained parameters outside the blocks (%d) outnumber those of "
            "the %d largest active blocks (%d); their gradients and state dominate, so layer-wise "
            "sampling saves less. Consider outside_blocks='freeze' or sampling them as blocks (layers=).",
            outside_numel, active_layers, active_numel)
    return MemoryEstimate(rows=rows, num_layers=part.num_layers, active_layers=active_layers,
                          block_numel=block_numel, outside_numel=outside_numel, outside_dominates=dominates)

"""Memory accounting: what the optimizer holds now (:func:`memory_report`) and what a setup will
need on the device before training starts (:func:`estimate_memory`).

Both count optimizer state the same way: tensors of one or more dimensions (moments, momentum
buffers) where they are; 0-d tensors (AdamW's ``step``) apart. Which blocks' state the device
holds under each ``offload=`` mode comes from :class:`~grass_optim.placement.OffloadPolicy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import DEFAULT_ACTIVE_LAYERS, DEFAULT_OUTSIDE_BLOCKS, OUTSIDE_BLOCKS_CHOICES, check_choice, check_int
from .freezing import is_trainable
from .layers import LayerPartition, find_layers
from .offload import HostPool, StateOffloader, local_bytes
from .placement import OffloadPolicy

logger = logging.getLogger(__name__)

__all__ = ["MemoryEstimate", "MemoryReport", "estimate_memory", "memory_report"]


@dataclass(frozen=True)
class MemoryReport:
    """Where the optimizer state is now, in bytes, and how much has been copied so far.

    State tensors of one or more dimensions (moments, momentum buffers) are counted where they
    are; 0-d tensors (AdamW's ``step``) never move and are counted apart, in ``scalar_state_bytes``.
    """

    device_state_bytes: int  # state tensors on the parameters' device
    host_state_bytes: int  # state tensors parked in host buffers (or kept on the host by the base)
    scalar_state_bytes: int  # 0-d state tensors, wherever they are
    pinned_bytes: int  # page-locked host memory held for parking, as the pinned allocator rounds it (each
    # allocation up to a power of two); 0 without an accelerator
    host_buffer_bytes: int  # all host buffers allocated for parking, pinned or not
    bytes_to_host: int  # copied device -> host since construction
    bytes_to_device: int  # copied host -> device since construction
    device_state_bytes_per_block: tuple[int, ...]
    device_state_bytes_outside: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def memory_report(state: Mapping[Any, dict[str, Any]], partition: LayerPartition | None = None,
                  offloader: StateOffloader | None = None) -> MemoryReport:
    """Where the state in ``state`` (any optimizer's ``state``) is now. Reads sizes only: no sync.

    A state tensor is *on the device* when it is on its parameter's device and not parked in one of
    ``offloader``'s host buffers. Without ``partition`` every parameter counts as outside the blocks.
    Bytes are this process's: a sharded state (FSDP2's DTensors) counts its local shard.
    """
    per_block = [0] * (partition.num_layers if partition is not None else 0)
    outside = host = scalars = 0
    for p, st in state.items():
        block = partition.owner(p) if partition is not None and partition.contains(p) else None
        for k, v in st.items():
            if not isinstance(v, Tensor):
                continue
            nbytes = local_bytes(v)  # this rank's: a sharded (FSDP2) state counts its local shard
            if v.dim() == 0:
                scalars += nbytes  # step counters: never moved, a few bytes each
            elif (offloader is not None and offloader.is_parked(p, k, v)) or v.device != p.device:
                host += nbytes
            elif block is None:
                outside += nbytes
            else:
                per_block[block] += nbytes
    buffers = offloader.host_buffer_bytes if offloader is not None else 0
    return MemoryReport(
        device_state_bytes=sum(per_block) + outside, host_state_bytes=host, scalar_state_bytes=scalars,
        pinned_bytes=offloader.pinned_bytes if offloader is not None else 0, host_buffer_bytes=buffers,
        bytes_to_host=offloader.bytes_to_host if offloader is not None else 0,
        bytes_to_device=offloader.bytes_to_device if offloader is not None else 0,
        device_state_bytes_per_block=tuple(per_block), device_state_bytes_outside=outside)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per method: on the device, weights, gradients and optimizer state; on the host,
    the parked state.

    ``rows[method]`` has keys ``weights``, ``gradients``, ``optimizer_state`` (the most the optimizer
    holds on the device, what :meth:`GrassAdamW.memory_report` counts) and ``total`` (their sum);
    ``in_flight`` (state tensors the optimizer has already let go of whose copy to the host has not
    ended: the caching allocator cannot reuse them yet, so they still occupy the device, at a
    redraw in ``"inactive"`` and in every step in ``"stream"``) and ``peak`` (``total`` +
    ``in_flight``: what the device must have room for); ``host_state`` (parked state, every block's
    once each has been parked) and ``pinned`` (the page-locked memory holding it: the slabs the
    buffers are packed into, :class:`~grass_optim.offload.HostPool`).
    Methods: ``adamw``; ``lisa`` (uniform sampling, states kept on the device: once every block has
    been visited they all are there); ``grass`` (same, without offloading); ``grass-inactive`` and
    ``grass-stream`` (the offload modes). Activations are not included. With ``world_size > 1``
    every byte is one rank's share under FSDP2 (:func:`estimate_memory`).
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
        keys = ("weights", "gradients", "optimizer_state", "total", "in_flight", "peak", "host_state", "pinned")
        lines = ["| method | weights | gradients | optimizer state | total | copies in flight | peak "
                 "| host state | host pinned |", "|---" * 9 + "|"]
        for name, r in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[k] / gib:.2f}" for k in keys) + " |")
        return "\n".join(lines)


def estimate_memory(model: nn.Module, *, active_layers: int = DEFAULT_ACTIVE_LAYERS,
                    layers: str | Sequence[str] | Sequence[nn.Module] | None = None,
                    outside_blocks: str = DEFAULT_OUTSIDE_BLOCKS, state_tensors_per_param: int = 2,
                    state_dtype: torch.dtype | None = None, world_size: int = 1, rank: int = 0) -> MemoryEstimate:
    """Predict device memory for weights, gradients and optimizer state, before training.

    Bounds are taken over the ``active_layers`` largest blocks, so they hold whichever are drawn.
    Only trainable parameters (``requires_grad=True``, or frozen by a GrassAdamW because their
    block is inactive) get gradients and state.

    Args:
        model (nn.Module): the model (its parameters may be on any device, or on ``meta``).
        active_layers (int, optional): blocks trained at a time (default: 2).
        layers (str, list of str or list of nn.Module, optional): as in :class:`~grass_optim.GrassAdamW`.
        outside_blocks (str, optional): ``"train"`` or ``"freeze"`` (default: "train").
        state_tensors_per_param (int, optional): state tensors the optimizer keeps per parameter,
            2 for AdamW's moments, 1 for SGD with momentum (default: 2).
        state_dtype (torch.dtype, optional): dtype of the state; ``None`` means each parameter's
            own dtype, as torch.optim allocates it (default: None).
        world_size (int, optional): ranks that FSDP2 (``fully_shard``) shards every parameter over;
            weights, gradients and state are then ``rank``'s shards: dim 0 cut as ``torch.chunk``
            cuts it (``ceil(rows / world_size)`` rows per rank, the last ranks fewer). Sizes are
            read from the global shapes, so ``model`` may be sharded already or not. FSDP2's
            all-gathered blocks during forward/backward are not included. DDP replicates everything
            and its buckets hold every gradient: leave 1 and see ``docs/guides/ddp.md`` (default: 1).
        rank (int, optional): the rank to count, in ``[0, world_size)``; rank 0's shards are the
            largest. The shards themselves are counted: FSDP2 pads every rank's weight storage to
            rank 0's rows, which the ``weights`` row of a later rank does not include (the state rows
            are exact: torch.optim allocates the state like the unpadded shard) (default: 0).
    """
    part = find_layers(model, layers)
    check_int("active_layers", active_layers, 1, part.num_layers)
    check_choice("outside_blocks", outside_blocks, OUTSIDE_BLOCKS_CHOICES)
    check_int("state_tensors_per_param", state_tensors_per_param, 0)
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0, world_size - 1)

    def shape(p: torch.Tensor) -> tuple[int, ...]:
        """This rank's shard of ``p`` (its global shape, even for a DTensor): FSDP2 chunks dim 0."""
        if world_size == 1 or p.dim() == 0:
            return tuple(p.shape)
        rows = p.shape[0]
        per = -(-rows // world_size)
        return (max(0, min(per, rows - rank * per)), *p.shape[1:])

    def numel(p: torch.Tensor) -> int:
        return math.prod(shape(p))

    def size(p: torch.Tensor) -> int:
        return numel(p) * p.element_size()

    def state(p: torch.Tensor) -> int:
        item = p.element_size() if state_dtype is None else state_dtype.itemsize
        return state_tensors_per_param * numel(p) * item

    weights = sum(size(p) for p in {id(p): p for p in model.parameters()}.values())
    blocks = [[p for p in ps if is_trainable(p)] for ps in part.block_params]
    outside = [p for p in part.outside_params if is_trainable(p)] if outside_blocks == "train" else []
    block_grad = sorted((sum(size(p) for p in ps) for ps in blocks), reverse=True)
    block_state = sorted((sum(state(p) for p in ps) for ps in blocks), reverse=True)
    out_grad, out_state = sum(size(p) for p in outside), sum(state(p) for p in outside)
    all_trainable = [p for ps in blocks for p in ps] + [p for p in part.outside_params if is_trainable(p)]

    # Parked: every block's state once each has been parked, packed into pinned slabs as the offloader
    # packs them (block by block, one buffer per state tensor).
    host_state = sum(state(p) for ps in blocks for p in ps)
    pool = HostPool(pinned=True, allocate=False)
    for ps in blocks:
        for p in ps:
            for _ in range(state_tensors_per_param):
                pool.take(shape(p), p.dtype if state_dtype is None else state_dtype)
    pinned = pool.reserved_bytes

    def row(grads: int, opt_state: int, mode: str | None = None, offload: bool = False) -> dict[str, int]:
        policy = OffloadPolicy(mode)
        held = policy.device_blocks(active_layers, part.num_layers)
        in_flight = sum(block_state[held:policy.peak_device_blocks(active_layers, part.num_layers)])
        total = weights + grads + opt_state
        return {"weights": weights, "gradients": grads, "optimizer_state": opt_state, "total": total,
                "in_flight": in_flight, "peak": total + in_flight,
                "host_state": host_state if offload else 0, "pinned": pinned if offload else 0}

    grads = sum(block_grad[:active_layers]) + out_grad

    def kept(mode: str | None) -> int:  # the largest blocks the policy may hold on the device at once
        return sum(block_state[:OffloadPolicy(mode).device_blocks(active_layers, part.num_layers)]) + out_state

    rows = {
        "adamw": row(sum(size(p) for p in all_trainable), sum(state(p) for p in all_trainable)),
        "lisa": row(grads, kept(None)),
        "grass": row(grads, kept(None)),
        "grass-inactive": row(grads, kept("inactive"), "inactive", offload=True),
        "grass-stream": row(grads, kept("stream"), "stream", offload=True),
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

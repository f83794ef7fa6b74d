"""Multi-process training: one schedule on every rank, global norms of sharded gradients, and the
checks that turn DDP's silent failure modes into clear errors.

Nothing here runs unless ``torch.distributed`` is initialised with more than one process.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .freezing import is_trainable
from .offload import local  # the local shard of a DTensor (re-exported: measuring reads gradients' shards)

__all__ = ["RankChecks", "accelerate_in_use", "check_ddp", "check_ddp_wrappers", "find_ddp_wrappers",
           "is_distributed", "is_sharded", "local", "resolve_seed", "same_on_all_ranks",
           "sum_over_ranks"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where collectives of the default group can run (NCCL only takes CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed, on every rank: the active sets then agree by construction."""
    t = torch.tensor([seed], dtype=torch.int64, device=_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def resolve_seed(seed: int | None, check: bool) -> int:
    """The schedule's seed: ``seed``, or ``torch.initial_seed()`` (read, not consumed) when ``None``.

    In a multi-process run ``None`` takes rank 0's, so every rank draws the same blocks; an explicit
    seed is checked to be the same on every rank (when ``check``).
    """
    resolved = int(seed) if seed is not None else torch.initial_seed() % (2**63)
    if is_distributed():
        if seed is None:
            return broadcast_seed(resolved)
        if check:
            same_on_all_ranks(torch.tensor([resolved]), "seed", hint="Pass the same seed on every rank.")
    return resolved


class RankChecks:
    """The schedule's agreement checks across data-parallel ranks (``distributed_checks=True``)."""

    def window(self, mean: Tensor, measured: Tensor) -> None:
        # Data-parallel ranks see the same averaged gradients, so the same norms.
        same_on_all_ranks(torch.where(measured, mean, 0.0), "the gradient norms of the trained blocks",
                          rtol=1e-5, hint=DDP_HINT)

    def active(self, active: Sequence[int]) -> None:
        same_on_all_ranks(torch.tensor(active), "the active set",
                          hint="Give GrassAdamW the same seed and settings on every rank.")


def same_on_all_ranks(values: Tensor, what: str, *, rtol: float = 0.0, hint: str = "") -> None:
    """Raise ``RuntimeError`` naming the first rank whose ``values`` differ from rank 0's.

    One ``all_gather`` of a few numbers; called only on steps that already synchronise.
    """
    v = values.detach().to(_device(), torch.float64).flatten()
    gathered = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, v)
    ref = gathered[0].cpu()
    for rank, other in enumerate(gathered[1:], start=1):
        other = other.cpu()
        same = torch.allclose(other, ref, rtol=rtol, atol=0.0, equal_nan=True)
        if not same:
            raise RuntimeError(f"GrassAdamW: ranks disagree on {what}: rank 0 has {ref.tolist()}, rank "
                               f"{rank} has {other.tolist()}. {hint}".rstrip())


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor with a sharded placement (FSDP2's ``fully_shard`` parameters)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def sum_over_ranks(t: Tensor) -> Tensor:
    """In-place all-reduce (sum) over the default group: per-block sums of squares of shards."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        raise RuntimeError("GrassAdamW: sharded parameters on the CPU with an NCCL process group")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


DDP_HINT = ("Their gradients are not averaged across ranks. Wrap the model in DistributedDataParallel "
            "while every parameter requires grad (before GrassAdamW freezes blocks, or while it is "
            "probing), with find_unused_parameters=True, and give the same seed on every rank. If the "
            "ranks do not train one data-parallel model, pass distributed_checks=False.")


def accelerate_in_use() -> bool:
    """True when Hugging Face Accelerate (the Trainer's too) has set up its state in this process.

    Only looks: ``accelerate`` is never imported here."""
    state = sys.modules.get("accelerate.state")
    partial = getattr(state, "PartialState", None)
    return bool(getattr(partial, "_shared_state", None))


def _unused_parameters_hint() -> str:
    hint = "Build it with DistributedDataParallel(model, find_unused_parameters=True)"
    if accelerate_in_use():
        hint += ("; with Accelerate: Accelerator(kwargs_handlers=[DistributedDataParallelKwargs("
                 "find_unused_parameters=True)]) (from accelerate.utils import DistributedDataParallelKwargs); "
                 "with the Hugging Face Trainer: TrainingArguments(ddp_find_unused_parameters=True)")
    return hint


def check_ddp(model: nn.Module) -> None:
    """Refuse a DDP wrapper that cannot train blocks frozen and unfrozen by turns.

    DDP registers the parameters that require grad *when it is built*: one frozen then is never
    all-reduced after it is unfrozen (the ranks silently diverge); and with
    ``find_unused_parameters=False`` a block frozen later makes the next iteration fail with
    "Expected to have finished reduction", after a step whose gradients were not averaged.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    if not model.find_unused_parameters or getattr(model, "static_graph", False):
        raise ValueError(
            "Invalid model: DistributedDataParallel with find_unused_parameters=False (or static_graph=True) "
            "cannot train blocks that GrassAdamW freezes and unfreezes (DDP would wait for gradients of frozen "
            f"blocks). {_unused_parameters_hint()}")
    # DDP's reducer registers only the parameters that required grad when DDP was built.
    logging_data: Any = getattr(model, "_get_ddp_logging_data", None)
    registered = logging_data().get("num_parameter_tensors") if callable(logging_data) else None
    if registered is None:
        return
    ignored: set[str] = getattr(model, "parameters_to_ignore", set())
    wanted = {id(p) for n, p in model.module.named_parameters() if n not in ignored and is_trainable(p)}
    if registered < len(wanted):
        missing = len(wanted) - registered
        raise ValueError(f"Invalid model: DistributedDataParallel was built while {missing} trainable "
                         f"parameters were frozen, so it would never all-reduce them. {DDP_HINT}")


def find_ddp_wrappers(model: nn.Module) -> list[nn.parallel.DistributedDataParallel]:
    """The live DDP modules that wrap ``model`` (built after the optimizer, e.g. by
    ``accelerator.prepare`` or the Trainer). Nothing links a module to its wrappers but the garbage
    collector's list of objects: one scan of the heap, so it is called once, at the first step."""
    ddps = [o for o in gc.get_objects() if isinstance(o, nn.parallel.DistributedDataParallel)]
    return [d for d in ddps if any(m is model for m in d.module.modules())]


def check_ddp_wrappers(model: nn.Module) -> None:
    """:func:`check_ddp` for every DDP that wraps ``model`` though GrassAdamW was given ``model``
    itself (the order ``opt = GrassAdamW(model); model, opt = accelerator.prepare(model, opt)``).

    Called at the first step of a multi-process run, before anything is frozen or updated: DDP's own
    error would come one step after the first freeze, once that step's un-averaged update is applied.
    """
    for ddp in find_ddp_wrappers(model):
        check_ddp(ddp)

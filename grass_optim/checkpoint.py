"""The checkpoint format: ``GrassAdamW.state_dict()`` is torch.optim's dict plus a ``"grass"`` entry.

* ``"state"`` and ``"param_groups"``: what ``torch.optim.Optimizer.state_dict`` makes of the base
  optimizer's state and per-block groups (each carries ``"grass_block"``). With offloading, every
  state tensor is a host copy, wherever it lives (FSDP2: a DTensor over a host copy of its shard).
* ``"grass"``: the schedule's fields (:meth:`Schedule.state_dict <grass_optim.schedule.Schedule.state_dict>`)
  plus ``"history"`` and ``"history_steps"`` (plots only; ``None`` when not recorded), and, only when
  saved between a step that raised part-way and its retry, ``"progress"``: the parts of that step's
  update already applied (``placement.Progress``), so that the resumed run does not apply them twice.

GrassAdamW writes and reads this through its own state-dict hooks, registered when it is built, so
the users' hooks work as on any optimizer: a user's ``state_dict`` post-hook already sees
``"grass"``; a user's ``load_state_dict`` pre-hook sees (and may change) the whole checkpoint before
GRASS checks it; a user's ``load_state_dict`` post-hook sees the restored schedule.

Loading never puts the state of blocks that are not resident (``placement.py``) on the device:
``Optimizer.load_state_dict`` would move every state tensor to its parameter's device at once, the
very peak offloading avoids. :func:`split_parked` takes them out first; they go to host buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .offload import is_dtensor, local, wrap_like
from .placement import Progress

__all__ = ["GRASS", "HISTORY", "HISTORY_DROPPED", "HISTORY_STEPS", "PROGRESS", "check_progress", "grass_entry",
           "host_copies", "progress_entry", "split_parked"]

GRASS = "grass"
HISTORY = "history"  # for plots only: it changes nothing in the future
HISTORY_STEPS = "history_steps"  # the per-step records of history="steps" (likewise)
HISTORY_DROPPED = "history_dropped"  # how many older entries the bounded history let go
PROGRESS = "progress"  # only after a step that raised part-way: what its update already applied
_OUTSIDE = -1  # the groups outside the blocks, in "progress" parts


def progress_entry(progress: Progress) -> dict[str, Any]:
    return {"step": progress.step, "everything": progress.everything,
            "parts": sorted(_OUTSIDE if i is None else i for i in progress.parts)}


def check_progress(entry: dict[str, Any], step: int, num_blocks: int) -> Progress | None:
    """The ``"progress"`` of a checkpoint's ``"grass"`` entry (None when absent), validated."""
    raw = entry.get(PROGRESS)
    if raw is None:
        return None
    parts = raw.get("parts") if isinstance(raw, dict) else None
    if (not isinstance(raw, dict) or raw.get("step") != step or not isinstance(raw.get("everything"), bool)
            or not isinstance(parts, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and _OUTSIDE <= i < num_blocks for i in parts)):
        raise ValueError(f"Invalid state_dict: 'grass' entry 'progress' is {raw!r} (expected {{'step': {step}, "
                         f"'everything': bool, 'parts': ints in [-1, {num_blocks})}})")
    return Progress(step, raw["everything"], {None if i == _OUTSIDE else i for i in parts})


def grass_entry(state_dict: Any) -> dict[str, Any]:
    """The ``"grass"`` entry of a checkpoint, or ``ValueError`` saying why there is none."""
    if not isinstance(state_dict, dict) or GRASS not in state_dict:
        raise ValueError("Invalid state_dict: it has no 'grass' entry, so it was not saved by "
                         "GrassAdamW.state_dict(); to start GRASS from a plain optimizer's state, "
                         "load that into the base optimizer before wrapping it")
    return state_dict[GRASS]


def host_copies(state: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Every state tensor on the host: one place for every state, whatever its home."""
    return {i: {k: _on_host(v) if isinstance(v, Tensor) else v for k, v in st.items()} for i, st in state.items()}


def _on_host(v: Tensor) -> Tensor:
    if is_dtensor(v):
        # A new shard, sharded as before: a parked DTensor views its slab at an offset, and torch.save
        # cannot write a DTensor whose local tensor does not start its storage (torch 2.13).
        return wrap_like(local(v).to("cpu", copy=True), v)
    return v.cpu()


def split_parked(state_dict: dict[str, Any], params: Sequence[Tensor], blocks: Sequence[Sequence[Tensor]],
                 resident: set[int]) -> tuple[dict[Any, Any], dict[int, dict[str, Tensor]]]:
    """Take the movable state (tensors of >= 1 dimension) of non-resident blocks out of a checkpoint.

    ``params`` are the optimizer's parameters in group order (the order the checkpoint numbers them
    in). Returns the remaining ``"state"`` and ``{id(param): {key: tensor}}`` of what was taken out.
    """
    saved_ids = [i for grp in state_dict["param_groups"] for i in grp["params"]]
    saved = dict(state_dict["state"])
    parked: dict[int, dict[str, Tensor]] = {}
    if len(saved_ids) != len(params):
        return saved, parked  # Optimizer.load_state_dict's own check reports the mismatch
    key_of = {id(p): k for p, k in zip(params, saved_ids, strict=True)}
    for i, ps in enumerate(blocks):
        if i in resident:
            continue
        for p in ps:
            key = key_of[id(p)]
            if key not in saved:
                continue
            entry = dict(saved[key])
            moved = {k: entry.pop(k) for k in list(entry) if isinstance(entry[k], Tensor) and entry[k].dim() > 0}
            saved[key] = entry
            parked[id(p)] = moved
    return saved, parked

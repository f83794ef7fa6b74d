"""``torch.distributed.checkpoint`` (DCP) for a model and its GrassAdamW: :func:`save_checkpoint`,
:func:`load_checkpoint`.

Why not torch's ``get_optimizer_state_dict``/``set_optimizer_state_dict``: they keep only
``"state"`` and ``"param_groups"`` (the ``"grass"`` entry is dropped, silently), and when the
optimizer has no state and no parameter a gradient (a fresh optimizer; probing after
``zero_grad()``) they "initialise" it by calling ``step()`` with zero gradients: a counted GRASS step,
or AdamW state for every parameter when given the base optimizer. Here the optimizer's part comes
from :meth:`GrassAdamW.state_dict` and goes back through :meth:`GrassAdamW.load_state_dict`, which
handle offloaded state, a failed step's progress and the ``"grass"`` entry, and change nothing in
the live run; the model's part is torch's ``get_model_state_dict``/``set_model_state_dict``.

What :func:`save_checkpoint` hands to ``dcp.save``::

    "model": get_model_state_dict(model)             # DTensor shards under FSDP2: each rank writes its own
    "optim": {"state": {name: {key: tensor}},       # the base optimizer's tensor state, by parameter name
              "grass": bytes}                        # everything replicated, as one torch.save blob
    ...the caller's ``extra`` entries (any DCP value; ``Stateful`` objects such as an LR scheduler)

The blob holds the param groups (parameters by name), the non-tensor state values, the keys of
each parameter's state (in order), and the ``"grass"`` entry. It is the same on every rank (checked at save), so DCP
writes it once and every rank reads it back. Parameters without state (blocks never trained) have
no entry, and have none after loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .distributed import is_distributed, is_sharded, same_on_all_ranks
from .layers import unwrap_model
from .offload import local, wrap_like

if TYPE_CHECKING:
    from .optimizer import GrassAdamW

__all__ = ["load_checkpoint", "save_checkpoint"]

MODEL = "model"
OPTIM = "optim"
BLOB = "grass"  # under "optim": the replicated part, serialized
FORMAT = 1
_REPLICATED_ONLY = (ckpt.HISTORY, ckpt.HISTORY_STEPS, ckpt.HISTORY_DROPPED)  # may hold per-rank timings


def save_checkpoint(checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: GrassAdamW, *,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Save ``model``, ``optimizer`` (with GRASS's schedule) and ``extra`` with ``dcp.save``.

    Call it on every rank, at any point of the loop (during probing, between ``backward()`` and
    ``step()``, ...): it reads, and changes nothing that a later step uses. Works in a single process
    without a process group. ``extra`` maps names to further DCP values (tensors, plain data, or
    ``Stateful`` objects such as an LR scheduler, whose ``state_dict()`` is saved).
    """
    names = _param_names(model, optimizer)
    extra = _check_extra(extra)
    sd = optimizer.state_dict()
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    tensors = {names[i]: {k: v for k, v in st.items() if isinstance(v, Tensor)} for i, st in sd["state"].items()}
    values = {names[i]: {k: v for k, v in st.items() if not isinstance(v, Tensor)} for i, st in sd["state"].items()}
    grass = _to_cpu(sd[ckpt.GRASS])
    if is_distributed():
        # DCP writes one rank's copy of the replicated part: the others must hold the same.
        same = _serialize({"param_groups": groups, "values": values,
                           "grass": {k: v for k, v in grass.items() if k not in _REPLICATED_ONLY}})
        digest = torch.tensor(list(hashlib.sha256(same).digest()), dtype=torch.float64)
        same_on_all_ranks(digest, "the optimizer's replicated state (param groups, 'grass' entry) at save",
                          hint="Every rank must run the same GrassAdamW settings and steps.")
    blob = _serialize({"format": FORMAT, "param_groups": groups, "values": values,
                       "keys": {names[i]: list(st) for i, st in sd["state"].items()}, "grass": grass})
    state = {MODEL: _model_state_dict(model), OPTIM: {"state": tensors, BLOB: blob}, **extra}
    with _single_process_ok():
        import torch.distributed.checkpoint as dcp
        dcp.save(state, checkpoint_id=os.fspath(checkpoint_id))


def load_checkpoint(checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: GrassAdamW, *,
                    extra: MutableMapping[str, Any] | None = None) -> None:
    """Load a :func:`save_checkpoint` into ``model``, ``optimizer`` and ``extra``, on every rank.

    ``extra`` is filled as ``dcp.load`` fills a state dict: its tensors in place, its ``Stateful``
    objects through ``load_state_dict``, its other values (an int step) replaced by the saved ones.

    Everything is checked before anything changes: a checkpoint of another model (other parameter
    names or shapes, other blocks, another GRASS schedule), of other ``extra`` tensors, or not
    written by :func:`save_checkpoint` raises ``ValueError`` and leaves the model, the optimizer and
    ``extra`` as they were. Then the optimizer's state is read into new tensors, the model's and
    ``extra``'s in place, and the optimizer loaded last: a failure while reading (a damaged file, a
    ``Stateful`` object's own ``load_state_dict``; ``RuntimeError``) can leave the model and
    ``extra`` loaded, never the optimizer alone. The optimizer then holds exactly the saved state
    (nothing for parameters that had none) and continues the saved run.
    """
    import torch.distributed.checkpoint as dcp

    path = os.fspath(checkpoint_id)
    names = _param_names(model, optimizer)
    checked = _check_extra(extra)
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    blob_key = f"{OPTIM}.{BLOB}"
    if blob_key not in metadata:
        raise ValueError(f"Invalid checkpoint {path!r}: it has no {blob_key!r} entry, so it was not written by "
                         "grass_optim.save_checkpoint")
    model_sd = _model_state_dict(model)
    for key, value in _flat_tensors(model_sd, MODEL):
        _check_meta(path, metadata, key, tuple(value.shape))
    missing = [k for k in checked if not any(m == k or m.startswith(f"{k}.") for m in metadata)]
    if missing:
        raise ValueError(f"Invalid extra: the checkpoint {path!r} has no entries {missing} "
                         f"(it has {sorted({m.split('.')[0] for m in metadata} - {MODEL, OPTIM})})")
    for key, value in _flat_tensors(checked, ""):
        meta = _check_meta(path, metadata, key[1:], None)
        if (tuple(meta.size), meta.properties.dtype) != (tuple(value.shape), value.dtype):
            raise ValueError(f"Invalid extra: {key[1:]!r} is {value.dtype} of shape {tuple(value.shape)} here, "
                             f"{meta.properties.dtype} of shape {tuple(meta.size)} in the checkpoint {path!r}")

    saved = _read_shared(path)
    _check_groups(path, names, optimizer, saved["param_groups"])
    # What optimizer.load_state_dict will check, checked now: once the model is read, it must not fail.
    entry = ckpt.grass_entry({ckpt.GRASS: saved["grass"]})
    ckpt.check_progress(entry, optimizer.schedule.check_state_dict(entry)["step"], optimizer.num_layers)
    param_of = {names[i]: p for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    tensors = {n: {k: _like(param_of[n], _check_meta(path, metadata, f"{OPTIM}.state.{n}.{k}", None))
                   for k in keys if k not in saved["values"].get(n, {})} for n, keys in saved["keys"].items()}
    _load(dcp, {OPTIM: {"state": tensors}}, path)  # into templates: nothing of the user's changes

    index = {n: i for i, n in names.items()}
    state = {index[n]: {k: tensors[n][k] if k in tensors[n] else saved["values"][n][k] for k in keys}
             for n, keys in saved["keys"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    rest = {MODEL: model_sd, **checked}
    _load(dcp, rest, path)  # the model's tensors in place, extra's Stateful objects
    optimizer.load_state_dict({"state": state, "param_groups": groups, ckpt.GRASS: saved["grass"]})
    _set_model_state_dict(model, rest[MODEL])
    if extra is not None:
        for k in checked:  # DCP replaces plain values (ints, strings) rather than loading them in place
            extra[k] = rest[k]


# ----------------------------------------------------------------------------- helpers
def _param_names(model: nn.Module, optimizer: GrassAdamW) -> dict[int, str]:
    """The checkpoint's integer index of each optimizer parameter (``Optimizer.state_dict`` numbers
    them in group order) -> its name in the model."""
    if not getattr(optimizer, "_grass_facade", False):
        raise TypeError(f"optimizer must be a GrassAdamW, got {type(optimizer).__name__} (for other optimizers "
                        "use torch.distributed.checkpoint.state_dict directly)")
    root = unwrap_model(model)
    if optimizer.partition.root is not None and root is not optimizer.partition.root:
        raise ValueError("Invalid model: it is not the model this GrassAdamW was built on "
                         f"({type(root).__name__} vs {type(optimizer.partition.root).__name__})")
    by_id = {id(p): n for n, p in root.named_parameters()}
    out: dict[int, str] = {}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if id(p) not in by_id:
            raise ValueError(f"Invalid model: the optimizer's parameter {i} (shape {tuple(p.shape)}) is not a "
                             "parameter of it")
        out[i] = by_id[id(p)]
    return out


def _load(dcp: Any, state: dict[str, Any], path: str) -> None:
    """``dcp.load``, its ``CheckpointException`` (a ``BaseException``, which ``except Exception``
    does not catch) raised as a ``RuntimeError``."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=path)
    except CheckpointException as err:
        raise RuntimeError(f"load_checkpoint: reading {path!r} failed: {err}") from err


def _read_shared(path: str) -> dict[str, Any]:
    """The replicated part of a checkpoint (read by every rank)."""
    import torch.distributed.checkpoint as dcp

    holder: dict[str, Any] = {OPTIM: {BLOB: b""}}
    _load(dcp, holder, path)
    saved = torch.load(io.BytesIO(holder[OPTIM][BLOB]), map_location="cpu", weights_only=True)
    found = saved.get("format") if isinstance(saved, dict) else None
    if found != FORMAT:
        raise ValueError(f"Invalid checkpoint {path!r}: '{OPTIM}.{BLOB}' has format {found!r} "
                         f"(this grass_optim reads {FORMAT})")
    return saved


def _check_groups(path: str, names: dict[int, str], optimizer: GrassAdamW, saved: list[dict[str, Any]]) -> None:
    """The saved param groups hold the same parameters, by name and in order, as ``optimizer``'s."""
    mine, start = [], 0
    for g in optimizer.param_groups:
        mine.append([names[i] for i in range(start, start + len(g["params"]))])
        start += len(g["params"])
    theirs = [list(g["params"]) for g in saved]
    if mine != theirs:
        diff = next((f"group {k}, parameter {j}: saved {t[j] if j < len(t) else None!r}, this optimizer "
                     f"{m[j] if j < len(m) else None!r}" for k, (m, t) in enumerate(zip(mine, theirs, strict=False))
                     for j in range(max(len(m), len(t))) if (m[j:j + 1] != t[j:j + 1])), None)
        raise ValueError(f"Invalid checkpoint {path!r}: saved for an optimizer with {len(theirs)} param groups of "
                         f"{[len(t) for t in theirs]} parameters, this one has {len(mine)} groups of "
                         f"{[len(m) for m in mine]}" + (f" ({diff})" if diff else ""))


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise TypeError(f"extra must map names (str) to values, got {type(extra).__name__}")
    taken = sorted({MODEL, OPTIM} & set(extra))
    if taken:
        raise ValueError(f"Invalid extra: the names {taken} are the model's and the optimizer's "
                         "(choose other names)")
    return dict(extra)


def _model_state_dict(model: nn.Module) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def _set_model_state_dict(model: nn.Module, sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, sd)


def _flat_tensors(sd: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Tensor]]:
    for k, v in sd.items():
        if isinstance(v, Tensor):
            yield f"{prefix}.{k}", v
        elif isinstance(v, Mapping):
            yield from _flat_tensors(v, f"{prefix}.{k}")


def _check_meta(path: str, metadata: Mapping[str, Any], key: str, shape: tuple[int, ...] | None) -> Any:
    """The checkpoint's metadata of tensor ``key``, checked to exist (with ``shape`` when given)."""
    meta = metadata.get(key)
    size = getattr(meta, "size", None)
    if size is None:
        raise ValueError(f"Invalid checkpoint {path!r}: it has no tensor {key!r} (saved for another model?)")
    if shape is not None and tuple(size) != shape:
        raise ValueError(f"Invalid checkpoint {path!r}: {key!r} has shape {tuple(size)}, this model's has {shape}")
    return meta


def _like(param: Tensor, meta: Any) -> Tensor:
    """Where DCP reads a state tensor into (its checkpoint metadata ``meta``): on the host, sharded
    like its parameter when it has the parameter's shape and dtype (FSDP2), else whole.
    ``load_state_dict`` then moves what is resident to the device and puts offloaded state in host
    buffers: the state of parked blocks never passes through the device (except a sharded state
    whose dtype differs from its parameter's: its template is made on the device)."""
    size, dtype = tuple(meta.size), meta.properties.dtype
    if is_sharded(param) and tuple(param.shape) == size:
        if dtype == param.dtype:
            return wrap_like(torch.empty(local(param).shape, dtype=dtype), param)
        return torch.empty_like(param, dtype=dtype)  # a DTensor's spec records its dtype: on the device
    return torch.empty(size, dtype=dtype)


def _to_cpu(value: Any) -> Any:
    """Tensors to the host: the blob must not depend on the rank's device (cuda:0, cuda:1)."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _serialize(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns when there is no process group; a single process is a supported use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield

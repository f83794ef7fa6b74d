"""Layer discovery: which modules are the sampled blocks, and which parameters are always trained.

Blocks (the public API calls them "layers": ``active_layers``, ``layer_names``) are the repeated
layers of the model. A *stack* is an ``nn.ModuleList``/``nn.Sequential`` whose children (those
holding parameters) all have one type, e.g. ``model.layers`` (Llama), ``transformer.h`` (GPT-2),
``encoder.layer`` (BERT/MiniLM). A model may have several: T5 and BART have an encoder stack and a
decoder stack, Whisper too, a vision-language model a vision tower and a language model. Every
stack whose children are composite modules (layers made of layers, not bare ``Linear`` layers) is
sampled, its blocks in one pool, in module order; their names say which stack they are in
(``encoder.block.0``, ``decoder.block.0``). Lists nested inside another stack's children (say, the
experts inside each MoE layer) are not stacks. Without a composite stack (a plain ``Sequential`` of
``Linear`` layers), the longest list is the stack. Every parameter outside the blocks — embeddings,
final norm, head — is "outside" and always trained by default.

A parameter shared between two blocks, or between a block and the outside (tied weights), is put
outside: freezing it with one block would freeze it everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["LayerPartition", "find_layers", "largest_outside", "unwrap_model", "warn_if_mostly_outside"]

_HOW_TO_PASS = ("pass layers= to GrassAdamW: a dotted path to the list of blocks (e.g. "
                "layers='model.layers') or a list of the block modules")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    FSDP2's ``fully_shard`` changes the module in place, so there is nothing to strip for it.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner, nn.Module):
            model = inner
        else:
            return model


@dataclass(frozen=True)
class LayerPartition:
    """The blocks of a model and the parameters of each, plus the parameters outside them."""

    names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]
    block_params: tuple[tuple[nn.Parameter, ...], ...]
    outside_params: tuple[nn.Parameter, ...]
    _owner: dict[int, int | None] = field(repr=False, compare=False)
    root: nn.Module | None = field(default=None, repr=False, compare=False)  # the (unwrapped) model

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def owner(self, param: torch.Tensor) -> int | None:
        """Block index of ``param``, or ``None`` if it is outside the blocks.

        Raises ``KeyError`` for a tensor that is not a parameter of the model.
        """
        return self._owner[id(param)]

    def contains(self, param: torch.Tensor) -> bool:
        return id(param) in self._owner

    def check_unchanged(self) -> None:
        """Raise ``RuntimeError`` if a block no longer holds the parameters found in it (FSDP2's
        ``fully_shard`` and some wrappers replace them: an optimizer built before would train nothing)."""
        for name, block, params in zip(self.names, self.blocks, self.block_params, strict=True):
            now = {id(p) for p in block.parameters()}
            if any(id(p) not in now for p in params):
                raise RuntimeError(f"GrassAdamW: the parameters of block {name!r} were replaced after the optimizer "
                                   "was built (e.g. by fully_shard), so it would train nothing. Build GrassAdamW "
                                   "after fully_shard and any other wrapper that replaces parameters")
        self.check_no_new_parameters()

    def check_no_new_parameters(self) -> None:
        """Raise ``RuntimeError`` if the model gained parameters since discovery (PEFT's
        ``get_peft_model`` adds adapters to the model in place and freezes the rest: an optimizer built
        before would train the frozen base weights and never the adapters)."""
        if self.root is None:
            return
        known = len(self._owner)
        now = sum(1 for _ in self.root.parameters())
        if now != known:
            raise RuntimeError(
                f"GrassAdamW: the model has {now} parameter tensors, {known} when GrassAdamW was built: something "
                "(e.g. get_peft_model, or another wrapper that adds adapters) changed it. Build GrassAdamW after "
                "wrapping the model, so that it trains what the wrapper left trainable")


def _param_children(container: nn.Module) -> list[nn.Module]:
    return [c for c in container.children() if any(True for _ in c.parameters())]


def _candidates(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = _param_children(module)
        if len(children) >= 2 and len({type(c) for c in children}) == 1:
            found.append((name, children))
    # Drop lists that sit inside another candidate's children (MoE experts inside each layer).
    outer = []
    for name, children in found:
        nested = any(other != name and (other == "" or name.startswith(other + ".")) for other, _ in found)
        if not nested:
            outer.append((name, children))
    return outer


def _shared_slots(container: nn.Module) -> tuple[nn.Module, int] | None:
    """The module that fills two or more slots of a list (ALBERT's one layer applied N times), if any."""
    slots = [m for m in container._modules.values() if m is not None and any(True for _ in m.parameters())]
    for m in slots:
        count = sum(1 for other in slots if other is m)
        if count > 1:
            return m, count
    return None


def _refuse_shared(name: str, container: nn.Module) -> None:
    shared = _shared_slots(container)
    if shared is not None:
        module, count = shared
        raise ValueError(
            f"The blocks of {name or type(container).__name__!r} share their parameters: the same "
            f"{type(module).__name__} fills {count} of its slots (as in ALBERT), so there are no separate blocks "
            "to freeze and train by turns. Layer-wise sampling needs blocks with parameters of their own; pass "
            "layers= to sample other modules")


def _composite(module: nn.Module) -> bool:
    """A layer made of layers (a transformer block), not a bare leaf such as ``nn.Linear``."""
    return any(any(True for _ in c.parameters()) for c in module.children())


def _discover(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    candidates = _candidates(model)
    if not candidates:
        for name, module in model.named_modules():
            if isinstance(module, (nn.ModuleList, nn.Sequential)):
                _refuse_shared(name, module)
        raise ValueError(
            f"Could not find the repeated blocks of {type(model).__name__}: no nn.ModuleList or "
            f"nn.Sequential with two or more same-typed children holding parameters; {_HOW_TO_PASS}")

    def size(item: tuple[str, list[nn.Module]]) -> tuple[int, int]:
        _, children = item
        return len(children), sum(p.numel() for c in children for p in c.parameters())

    stacks = [c for c in candidates if all(_composite(m) for m in c[1])]
    if not stacks:
        stacks = [max(candidates, key=size)]  # ties: the first in named_modules() order
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    blocks = [m for _, children in stacks for m in children]
    return [names[id(c)] for c in blocks], blocks


def _from_argument(model: nn.Module, layers: str | Sequence[str] | Sequence[nn.Module]
                   ) -> tuple[list[str], list[nn.Module]]:
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(x, str) for x in layers):
        stacked_names: list[str] = []
        stacked: list[nn.Module] = []
        for path in layers:  # several stacks, e.g. ["encoder.block", "decoder.block"]
            more_names, more_blocks = _from_argument(model, path)
            stacked_names += more_names
            stacked += more_blocks
        if len(set(map(id, stacked))) != len(stacked):
            raise ValueError(f"Invalid layers: {list(layers)} name a block twice (overlapping paths)")
        return stacked_names, stacked
    if isinstance(layers, str):
        if not layers:
            raise ValueError(f"Invalid layers: '' (expected a dotted path to the container of the blocks, "
                             f"e.g. 'model.layers'; {_HOW_TO_PASS})")
        try:
            container = model.get_submodule(layers)
        except AttributeError as err:
            raise ValueError(f"Invalid layers: {layers!r} is not a submodule of "
                             f"{type(model).__name__} ({err})") from None
        _refuse_shared(layers, container)
        children = _param_children(container)
        if len(children) < 1:
            raise ValueError(f"Invalid layers: {layers!r} has no child module holding parameters; "
                             f"{_HOW_TO_PASS}")
        prefix = layers + "."
        child_names = {id(m): n for n, m in container.named_children()}
        return [prefix + child_names[id(c)] for c in children], children
    if isinstance(layers, nn.Module) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise TypeError(f"Invalid layers: {type(layers).__name__} (expected None, a dotted path "
                        "string, a list of them, or a non-empty list of nn.Module blocks)")
    names_by_id = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    out_names = []
    for i, block in enumerate(layers):
        if not isinstance(block, nn.Module):
            raise TypeError(f"Invalid layers[{i}]: {type(block).__name__} (expected an nn.Module)")
        if id(block) not in names_by_id:
            raise ValueError(f"Invalid layers[{i}]: {type(block).__name__} is not a submodule of the model")
        out_names.append(names_by_id[id(block)])
    blocks: list[nn.Module] = list(layers)  # type: ignore[arg-type]  # a str was handled above
    if len(set(map(id, blocks))) != len(blocks):
        raise ValueError("Invalid layers: the same module is listed twice")
    return out_names, blocks


def find_layers(model: nn.Module, layers: str | Sequence[str] | Sequence[nn.Module] | None = None
                ) -> LayerPartition:
    """Split ``model``'s parameters into blocks and outside parameters.

    Args:
        model (nn.Module): the model; DDP and ``torch.compile`` wrappers are stripped first.
        layers (str, list of str or list of nn.Module, optional): ``None`` to auto-detect every
            stack; a dotted path such as ``"model.layers"`` naming the container of the blocks, or
            several (``["encoder.block", "decoder.block"]``); or the block modules themselves.
    """
    model = unwrap_model(model)
    names, blocks = _discover(model) if layers is None else _from_argument(model, layers)
    # Find, for every parameter (counting each appearance), which block(s) hold it.
    prefixes = [n + "." for n in names]
    holders: dict[int, set[int | None]] = {}
    params: dict[int, nn.Parameter] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner = next((i for i, pre in enumerate(prefixes) if pname.startswith(pre)), None)
        holders.setdefault(id(p), set()).add(owner)
        params.setdefault(id(p), p)
    owner_of: dict[int, int | None] = {}
    for pid, hs in holders.items():
        owner_of[pid] = next(iter(hs)) if len(hs) == 1 else None
    block_params = tuple(tuple(p for pid, p in params.items() if owner_of[pid] == i) for i in range(len(blocks)))
    outside = tuple(p for pid, p in params.items() if owner_of[pid] is None)
    return LayerPartition(names=tuple(names), blocks=tuple(blocks), block_params=block_params,
                          outside_params=outside, _owner=owner_of, root=model)


def largest_outside(partition: LayerPartition, top: int = 3) -> list[tuple[str, int]]:
    """The modules holding the most parameters outside the blocks: ``(name, parameter count)``."""
    if partition.root is None:
        return []
    outside = {id(p) for p in partition.outside_params}
    counts: dict[str, int] = {}
    for name, p in partition.root.named_parameters():
        if id(p) in outside:
            module = name.rsplit(".", 1)[0] if "." in name else name
            counts[module] = counts.get(module, 0) + p.numel()
    return sorted(counts.items(), key=lambda kv: -kv[1])[:top]


OUTSIDE_SHARE_WARNING = 0.5  # warn when the always-trained parameters are more than this share


def warn_if_mostly_outside(partition: LayerPartition, trainable: set[int]) -> None:
    """Warn when most trainable parameters are outside the blocks: a missed stack looks like that."""
    outside = sum(p.numel() for p in partition.outside_params if id(p) in trainable)
    total = outside + sum(p.numel() for ps in partition.block_params for p in ps if id(p) in trainable)
    if total and outside / total > OUTSIDE_SHARE_WARNING:
        largest = ", ".join(f"{name} ({n / 1e6:.2f} M)" for name, n in largest_outside(partition))
        logger.warning(
            "GrassAdamW: %.0f %% of the trainable parameters are outside the blocks (largest: %s); they are "
            "trained at every step and keep their state on the device. If a stack of blocks was missed, pass "
            "layers=[...] with the path of every stack; if they are embeddings or heads, consider "
            "outside_blocks='freeze'", 100 * outside / total, largest)

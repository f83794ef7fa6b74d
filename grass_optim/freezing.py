"""Freezing: which parameters GRASS may freeze, and making ``requires_grad`` follow the active set.

GRASS trains a block by leaving ``requires_grad=True`` on its parameters and skips it by setting
``requires_grad=False``: autograd then computes no weight gradient for it and allocates no gradient
memory. Only *managed* parameters are ever touched: those in the optimizer that were trainable when
it was built. A parameter the user froze, or left out of the optimizer, stays as the user left it.

A module-level registry remembers (weakly) which parameters a GRASS optimizer froze, so that a
second optimizer on the same model (a resume in the same process) or :func:`estimate_memory` sees
them as trainable, not as frozen by the user.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from .layers import LayerPartition

__all__ = ["BlockFreezer", "is_trainable", "set_frozen_by_grass"]

# Parameters that a GrassAdamW froze. Weak: the registry never keeps a parameter alive. Keyed by
# id(): tensors compare element-wise, so they cannot be set members themselves.
_FROZEN_BY_GRASS: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def set_frozen_by_grass(param: Tensor, frozen: bool) -> None:
    """Set ``requires_grad = not frozen`` and remember that GRASS, not the user, froze it."""
    param.requires_grad_(not frozen)
    if frozen:
        _FROZEN_BY_GRASS[id(param)] = param
    else:
        _FROZEN_BY_GRASS.pop(id(param), None)


def is_trainable(param: Tensor) -> bool:
    """``requires_grad``, or frozen only because GRASS made its block inactive."""
    return param.requires_grad or _FROZEN_BY_GRASS.get(id(param)) is param


class BlockFreezer:
    """The managed parameters of each block and of the outside, and their ``requires_grad``.

    Args:
        partition (LayerPartition): the blocks and the parameters outside them.
        in_optimizer (collection of int): ``id()`` of every parameter the optimizer holds.
        train_outside (bool): whether the managed outside parameters train (``outside_blocks="train"``).
    """

    def __init__(self, partition: LayerPartition, in_optimizer: Collection[int], train_outside: bool) -> None:
        self.blocks: list[list[Tensor]] = [[p for p in ps if id(p) in in_optimizer and is_trainable(p)]
                                           for ps in partition.block_params]
        self.outside: list[Tensor] = [p for p in partition.outside_params
                                      if id(p) in in_optimizer and is_trainable(p)]
        self.train_outside = train_outside

    @property
    def numel(self) -> list[int]:
        """Managed parameters per block (0: the block is never drawn)."""
        return [sum(p.numel() for p in ps) for ps in self.blocks]

    @property
    def device(self) -> torch.device:
        """Where the managed block parameters live now (the model may move after construction)."""
        first = next((p for ps in self.blocks for p in ps), None)
        return first.device if first is not None else torch.device("cpu")

    def apply(self, active: Collection[int]) -> None:
        """Unfreeze the active blocks, freeze the others and drop their gradients; outside likewise.

        Outside parameters keep their gradients while probing too (they are not updated then): a
        GradScaler needs some gradient to check for infs.
        """
        for i, params in enumerate(self.blocks):
            on = i in active
            for p in params:
                set_frozen_by_grass(p, not on)
                if not on:
                    p.grad = None  # a frozen block holds no gradient memory
        for p in self.outside:
            set_frozen_by_grass(p, not self.train_outside)
            if not self.train_outside:
                p.grad = None

    def drop_grads(self, keep: Sequence[int]) -> None:
        """Drop the gradients of every block not in ``keep`` (computed while it was inactive)."""
        for i, params in enumerate(self.blocks):
            if i not in keep:
                for p in params:
                    p.grad = None

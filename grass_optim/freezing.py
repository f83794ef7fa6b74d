"""Freezing: who owns ``requires_grad``, and making it follow the blocks that get gradients.

GRASS trains a block by leaving ``requires_grad=True`` on its parameters and skips it by setting
``requires_grad=False``: autograd then computes no weight gradient for it and allocates no gradient
memory. ``requires_grad`` is also how users, PEFT, TRL and other tools say "trainable", so the rule
is (``docs/algorithm.md``, "Who owns requires_grad"):

* GRASS manages exactly the parameters that are in the optimizer and trainable when it is built
  (the user's intent), and only ever freezes and unfreezes within that set;
* at every ``step()`` it compares each parameter's ``requires_grad`` with what it last set. A
  managed parameter someone else froze is adopted as the user's new intent: GRASS never trains it
  again. A frozen block someone else unfroze is frozen again, and its gradients never reach the
  update. A parameter outside the managed set that someone made trainable is refused with an error
  (GRASS cannot start training what it was not built with);
* the model can be given back as it was (:meth:`BlockFreezer.restore`, called by
  ``GrassAdamW.restore_model()``, its context manager, and when the optimizer is garbage-collected),
  so a second optimizer afterwards sees the user's freezes, not GRASS's.

A weak registry remembers which parameters a *live* GRASS optimizer froze, so that a second
optimizer built meanwhile on the same model (a resume in the same process) or ``estimate_memory``
sees them as trainable. Entries leave with the optimizer that made them.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from .layers import LayerPartition

logger = logging.getLogger(__name__)

__all__ = ["BlockFreezer", "is_trainable", "set_frozen_by_grass"]

# id(param) -> (the parameter, the token of the optimizer that froze it); both weak.
_FROZEN_BY_GRASS: dict[int, tuple[weakref.ref[Tensor], weakref.ref[object]]] = {}


def _owner_of(param: Tensor) -> object | None:
    entry = _FROZEN_BY_GRASS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1]()


def set_frozen_by_grass(param: Tensor, frozen: bool, owner: object | None = None) -> None:
    """Set ``requires_grad = not frozen`` and remember (weakly) which live optimizer froze it
    (``owner``: an object that lives as long as that optimizer; none: until unfrozen)."""
    param.requires_grad_(not frozen)
    key = id(param)
    if frozen:
        token = owner if owner is not None else _ANONYMOUS
        _FROZEN_BY_GRASS[key] = (weakref.ref(param, lambda _: _FROZEN_BY_GRASS.pop(key, None)), weakref.ref(token))
    else:
        _FROZEN_BY_GRASS.pop(key, None)


class _Token:
    """A weak-referenceable stand-in for an owner."""


_ANONYMOUS = _Token()


def is_trainable(param: Tensor) -> bool:
    """``requires_grad``, or frozen only because a live GRASS optimizer made its block inactive."""
    return param.requires_grad or _owner_of(param) is not None


def _restore(token: _Token, params: list[weakref.ref[Tensor]]) -> None:
    """Give back ``requires_grad=True`` to the parameters ``token``'s optimizer still holds frozen."""
    for ref in params:
        p = ref()
        if p is not None and _owner_of(p) is token:
            set_frozen_by_grass(p, False)


class BlockFreezer:
    """The managed parameters of each block and of the outside, and their ``requires_grad``.

    Args:
        partition (LayerPartition): the blocks and the parameters outside them.
        in_optimizer (collection of int): ``id()`` of every parameter the optimizer holds.
        train_outside (bool): whether the managed outside parameters train (``outside_blocks="train"``).
    """

    def __init__(self, partition: LayerPartition, in_optimizer: Collection[int], train_outside: bool) -> None:
        self.partition = partition
        self.blocks: list[list[Tensor]] = [[p for p in ps if id(p) in in_optimizer and is_trainable(p)]
                                           for ps in partition.block_params]
        self.outside: list[Tensor] = [p for p in partition.outside_params
                                      if id(p) in in_optimizer and is_trainable(p)]
        self.train_outside = train_outside
        managed = {id(p) for p in self.outside} | {id(p) for ps in self.blocks for p in ps}
        # Parameters of the model GRASS does not manage, and the requires_grad they had when it was
        # built (or when a freeze was adopted): only a change of that is someone else's new intent.
        self.unmanaged: dict[int, tuple[Tensor, bool]] = {
            id(p): (p, p.requires_grad) for p in [*partition.outside_params, *(p for ps in partition.block_params
                                                                                 for p in ps)]
            if id(p) not in managed}
        self._expected: dict[int, bool] = {}  # id(param) -> requires_grad GRASS last set
        self._warned_unfrozen = False
        # Registry entries belong to this token; the finaliser gives the model back if the optimizer
        # is garbage-collected without restore_model() (it holds the token, not this object).
        self.token = _Token()
        refs = [weakref.ref(p) for ps in self.blocks for p in ps] + [weakref.ref(p) for p in self.outside]
        weakref.finalize(self, _restore, self.token, refs)

    @property
    def numel(self) -> list[int]:
        """Managed parameters per block (0: the block is never drawn)."""
        return [sum(p.numel() for p in ps) for ps in self.blocks]

    @property
    def device(self) -> torch.device:
        """Where the managed block parameters live now (the model may move after construction)."""
        first = next((p for ps in self.blocks for p in ps), None)
        return first.device if first is not None else torch.device("cpu")

    def apply(self, gradient_blocks: Collection[int]) -> None:
        """Unfreeze the blocks that get gradients, freeze the others and drop their gradients;
        outside likewise. Outside parameters keep their gradients while probing too (they are not
        updated then): a GradScaler needs some gradient to check for infs."""
        for i, params in enumerate(self.blocks):
            on = i in gradient_blocks
            for p in params:
                self._set(p, on)
                if not on:
                    p.grad = None  # a frozen block holds no gradient memory
        for p in self.outside:
            self._set(p, self.train_outside)
            if not self.train_outside:
                p.grad = None

    def _set(self, p: Tensor, on: bool) -> None:
        set_frozen_by_grass(p, not on, self.token)
        self._expected[id(p)] = on

    def check(self, names: dict[int, str]) -> bool:
        """Compare every parameter's ``requires_grad`` with what GRASS last set (after :meth:`apply`);
        adopt another party's freezes, re-freeze blocks it unfroze, refuse new trainable parameters.

        Returns True when a block was unfrozen by someone else (its gradients must be dropped).
        ``names`` maps ``id(param)`` to its name, for the messages.
        """
        for p, was in self.unmanaged.values():
            if p.requires_grad and not was:
                raise RuntimeError(
                    f"GrassAdamW: parameter {names.get(id(p), tuple(p.shape))!r} was frozen (or not in the "
                    "optimizer) when GrassAdamW was built, and now requires grad. GrassAdamW trains only what "
                    "was trainable when it was built and will not update it: freeze it again, or build a new "
                    "GrassAdamW (after the change) to train it")
        unfrozen = False
        for params in [*self.blocks, self.outside]:
            for p in list(params):
                expected = self._expected.get(id(p))
                if expected is None or p.requires_grad == expected:
                    continue
                if expected:  # trained by GRASS, frozen by someone else: their intent now
                    self._adopt_freeze(p, names, params)
                else:  # frozen by GRASS (an inactive block), unfrozen by someone else
                    unfrozen = True
                    set_frozen_by_grass(p, True, self.token)
        if unfrozen and not self._warned_unfrozen:
            self._warned_unfrozen = True
            logger.warning("GrassAdamW: parameters it had frozen (inactive blocks) were set to requires_grad=True "
                           "by someone else (e.g. model.requires_grad_(True)); GrassAdamW froze them again, and "
                           "their gradients never reach the update. To stop training a parameter, freeze it; to "
                           "train the whole model, use another optimizer after GrassAdamW.restore_model()")
        return unfrozen

    def _adopt_freeze(self, p: Tensor, names: dict[int, str], owner_list: list[Tensor]) -> None:
        owner_list.remove(p)
        self._expected.pop(id(p), None)
        self.unmanaged[id(p)] = (p, False)
        p.grad = None
        logger.warning("GrassAdamW: %s was frozen by someone else after GrassAdamW was built; it is not trained "
                       "again (taken as the new intent)", names.get(id(p), tuple(p.shape)))

    def drop_grads(self, keep: Sequence[int]) -> None:
        """Drop the gradients of every block not in ``keep`` (computed while it was inactive), and of the
        outside parameters when they are not trained."""
        for i, params in enumerate(self.blocks):
            if i not in keep:
                for p in params:
                    p.grad = None
        if not self.train_outside:
            for p in self.outside:
                p.grad = None

    def restore(self) -> None:
        """``requires_grad=True`` again on every managed parameter GRASS froze: the model as the user
        left it (their own freezes, and freezes adopted since, stay)."""
        for p in [p for ps in self.blocks for p in ps] + self.outside:
            if _owner_of(p) is self.token:
                set_frozen_by_grass(p, False)
            self._expected.pop(id(p), None)

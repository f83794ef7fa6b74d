"""The offload policy: which blocks' optimizer state is on the device, and the update order in a step.

One :class:`OffloadPolicy` per ``offload=`` mode, used by :class:`~grass_optim.GrassAdamW` to move
state and by :func:`~grass_optim.estimate_memory` to predict device memory, so the two cannot
disagree. How state moves (pinned buffers, side streams, events) is ``offload.py``'s business; this
module decides *what* moves *when*:

=============  ===================================  ==============================================
mode           resident between steps               one step's update
=============  ===================================  ==============================================
``None``       whatever the base optimizer created  one base step over every group
``"inactive"`` the active blocks                    wait for their prefetch, one base step
``"stream"``   the first active block               outside groups, then each active block in
                                                    ascending order: prefetch the next, wait for
                                                    this one, update it, write it back
=============  ===================================  ==============================================

While probing nothing is updated, so no block is resident. Parameters outside the blocks keep their
state on the device in every mode: they are updated at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .config import OFFLOAD_MODES
from .offload import StateOffloader

__all__ = ["OffloadPolicy", "Progress"]

# (parameter, its state dict in the base optimizer) of one block
BlockStates = Callable[[int], list[tuple[Tensor, dict[str, Any]]]]
# Steps the base optimizer over one part of the groups (a block index, or None for the outside).
StepPart = Callable[[int | None], None]


@dataclass
class Progress:
    """What one step's update has applied so far: a step that raised part-way (out of memory in the
    base optimizer, say) leaves it behind, and the step tried again skips what it lists.

    ``parts`` holds ``None`` for the groups outside the blocks and ``i`` for block ``i``, when the
    update ran part by part (``"stream"``); ``everything`` is set once the whole update is done.
    """

    step: int
    everything: bool = False
    parts: set[int | None] = field(default_factory=set)


@dataclass(frozen=True)
class OffloadPolicy:
    """Placement of the blocks' optimizer state under one ``offload=`` mode (``None`` = off)."""

    mode: str | None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in OFFLOAD_MODES:
            raise ValueError(f"Invalid offload: {self.mode!r} (expected None, {', '.join(map(repr, OFFLOAD_MODES))})")

    def resident(self, active: Sequence[int], probing: bool) -> set[int]:
        """Blocks whose state belongs on the device between steps (off: nothing is moved)."""
        if self.mode is None or probing or not active:
            return set()
        if self.mode == "inactive":
            return set(active)
        return {min(active)}  # "stream": the first block the next step will update, prefetched

    def device_blocks(self, active_layers: int, num_blocks: int) -> int:
        """Most blocks whose state is on the device at once, over a run (once every block was visited)."""
        if self.mode is None:
            return num_blocks  # nothing is ever moved back: every visited block's state stays
        if self.mode == "inactive":
            return active_layers
        # "stream": the block being updated and the next one, prefetched meanwhile.
        return min(active_layers, 2)

    def peak_device_blocks(self, active_layers: int, num_blocks: int) -> int:
        """Most blocks whose state occupies the device at once, counting state already let go of whose
        copy to the host is still running (the caching allocator reuses its memory only once the copy
        ends, and the host issues the next moves without waiting): at a redraw in ``"inactive"`` the
        leaving blocks while the entering ones arrive; in ``"stream"`` every block written back in a
        step plus the next step's first block, prefetched at its end."""
        if self.mode is None:
            return num_blocks
        if self.mode == "inactive":
            return min(2 * active_layers, num_blocks)
        return min(active_layers + 1, num_blocks)

    def update(self, active: Sequence[int], step_all: Callable[[], None], step_parts: Callable[[], Any],
               offloader: StateOffloader | None, states: BlockStates, progress: Progress) -> set[int]:
        """Run one step's update of the active blocks and the outside; return the blocks resident after.

        ``step_all()`` steps the base optimizer over every group; ``step_parts()`` is a context
        manager yielding a ``StepPart`` (the base's step hooks fire once around all parts).
        ``progress`` says what an earlier, failed try of this step already applied (skipped now) and
        is filled in as parts complete, so that a step tried again never applies a part twice.
        """
        if progress.everything:
            return self.resident(active, probing=False)
        if self.mode != "stream" and not progress.parts:
            if offloader is not None:
                for i in sorted(self.resident(active, probing=False)):
                    offloader.wait(i)  # the update reads states a prefetch may still be writing
            step_all()
            progress.everything = True
            return self.resident(active, probing=False)
        # Part by part: "stream", or the rest of an update that a failed try began.
        stream = self.mode == "stream"
        done_before = set(progress.parts)
        order = [i for i in sorted(active) if i not in done_before]
        if stream and offloader is not None and done_before and order:
            offloader.prefetch(order[0], states(order[0]))  # not the block prefetched for this step
        with step_parts() as step_part:
            if None not in done_before:
                step_part(None)  # outside the blocks: state stays on the device
                progress.parts.add(None)
            for j, i in enumerate(order):
                if offloader is not None:
                    if stream and j + 1 < len(order):
                        offloader.prefetch(order[j + 1], states(order[j + 1]))
                    offloader.wait(i)
                step_part(i)
                progress.parts.add(i)
                if stream and offloader is not None:
                    offloader.offload(i, states(i))
        progress.everything = True
        if not stream:
            return self.resident(active, probing=False)
        if offloader is not None:  # a block the failed try updated may have been brought back meanwhile
            for i in sorted(i for i in active if i in done_before):
                offloader.offload(i, states(i))
        return set()

    def move(self, before: set[int], after: set[int], offloader: StateOffloader | None, states: BlockStates) -> None:
        """Write back the blocks that stop being resident, start prefetching those that become resident
        (the prefetch overlaps the next forward and backward)."""
        if offloader is None:
            return
        for i in sorted(before - after):
            offloader.offload(i, states(i))
        for i in sorted(after - before):
            offloader.prefetch(i, states(i))

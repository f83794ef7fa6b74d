"""History: what the sampler did and, optionally, what each step moved, as plain data for plots.

Nothing here changes the future of a run; it is checkpointed only so that a resumed run's history
is whole. Entries are taken on steps that already synchronise (refreshes and redraws), or from
tensor sizes; copy timings stay raw events until their copies have finished (asked at each step,
without waiting) or the history is read.

Bounded: at most ``limit`` events and ``limit`` per-step records are kept (the most recent), in
memory and in checkpoints, whatever the length of the run; ``dropped`` counts the older ones. An
event is ~160 bytes in a checkpoint, a per-step record ~130 (~1.2 KB in memory): at the default
limit of 1000, at most ~0.3 MB per checkpoint and ~1.4 MB of memory.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .memory import MemoryReport
from .offload import resolve_timings, timings_ready
from .schedule import Schedule

__all__ = ["History"]


class History:
    """``mode``: ``True`` records events, ``"steps"`` events and one record per step, ``False`` nothing;
    at most ``limit`` of each, the most recent."""

    def __init__(self, mode: bool | str, limit: int = 1000) -> None:
        self.limit = limit
        self.events: deque[dict[str, Any]] | None = deque(maxlen=limit) if mode else None
        self.steps: deque[dict[str, Any]] | None = deque(maxlen=limit) if mode == "steps" else None
        self.dropped = {"events": 0, "steps": 0}
        self._moved_so_far = (0, 0)
        self._unresolved: deque[dict[str, Any]] = deque()  # per-step records whose copy timings are raw

    @property
    def records_steps(self) -> bool:
        return self.steps is not None

    def record_event(self, event: str, schedule: Schedule) -> None:
        """One entry at ``"start"``, ``"probe_end"``, and every refresh and/or redraw."""
        if self.events is None:
            return
        self._count_drop("events", self.events)
        self.events.append({"step": schedule.step, "event": event, "active": list(schedule.active_blocks),
                            "importance": schedule.importance.tolist(),
                            "probabilities": schedule.current_probabilities.tolist()})

    def record_step(self, step: int, report: MemoryReport, timings: list[Any]) -> None:
        """One per-step entry: state bytes, bytes copied during the step, and the copies' raw timings."""
        if self.steps is None:
            return
        self._count_drop("steps", self.steps)
        to_host, to_device = self._moved_so_far
        self._moved_so_far = (report.bytes_to_host, report.bytes_to_device)
        self.steps.append({"step": step, "device_state_bytes": report.device_state_bytes,
                           "host_state_bytes": report.host_state_bytes,
                           "bytes_to_host": report.bytes_to_host - to_host,
                           "bytes_to_device": report.bytes_to_device - to_device, "copies": timings})
        self._unresolved.append(self.steps[-1])
        # Resolve the records whose copies have finished (asked without waiting), so that timing
        # events do not pile up until the history is read: only the last step or two stay raw.
        while self._unresolved and timings_ready(self._unresolved[0].get("copies", ())):
            _resolve(self._unresolved.popleft())
        while len(self._unresolved) > self.limit:  # dropped from the history already
            self._unresolved.popleft()

    def _count_drop(self, kind: str, entries: deque[dict[str, Any]]) -> None:
        if len(entries) == entries.maxlen:
            self.dropped[kind] += 1

    def restart_copy_counts(self) -> None:
        """The offloader was replaced (its byte counters start again from 0)."""
        self._moved_so_far = (0, 0)

    def resolved_steps(self) -> list[dict[str, Any]]:
        """The per-step records as plain numbers (waits for the timed copies on an accelerator)."""
        for entry in self._unresolved:
            _resolve(entry)  # in place: later reads need no wait
        self._unresolved.clear()
        return [dict(entry) for entry in self.steps or []]

    def as_dict(self, layer_names: tuple[str, ...], schedule: Schedule) -> dict[str, Any]:
        config: dict[str, Any] = dict(schedule.config.schedule_settings())
        config["sampler"] = type(schedule.sampler).__name__
        out = {"layer_names": list(layer_names), "num_steps": schedule.step, "config": config,
               "events": [dict(e) for e in (self.events or [])], "dropped": dict(self.dropped)}
        if self.steps is not None:
            out["steps"] = self.resolved_steps()
        return out

    # The two checkpoint entries (None when not recorded).
    def state(self) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        events = [dict(e) for e in self.events] if self.events is not None else None
        return events, (self.resolved_steps() if self.steps is not None else None)

    def load(self, events: Any, steps: Any, dropped: Any = None) -> None:
        """Take a checkpoint's entries (the most recent ``limit`` of each)."""
        if self.events is not None and events is not None:
            self.events = deque((dict(e) for e in events), maxlen=self.limit)
            self.dropped["events"] = max(0, len(events) - self.limit)
        if self.steps is not None and steps is not None:
            self._unresolved.clear()
            self.steps = deque((dict(e) for e in steps), maxlen=self.limit)
            self.dropped["steps"] = max(0, len(steps) - self.limit)
        if isinstance(dropped, dict):
            for kind in self.dropped:
                self.dropped[kind] += int(dropped.get(kind, 0))


def _resolve(entry: dict[str, Any]) -> None:
    """Replace a per-step record's raw copy timings by their totals in milliseconds, in place."""
    if "copies" not in entry:
        return
    copies = resolve_timings(entry.pop("copies"))
    for direction in ("to_host", "to_device"):
        entry[f"copy_ms_{direction}"] = sum((c["ms"] for c in copies if c["direction"] == direction), 0.0)


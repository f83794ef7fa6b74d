"""History: what the sampler did and, optionally, what each step moved, as plain data for plots.

Nothing here changes the future of a run; it is checkpointed only so that a resumed run's history
is whole. Entries are taken on steps that already synchronise (refreshes and redraws), or from
tensor sizes; copy timings stay raw events until the history is read.
"""

from __future__ import annotations

from typing import Any

from .memory import MemoryReport
from .offload import resolve_timings
from .schedule import Schedule

__all__ = ["History"]


class History:
    """``mode``: ``True`` records events, ``"steps"`` events and one record per step, ``False`` nothing."""

    def __init__(self, mode: bool | str) -> None:
        self.events: list[dict[str, Any]] | None = [] if mode else None
        self.steps: list[dict[str, Any]] | None = [] if mode == "steps" else None
        self._moved_so_far = (0, 0)

    @property
    def records_steps(self) -> bool:
        return self.steps is not None

    def record_event(self, event: str, schedule: Schedule) -> None:
        """One entry at ``"start"``, ``"probe_end"``, and every refresh and/or redraw."""
        if self.events is None:
            return
        self.events.append({"step": schedule.step, "event": event, "active": list(schedule.active_blocks),
                            "importance": schedule.importance.tolist(),
                            "probabilities": schedule.current_probabilities.tolist()})

    def record_step(self, step: int, report: MemoryReport, timings: list[Any]) -> None:
        """One per-step entry: state bytes, bytes copied during the step, and the copies' raw timings."""
        if self.steps is None:
            return
        to_host, to_device = self._moved_so_far
        self._moved_so_far = (report.bytes_to_host, report.bytes_to_device)
        self.steps.append({"step": step, "device_state_bytes": report.device_state_bytes,
                           "host_state_bytes": report.host_state_bytes,
                           "bytes_to_host": report.bytes_to_host - to_host,
                           "bytes_to_device": report.bytes_to_device - to_device, "copies": timings})

    def restart_copy_counts(self) -> None:
        """The offloader was replaced (its byte counters start again from 0)."""
        self._moved_so_far = (0, 0)

    def resolved_steps(self) -> list[dict[str, Any]]:
        """The per-step records as plain numbers (waits for the timed copies on an accelerator)."""
        out = []
        for entry in self.steps or []:
            if "copies" in entry:  # resolve once, in place: later reads need no wait
                copies = resolve_timings(entry.pop("copies"))
                for direction in ("to_host", "to_device"):
                    entry[f"copy_ms_{direction}"] = sum((c["ms"] for c in copies if c["direction"] == direction), 0.0)
            out.append(dict(entry))
        return out

    def as_dict(self, layer_names: tuple[str, ...], schedule: Schedule) -> dict[str, Any]:
        config: dict[str, Any] = dict(schedule.config.schedule_settings())
        config["sampler"] = type(schedule.sampler).__name__
        out = {"layer_names": list(layer_names), "num_steps": schedule.step, "config": config,
               "events": [dict(e) for e in (self.events or [])]}
        if self.steps is not None:
            out["steps"] = self.resolved_steps()
        return out

    # The two checkpoint entries (None when not recorded).
    def state(self) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        events = [dict(e) for e in self.events] if self.events is not None else None
        return events, (self.resolved_steps() if self.steps is not None else None)

    def load(self, events: Any, steps: Any) -> None:
        if self.events is not None and events is not None:
            self.events = [dict(e) for e in events]
        if self.steps is not None and steps is not None:
            self.steps = [dict(e) for e in steps]

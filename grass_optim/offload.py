"""Moving optimizer state between the accelerator and (pinned) host memory.

Mechanics only: this module knows parameters, their state dicts and opaque "unit" keys (the
optimizer uses block indices), never the GRASS schedule. The optimizer says *what* moves *when*;
this says *how*, with one rule per synchronisation point written next to it.

On an accelerator (CUDA and any device behind ``torch.accelerator``):

* host buffers are pinned, allocated the first time a tensor is parked and reused afterwards;
* two persistent side streams, one per direction, so a write-back and a prefetch can overlap;
* one event per transfer of a unit; whoever reads the moved tensors waits on exactly that event.

On a CPU-only machine the same calls run synchronously and park the state in separate host
buffers, so every code path, and every test of it, also runs without an accelerator.

Only tensors with at least one dimension move (moments, second moments, momentum buffers); 0-d
tensors such as AdamW's ``step`` stay where the base optimizer keeps them.

FSDP2: the state of a sharded parameter is a DTensor. Only its local shard moves, into this rank's
host buffer; while parked the state holds a DTensor over that buffer (the same mesh, placements and
global shape, made once and reused), and a prefetch wraps the device copy the same way, so the base
optimizer, ``state_dict()`` and ``memory_report()`` always see a DTensor sharded like its parameter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: there is no sharded state then
    DTensor = None  # type: ignore[assignment, misc]

__all__ = ["HostPool", "StateOffloader", "is_dtensor", "local", "local_bytes", "pinned_size", "resolve_timings",
           "timings_ready", "wrap_like"]

# (parameter, its state dict in the base optimizer)
ParamState = tuple[Tensor, dict[str, Any]]


def _movable(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0


def is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """What is stored on this rank: a DTensor's local shard, or the tensor itself."""
    # _local_tensor, not to_local(): with grad enabled to_local() returns a new autograd view.
    return t._local_tensor if is_dtensor(t) else t


def local_bytes(t: Tensor) -> int:
    """Bytes this rank stores for ``t`` (a DTensor's ``numel()`` is its global size)."""
    t = local(t)
    return t.numel() * t.element_size()


def wrap_like(shard: Tensor, like: Tensor) -> Tensor:
    """``shard`` as the state ``like`` was: a DTensor with ``like``'s mesh, placements and global
    shape over it (no copy, no communication), or ``shard`` itself for a plain tensor."""
    if not is_dtensor(like):
        return shard
    # The constructor, not DTensor.from_local: from_local moves its tensor to the mesh's device type,
    # which would copy a parked shard straight back to the accelerator.
    return DTensor(shard, like._spec, requires_grad=False)


class StateOffloader:
    """Parks and restores the state tensors of groups of parameters.

    Args:
        device (torch.device): where the parameters (and the active state) live.
        overlap (bool): ``False`` makes the compute stream wait for every copy right after it is
            issued, so copies never overlap compute (a baseline for benchmarks; results are identical).
    """

    def __init__(self, device: torch.device, overlap: bool = True) -> None:
        self.device = torch.device(device)
        accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        self.asynchronous = accel is not None and self.device.type == accel.type
        self.overlap = overlap
        if self.asynchronous:
            # Persistent streams: creating streams per step grows the caching allocator.
            self._to_host = torch.Stream(device=self.device)
            self._to_device = torch.Stream(device=self.device)
        self._host: dict[tuple[int, str], Tensor] = {}  # (id(param), key) -> host buffer
        # (id(param), key) -> what the state holds while parked: the buffer, or a DTensor over it
        self._parked: dict[tuple[int, str], Tensor] = {}
        self._pool = HostPool(pinned=self.asynchronous)
        self._pending: dict[Any, torch.Event] = {}  # unit -> event of its last transfer
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        # Copy timing for GrassAdamW(history="steps"): one (direction, bytes, start, end) per transfer
        # call; start/end are timing events on an accelerator (read later, when the host asks), seconds
        # on the host path, where copies are synchronous.
        self.timing = False
        self._timings: list[tuple[str, int, Any, Any]] = []

    # -------------------------------------------------------------- queries
    def is_parked(self, param: Tensor, key: str, value: Any) -> bool:
        """True when ``value`` is the host buffer of ``param``'s state ``key`` (or the DTensor over it)."""
        return self._parked.get((id(param), key)) is value

    @property
    def host_buffer_bytes(self) -> int:
        """Bytes of all host buffers allocated so far (pinned on an accelerator)."""
        return sum(t.numel() * t.element_size() for t in self._host.values())

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host memory held for these buffers: the slabs they are packed into (0 without
        an accelerator: nothing is pinned)."""
        return self._pool.reserved_bytes if self.asynchronous else 0

    # -------------------------------------------------------------- transfers
    def offload(self, unit: Any, states: Iterable[ParamState]) -> None:
        """Move the unit's state to its host buffers; the device copies are released."""
        moves = [(p, st, k, v) for p, st in states for k, v in st.items()
                 if _movable(v) and not self.is_parked(p, k, v)]
        if not moves:
            return
        nbytes = sum(local_bytes(v) for _, _, _, v in moves)
        self.bytes_to_host += nbytes
        if not self.asynchronous:
            t0 = time.perf_counter()
            for p, st, k, v in moves:
                self._host_buffer(p, k, v).copy_(local(v))
                st[k] = self._parked[(id(p), k)]
            self._time_host("to_host", nbytes, t0)
            return
        buffers = [self._host_buffer(p, k, v) for p, _, k, v in moves]
        # A previous prefetch of this unit reads these host buffers; do not overwrite them before it ends.
        self._stream_waits_for_unit(self._to_host, unit)
        # The update that last wrote these states was queued on the compute stream.
        self._to_host.wait_stream(torch.accelerator.current_stream(self.device))
        start = self._timing_event(self._to_host)
        try:
            with self._to_host:
                for (p, st, k, value), host in zip(moves, buffers, strict=True):
                    v = local(value)
                    host.copy_(v, non_blocking=True)
                    # v is dropped below while the copy may still read it: keep its memory from being reused.
                    v.record_stream(self._to_host)
                    st[k] = self._parked[(id(p), k)]
        finally:  # even if a copy failed part-way, the unit's event covers the copies already issued
            self._record(unit, self._to_host, "to_host", nbytes, start)

    def prefetch(self, unit: Any, states: Iterable[ParamState]) -> None:
        """Start moving the unit's parked state to the device; :meth:`wait` before using it."""
        moves = [(p, st, k, v) for p, st in states for k, v in st.items()
                 if _movable(v) and self.is_parked(p, k, v)]
        if not moves:
            return
        nbytes = sum(local_bytes(v) for _, _, _, v in moves)
        self.bytes_to_device += nbytes
        if not self.asynchronous:
            t0 = time.perf_counter()
            for _, st, k, v in moves:
                st[k] = wrap_like(local(v).to(self.device, copy=True), v)
            self._time_host("to_device", nbytes, t0)
            return
        # Allocate on the compute stream, which will use (and later free) these tensors.
        targets = [self._empty_on_device(local(v)) for _, _, _, v in moves]
        # The memory just allocated may have been freed by work still queued on the compute stream.
        self._to_device.wait_stream(torch.accelerator.current_stream(self.device))
        # A write-back of this unit into the same host buffers may still be in flight.
        self._stream_waits_for_unit(self._to_device, unit)
        start = self._timing_event(self._to_device)
        try:
            with self._to_device:
                for (_, st, k, v), d in zip(moves, targets, strict=True):
                    d.copy_(local(v), non_blocking=True)
                    # If d is dropped before the compute stream waits for this copy (the state replaced,
                    # the optimizer deleted), its memory must not go to compute while the copy writes it.
                    d.record_stream(self._to_device)
                    st[k] = wrap_like(d, v)
        finally:  # even if a copy failed part-way, the unit's event covers the copies already issued
            self._record(unit, self._to_device, "to_device", nbytes, start)

    def wait(self, unit: Any) -> None:
        """Make the compute stream wait for the unit's last transfer (before the update reads it)."""
        event = self._pending.pop(unit, None)
        if event is not None:
            event.wait(torch.accelerator.current_stream(self.device))

    def synchronize(self) -> None:
        """Block the host until every transfer has finished (before the host reads host buffers)."""
        for event in self._pending.values():
            event.synchronize()
        self._pending.clear()
        if self.asynchronous:
            # wait() forgets the events it consumed, but a write-back chained behind such a prefetch
            # may still be running: the side streams themselves must be idle.
            self._to_host.synchronize()
            self._to_device.synchronize()

    def drain_timings(self) -> list[tuple[str, int, Any, Any]]:
        """The transfers timed since the last call (raw: see :func:`resolve_timings`), forgotten here."""
        out, self._timings = self._timings, []
        return out

    def load_parked(self, items: Iterable[tuple[Tensor, dict[str, Any], str, Tensor]]) -> None:
        """Put checkpointed values straight into host buffers: ``(param, state, key, value)``.

        Floating-point values take the parameter's dtype, as ``Optimizer.load_state_dict`` does; a
        DTensor's local shard is what is kept. Host to host, on the calling thread: nothing is in
        flight afterwards.
        """
        for p, st, k, v in items:
            value = v.to(dtype=p.dtype) if p.is_floating_point() else v
            self._host_buffer(p, k, value).copy_(local(value))
            st[k] = self._parked[(id(p), k)]

    # -------------------------------------------------------------- internals
    def _empty_on_device(self, like: Tensor) -> Tensor:
        """A device tensor for a prefetch (its contents are whatever the allocator had there)."""
        return torch.empty_like(like, device=self.device)

    def _host_buffer(self, param: Tensor, key: str, like: Tensor) -> Tensor:
        """The host buffer for ``like``'s local shard, and what the state will hold while parked."""
        shard = local(like)
        buf = self._host.get((id(param), key))
        if buf is None or buf.shape != shard.shape or buf.dtype != shard.dtype:
            buf = self._pool.take(shard.shape, shard.dtype)  # a changed shape abandons the old one (rare)
            assert buf is not None
            self._host[(id(param), key)] = buf
            self._parked[(id(param), key)] = wrap_like(buf, like)
        return buf

    def _stream_waits_for_unit(self, stream: torch.Stream, unit: Any) -> None:
        event = self._pending.get(unit)
        if event is not None:
            stream.wait_event(event)

    def _record(self, unit: Any, stream: torch.Stream, direction: str, nbytes: int, start: Any) -> None:
        event = torch.Event(device=self.device, enable_timing=start is not None)
        event.record(stream)
        self._pending[unit] = event
        if start is not None:
            self._timings.append((direction, nbytes, start, event))
        if not self.overlap:
            # The baseline without overlap: compute waits for the copy at once, so the device runs copies
            # and compute one after the other; the host does not wait (a host sync would also drain
            # the queue of work and charge the copy with more than its own time).
            compute = torch.accelerator.current_stream(self.device)
            event.wait(compute)

    def _timing_event(self, stream: torch.Stream) -> Any:
        """A timing event recorded on ``stream`` before a transfer's copies (None when not timing)."""
        if not self.timing:
            return None
        event = torch.Event(device=self.device, enable_timing=True)
        event.record(stream)
        return event

    def _time_host(self, direction: str, nbytes: int, t0: float) -> None:
        if self.timing:
            self._timings.append((direction, nbytes, t0, time.perf_counter()))


class HostPool:
    """Host buffers packed into slabs: large allocations whose sizes are powers of two.

    PyTorch's pinned allocator rounds every allocation up to a power of two, so one pinned tensor per
    state would cost up to twice its size (a 7B model's 172 MiB MLP moments take 256 MiB each: a
    third more pinned memory than state). Slabs are powers of two already, and each buffer is a view
    into one, so the state costs its size plus the unused ends of the slabs. A new slab is as large
    as the pool so far (so a small model pins little), at most ``max_slab``; a buffer larger than
    that gets an allocation of its own. Buffers live as long as the pool (the offloader keeps each
    for the whole run). ``allocate=False`` only counts: what :func:`~grass_optim.estimate_memory`
    predicts with.
    """

    def __init__(self, pinned: bool, allocate: bool = True, min_slab: int = 1 << 21, max_slab: int = 1 << 30,
                 align: int = 512) -> None:
        self.pinned, self.allocate = pinned, allocate
        self.min_slab, self.max_slab, self.align = min_slab, max_slab, align
        self._slabs: list[list[Any]] = []  # [capacity, bytes used, uint8 tensor or None]
        self.reserved_bytes = 0  # what the allocations hold (slabs, and own buffers as the allocator rounds them)

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor | None:
        """A new host buffer of this shape and dtype (uninitialised; None when only counting)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.max_slab:
            self.reserved_bytes += pinned_size(nbytes) if self.pinned else nbytes
            if not self.allocate:
                return None
            return torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=self.pinned)
        size = -(-max(nbytes, 1) // self.align) * self.align
        slab = next((sl for sl in self._slabs if sl[0] - sl[1] >= size), None)
        if slab is None:
            capacity = min(self.max_slab, max(self.min_slab, pinned_size(max(size, self.reserved_bytes))))
            memory = torch.empty(capacity, dtype=torch.uint8, device="cpu", pin_memory=self.pinned) \
                if self.allocate else None
            slab = [capacity, 0, memory]
            self._slabs.append(slab)
            self.reserved_bytes += capacity
        start = slab[1]
        slab[1] += size
        if slab[2] is None:
            return None
        return slab[2][start:start + nbytes].view(dtype).view(tuple(shape))


def pinned_size(nbytes: int) -> int:
    """What PyTorch's caching host allocator reserves for a pinned tensor of ``nbytes``: the next
    power of two (``CachingHostAllocator.h``: ``PowerOf2Ceil``)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def timings_ready(raw: Iterable[tuple[str, int, Any, Any]]) -> bool:
    """True when :func:`resolve_timings` would not wait: every timed copy has finished (asks the
    device without waiting for it)."""
    return all(isinstance(end, float) or end.query() for _, _, _, end in raw)


def resolve_timings(raw: Iterable[tuple[str, int, Any, Any]]) -> list[dict[str, Any]]:
    """Turn :meth:`StateOffloader.drain_timings` entries into ``{"direction", "bytes", "ms"}``.

    On an accelerator this waits for those transfers to finish (their timing events must have
    completed to be read): call it where the host may wait, e.g. when a history is read.
    """
    out = []
    for direction, nbytes, start, end in raw:
        if isinstance(start, float):
            ms = 1000.0 * (end - start)
        else:
            if not end.query():  # only when the copy is still running (reading the history waits)
                end.synchronize()
            ms = start.elapsed_time(end)
        out.append({"direction": direction, "bytes": nbytes, "ms": ms})
    return out

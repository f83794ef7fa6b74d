"""Multi-process test machinery: a pool of 2 gloo ranks kept alive for a whole test module, and the
worker functions it runs (module level, so that ``spawn`` can import them).

Starting a rank costs ~15 s on a 2-core machine (importing torch, then ``torch._dynamo``, which DDP
and FSDP2 import on first use), so one pool serves every test: each test sends a task name and its
arguments to both ranks, and gets back per rank either the task's return value or the exception it
raised. The ranks share one process group for all tasks; a task that errors on every rank at the
same point (all GrassAdamW's checks do: they raise after a collective every rank took part in)
leaves the group usable. A task that hangs (a rank stuck in a collective) makes the pool unusable;
:meth:`WorkerPool.run` then kills it and the next task starts a fresh one.

Data: each step has one global batch of 16 rows (``tests.helpers.batches``); rank r trains on rows
``[8r, 8r + 8)``. The loss is a mean, and DDP and FSDP2 average gradients over ranks, so the
averaged gradient is the gradient of the global batch: a 1-process run on the global batches
(:func:`train_reference`) is the reference the multi-process runs are compared to.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import io
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from grass_optim import GrassAdamW
from grass_optim.freezing import set_frozen_by_grass
from tests.helpers import batches, loss_fn, make_net, train_at

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
DATA_SEED = 100
TORCH_SEED = 1000  # rank r seeds torch with TORCH_SEED + r: seed=None must still agree (rank 0's wins)
COLLECTIVE_TIMEOUT_S = 60


# ----------------------------------------------------------------------------- the pool
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    """What one rank's task returned, or the exception it raised."""

    rank: int
    value: Any = None
    error_type: str | None = None
    message: str = ""
    traceback: str = ""

    def unwrap(self) -> Any:
        if self.error_type is not None:
            raise AssertionError(f"rank {self.rank} raised {self.error_type}: {self.message}\n{self.traceback}")
        return self.value


def _dumps(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)  # our own results, from our own workers


def _serve(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    parent = os.getppid()
    try:
        while True:
            try:
                item = tasks.get(timeout=5.0)
            except queue.Empty:
                if os.getppid() != parent:  # the test process died without closing the pool
                    break
                continue
            if item is None:
                break
            name, kwargs = item
            try:
                payload: tuple[Any, ...] = ("ok", _dumps(TASKS[name](rank, world, **kwargs)))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # reported to the test, which decides whether it was expected
                # (BaseException: DCP's CheckpointException is not an Exception)
                payload = ("err", type(err).__name__, str(err), traceback.format_exc())
            results.put((rank, payload))
            gc.collect()
    finally:
        dist.destroy_process_group()


class WorkerPool:
    """``world`` spawned ranks in one gloo process group, running named tasks on request."""

    def __init__(self, world: int = WORLD) -> None:
        self.world = world
        self._procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(r, self.world, port, self._tasks[r], self._results),
                                   daemon=True) for r in range(self.world)]
        for p in self._procs:
            p.start()

    def run(self, task: str, timeout: float = 180.0, **kwargs: Any) -> list[Outcome]:
        """Run ``TASKS[task](rank, world, **kwargs)`` on every rank; one :class:`Outcome` per rank."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((task, kwargs))
        out: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout
        while len(out) < self.world:
            try:
                rank, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in self._procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"a rank exited with code {dead[0]}" if dead else f"no answer within {timeout} s"
                    raise RuntimeError(f"task {task!r}: {why} (the pool was restarted)") from None
                continue
            if payload[0] == "ok":
                out[rank] = Outcome(rank, value=_loads(payload[1]))
            else:
                out[rank] = Outcome(rank, error_type=payload[1], message=payload[2], traceback=payload[3])
        return [out[r] for r in range(self.world)]

    def values(self, task: str, **kwargs: Any) -> list[Any]:
        """:meth:`run`, failing the test with the traceback if any rank raised."""
        return [o.unwrap() for o in self.run(task, **kwargs)]

    def close(self) -> None:
        for p, q in zip(self._procs, getattr(self, "_tasks", []), strict=False):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []


# ----------------------------------------------------------------------------- shared pieces
def global_batches(steps: int, d_in: int = 3, d_out: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return batches(steps, seed=DATA_SEED, d_in=d_in, d_out=d_out, batch=16)


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters, flattened; FSDP2 shards are gathered first (a collective: every rank calls it)."""
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([t.detach().flatten() for t in full])


def train_steps(model: nn.Module, opt: GrassAdamW, data: list, rank: int, world: int) -> list[dict[str, Any]]:
    """Train on this rank's share of each global batch; the schedule after every step."""
    history = []
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, shard(x, rank, world), shard(y, rank, world)).backward()
        opt.step()
        history.append({"active": opt.active_layer_indices, "importance": opt.importance})
    return history


def grass_kwargs(**overrides: Any) -> dict[str, Any]:
    kw = {"lr": 1e-2, "active_layers": 1, "switch_every": 3, "probe_steps": 2}
    kw.update(overrides)
    return kw


def train_reference(steps: int, d: int = 8, **grass: Any) -> dict[str, Any]:
    """The 1-process run on the global batches (call it where no process group is initialised)."""
    assert not (dist.is_available() and dist.is_initialized())
    model = make_net(seed=0, d=d)
    grass.setdefault("seed", TORCH_SEED)
    opt = GrassAdamW(model, probe_low_memory=False, **grass_kwargs(**grass))
    history = train_steps(model, opt, global_batches(steps), 0, 1)
    return {"history": history, "params": flat_params(model)}


def all_equal_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ----------------------------------------------------------------------------- DDP tasks
def ddp_train(rank: int, world: int, *, order: str, steps: int, **grass: Any) -> dict[str, Any]:
    """GrassAdamW with DDP, built after wrapping (``order="after"``: ``GrassAdamW(ddp)``) or before
    (``"before"``: ``GrassAdamW(model)``, then ``DistributedDataParallel(model, find_unused_parameters=True)``).

    Without an explicit seed each rank seeds torch differently, so the schedules agree only because
    the optimizer takes rank 0's seed.
    """
    model = make_net(seed=0)
    torch.manual_seed(TORCH_SEED + rank)
    if order == "after":
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        opt = GrassAdamW(ddp, **grass_kwargs(**grass))
    elif order == "before":
        opt = GrassAdamW(model, **grass_kwargs(**grass))
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
    else:
        raise ValueError(order)
    history = train_steps(ddp, opt, global_batches(steps), rank, world)
    params = flat_params(model)
    return {"history": history, "params": params, "params_equal_across_ranks": all_equal_across_ranks(params),
            "seed": opt.state_dict()["grass"]["seed"]}


def ddp_resume(rank: int, world: int, *, tmpdir: str, steps: int, stop: int) -> dict[str, Any]:
    """Uninterrupted vs. saved after ``stop`` steps by rank 0 (``ddp.module.state_dict()`` and
    ``opt.state_dict()``, the same on every rank) and resumed on every rank into a fresh model, DDP
    and optimizer."""
    data = global_batches(steps)

    def build() -> tuple[nn.Module, GrassAdamW]:
        ddp = DistributedDataParallel(make_net(seed=0), find_unused_parameters=True)
        return ddp, GrassAdamW(ddp, **grass_kwargs(switch_every=3, seed=0))

    ddp, opt = build()
    train_steps(ddp, opt, data, rank, world)
    reference = flat_params(ddp.module)

    ddp, opt = build()
    train_steps(ddp, opt, data[:stop], rank, world)
    path = Path(tmpdir) / "ckpt.pt"
    sd = opt.state_dict()
    same = all_equal_across_ranks(torch.cat([v.flatten().double() for st in sd["state"].values()
                                             for v in st.values()]))
    if rank == 0:
        torch.save({"model": ddp.module.state_dict(), "optim": sd}, path)
    dist.barrier()
    del ddp, opt

    ddp, opt = build()
    ckpt = torch.load(path, weights_only=True)
    ddp.module.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    train_steps(ddp, opt, data[stop:], rank, world)
    resumed = flat_params(ddp.module)
    return {"optimizer_state_same_on_ranks": same, "resumed_step": stop, "equal": torch.equal(resumed, reference),
            "max_diff": (resumed - reference).abs().max().item()}


def ddp_invalid_wrappers(rank: int, world: int) -> dict[str, str]:
    """The message GrassAdamW gives for each DDP configuration it refuses (or "no error")."""
    out = {}
    for name, kwargs in {"find_unused_parameters=False": {}, "static_graph=True": {"static_graph": True,
                                                                                   "find_unused_parameters": True}
                         }.items():
        ddp = DistributedDataParallel(make_net(seed=0), **kwargs)
        try:
            GrassAdamW(ddp, probe_steps=0, active_layers=1)
            out[name] = "no error"
        except ValueError as err:
            out[name] = f"ValueError: {err}"
    return out


def ddp_built_while_frozen(rank: int, world: int, *, steps: int = 24) -> dict[str, Any]:
    """DDP built while blocks 1..3 are frozen (as GrassAdamW freezes them), then ``GrassAdamW(ddp)``.

    DDP's reducer registers only the parameters that require grad when it is built, so blocks 1..3
    would never be all-reduced. Returns the construction error, or, if construction passed, the
    error training raised (and at which step), and whether the parameters still agree.
    """
    model = make_net(seed=0)
    for block in model.layers[1:]:
        for p in block.parameters():
            set_frozen_by_grass(p, True)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    registered = ddp._get_ddp_logging_data().get("num_parameter_tensors")
    out: dict[str, Any] = {"registered_tensors": registered, "model_tensors": len(list(model.parameters()))}
    try:
        opt = GrassAdamW(ddp, **grass_kwargs(probe_steps=0, switch_every=2, seed=0))
    except ValueError as err:
        out["construct_error"] = f"ValueError: {err}"
        return out
    out["construct_error"] = None
    out.update(_train_until_error(ddp, model, opt, steps, rank, world))
    return out


def ddp_wrapped_after_first_step(rank: int, world: int, *, steps: int = 24, checks: bool = True) -> dict[str, Any]:
    """``GrassAdamW(model)`` first, one step without DDP (the same batch on both ranks, so nothing
    diverges yet), *then* ``DistributedDataParallel(model, find_unused_parameters=True)``: by then GrassAdamW has frozen
    the inactive blocks, so DDP registers the active block and the outside only. The blocks drawn
    later are never all-reduced."""
    model = make_net(seed=0)
    opt = GrassAdamW(model, distributed_checks=checks, **grass_kwargs(probe_steps=0, switch_every=2, seed=0))
    x, y = global_batches(1)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    out = {"registered_tensors": ddp._get_ddp_logging_data().get("num_parameter_tensors"),
           "model_tensors": len(list(model.parameters()))}
    out.update(_train_until_error(ddp, model, opt, steps - 1, rank, world))
    return out


def ddp_after_optimizer_without_unused(rank: int, world: int, *, steps: int = 6) -> dict[str, Any]:
    """``GrassAdamW(model)`` first, then ``DistributedDataParallel(model)`` with the default
    ``find_unused_parameters=False`` (what ``accelerator.prepare(model, opt)`` builds unless told):
    construction cannot see the DDP. Returns the first error, the step it came at, and whether the
    parameters were still the initial ones then."""
    model = make_net(seed=0)
    initial = flat_params(model)
    opt = GrassAdamW(model, **grass_kwargs(probe_steps=0, switch_every=2, seed=0))
    ddp = DistributedDataParallel(model)
    out: dict[str, Any] = {"error": None, "error_step": None}
    data = batches(steps, seed=DATA_SEED + 1, batch=16)
    try:
        for i, (x, y) in enumerate(data):
            out["error_step"] = i + 1
            opt.zero_grad()
            loss_fn(ddp, shard(x, rank, world), shard(y, rank, world)).backward()
            opt.step()
    except (RuntimeError, ValueError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
    out["params_unchanged"] = torch.equal(flat_params(model), initial)
    return out


def _train_until_error(ddp: nn.Module, model: nn.Module, opt: GrassAdamW, steps: int, rank: int,
                       world: int) -> dict[str, Any]:
    data = batches(steps, seed=DATA_SEED + 1, batch=16)
    out: dict[str, Any] = {"train_error": None, "error_step": None}
    try:
        for x, y in data:
            opt.zero_grad()
            loss_fn(ddp, shard(x, rank, world), shard(y, rank, world)).backward()
            opt.step()
    except RuntimeError as err:
        out["train_error"] = f"RuntimeError: {err}"
        out["error_step"] = opt.num_steps
    out["params_equal_across_ranks"] = all_equal_across_ranks(flat_params(model))
    return out


def seeds(rank: int, world: int, *, checks: bool) -> dict[str, Any]:
    """An explicit seed that differs across ranks."""
    try:
        opt = GrassAdamW(make_net(seed=0), seed=rank, probe_steps=0, active_layers=1, distributed_checks=checks)
    except RuntimeError as err:
        return {"error": f"RuntimeError: {err}"}
    return {"error": None, "seed": opt.state_dict()["grass"]["seed"]}


def ddp_comm(rank: int, world: int, **kwargs: Any) -> dict[str, Any]:
    """``benchmarks/ddp_comm.py``'s measurement, on this pool's ranks."""
    return _benchmark_module("ddp_comm").measure(rank, world, **kwargs)


def dist_memory(rank: int, world: int, **kwargs: Any) -> dict[str, Any]:
    """``benchmarks/dist_memory.py``'s measurement, on this pool's ranks."""
    return _benchmark_module("dist_memory").measure(rank, world, **kwargs)


def _benchmark_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- FSDP2 tasks
FSDP_D = 16  # block width for the FSDP2 runs: every weight splits into 2 shards of 8 rows


def fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_net(seed=0, d=FSDP_D)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def fsdp_train(rank: int, world: int, *, steps: int, **grass: Any) -> dict[str, Any]:
    model = fsdp_model()
    torch.manual_seed(TORCH_SEED + rank)
    opt = GrassAdamW(model, **grass_kwargs(**grass))
    history = train_steps(model, opt, global_batches(steps), rank, world)
    sharded = sorted({type(p).__name__ for p in model.parameters()})
    return {"history": history, "params": flat_params(model), "param_types": sharded}


def fsdp_built_before_sharding(rank: int, world: int, *, steps: int = 8) -> dict[str, Any]:
    """GrassAdamW built on the model *before* ``fully_shard`` replaced its parameters by DTensors."""
    from torch.distributed.fsdp import fully_shard

    model = make_net(seed=0, d=FSDP_D)
    out: dict[str, Any] = {"error": None}
    try:
        opt = GrassAdamW(model, **grass_kwargs(probe_steps=0, seed=0))
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        before = flat_params(model)
        train_steps(model, opt, global_batches(steps), rank, world)
        out["params_changed"] = not torch.equal(flat_params(model), before)
        out["optimizer_holds_module_params"] = {id(p) for p in model.parameters()} <= {
            id(p) for g in opt.param_groups for p in g["params"]}
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _local_snapshot(model: nn.Module, opt: GrassAdamW) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """This rank's parameter shards, flattened, and the local shard of every state tensor (a copy)."""
    params = torch.cat([(p.to_local() if hasattr(p, "to_local") else p).detach().flatten()
                        for p in model.parameters()])
    state = [{k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in opt.state[p].items()}
             for p in model.parameters() if p in opt.state]
    return params, state


def _same_state(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
                                    for sa, sb in zip(a, b, strict=True))


def fsdp_offload_equal(rank: int, world: int, *, steps: int, mode: str, **grass: Any) -> dict[str, Any]:
    """FSDP2 with ``offload=mode`` vs. FSDP2 without: this rank's parameter shards and optimizer state
    after every step, bit for bit; and what the offloaded state looks like between steps."""
    data = global_batches(steps)
    snapshots: dict[Any, list[Any]] = {}
    out: dict[str, Any] = {"state_types": set(), "state_like_param": True}
    for offload in (None, mode):
        model = fsdp_model()
        opt = _fsdp_opt(model, offload=offload, **grass)
        snapshots[offload] = []
        history = []
        for x, y in data:
            opt.zero_grad()
            loss_fn(model, shard(x, rank, world), shard(y, rank, world)).backward()
            opt.step()
            history.append(opt.active_layer_indices)
            snapshots[offload].append(_local_snapshot(model, opt))
            if offload is not None:
                for p, st in opt.state.items():
                    for v in st.values():
                        if v.dim() > 0:  # moments: sharded like their parameter, parked or not
                            out["state_types"].add(type(v).__name__)
                            out["state_like_param"] &= (v.placements == p.placements and v.shape == p.shape
                                                        and v.device_mesh == p.device_mesh)
        out[f"history_{offload}"] = history
        out[f"report_{offload}"] = opt.memory_report()
    (ref, got) = snapshots[None], snapshots[mode]
    out["params_equal"] = [torch.equal(a[0], b[0]) for a, b in zip(ref, got, strict=True)]
    out["state_equal"] = [_same_state(a[1], b[1]) for a, b in zip(ref, got, strict=True)]
    return out


def offload_dtensor_of_another_device_type(rank: int, world: int) -> dict[str, Any]:
    """Park and prefetch a DTensor state whose mesh is on ``cuda`` while its shard is on this CPU:
    what parking does on a GPU (the host buffer is on another device than the mesh), without one.
    ``DTensor.from_local`` would move a parked shard to the mesh's device type."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    from grass_optim.memory import memory_report
    from grass_optim.offload import StateOffloader

    mesh = DeviceMesh("cuda", torch.arange(world), _init_backend=False)  # no CUDA needed until used
    cpu_mesh = DeviceMesh("cpu", torch.arange(world))
    spec = DTensor.from_local(torch.zeros(4, 3), cpu_mesh, [Shard(0)], run_check=False)._spec
    spec = type(spec)(mesh, spec.placements, tensor_meta=spec.tensor_meta)
    param = DTensor(torch.zeros(4, 3), spec, requires_grad=False)
    values = torch.arange(12.0).reshape(4, 3) + rank
    st: dict[str, Any] = {"exp_avg": DTensor(values.clone(), spec, requires_grad=False), "step": torch.tensor(3.0)}
    off = StateOffloader(torch.device("cpu"))
    out: dict[str, Any] = {"error": None}
    try:
        off.offload(0, [(param, st)])
        parked = st["exp_avg"]
        buffer = off._host[(id(param), "exp_avg")]
        out["parked"] = (type(parked).__name__, parked.device_mesh.device_type, parked.placements == param.placements,
                         parked.shape == param.shape, off.is_parked(param, "exp_avg", parked),
                         parked._local_tensor.data_ptr() == buffer.data_ptr())
        out["report"] = (memory_report({param: st}, None, off).host_state_bytes, off.host_buffer_bytes)
        off.prefetch(0, [(param, st)])
        back = st["exp_avg"]
        out["back"] = (type(back).__name__, back.device_mesh.device_type, torch.equal(back._local_tensor, values),
                       off.is_parked(param, "exp_avg", back))
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def fsdp_offload_memory(rank: int, world: int, *, steps: int, active_layers: int) -> dict[str, Any]:
    """FSDP2 + ``offload="inactive"`` on a model whose head (3 rows) the 2 ranks shard unevenly: this
    rank's ``memory_report()`` after every step vs. the bytes of its own shards, counted here; and
    ``estimate_memory(world_size=2, rank=rank)`` vs. what was measured (and vs. AdamW on FSDP2)."""
    from torch.distributed.fsdp import fully_shard

    from grass_optim import estimate_memory

    def build() -> nn.Module:
        model = make_net(seed=0, d=FSDP_D, d_out=3)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model

    data = global_batches(steps, d_out=3)
    model = build()
    opt = GrassAdamW(model, offload="inactive",
                     **grass_kwargs(active_layers=active_layers, probe_steps=2, switch_every=2, seed=0))

    def state_bytes(ps: list[nn.Parameter]) -> int:
        return sum(local_bytes(v) for p in ps if p in opt.state for v in opt.state[p].values() if v.dim() > 0)

    blocks = [list(b.parameters()) for b in model.layers]
    outside = [p for m in (model.embed, model.head) for p in m.parameters()]
    out: dict[str, Any] = {"reports": [], "expected": [], "grad_bytes": []}
    visited: set[int] = set()
    parked: set[int] = set()  # blocks that have been parked at least once: they have host buffers
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, shard(x, rank, world), shard(y, rank, world)).backward()
        out["grad_bytes"].append(sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None))
        opt.step()
        active = set() if opt.is_probing else set(opt.active_layer_indices)
        parked |= visited - active
        visited |= active
        r = opt.memory_report()
        out["reports"].append((r.device_state_bytes, r.host_state_bytes, r.host_buffer_bytes))
        out["expected"].append((state_bytes([p for i in sorted(active) for p in blocks[i]] + outside),
                                state_bytes([p for i in range(len(blocks)) if i not in active for p in blocks[i]]),
                                state_bytes([p for i in sorted(parked) for p in blocks[i]])))
    out["visited"] = sorted(visited)
    out["weight_bytes"] = sum(local_bytes(p) for p in model.parameters())
    out["outside_state_bytes"] = state_bytes(outside)
    # AdamW on the same sharded model, one step: state and gradients of every parameter's shard.
    adamw_model = build()
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-2)
    x, y = data[0]
    loss_fn(adamw_model, shard(x, rank, world), shard(y, rank, world)).backward()
    out["adamw_grad_bytes"] = sum(local_bytes(p.grad) for p in adamw_model.parameters())
    adamw.step()
    out["adamw_state_bytes"] = sum(local_bytes(v) for st in adamw.state.values() for v in st.values() if v.dim() > 0)
    out["estimate"] = estimate_memory(make_net(seed=0, d=FSDP_D, d_out=3), active_layers=active_layers,
                                      world_size=world, rank=rank).rows
    out["estimate_of_sharded_model"] = estimate_memory(model, active_layers=active_layers, world_size=world,
                                                       rank=rank).rows
    return out


def fsdp_comm(rank: int, world: int, *, steps: int = 6) -> dict[str, Any]:
    """Bytes FSDP2 all-gathers (unsharded size) and reduce-scatters (unsharded gradient size) per
    step: AdamW over all parameters vs. GrassAdamW training 1 block of 4 (+ the outside).

    Counted by wrapping ``dist.all_gather_single`` and ``dist.reduce_scatter_single``, which FSDP2's
    default collectives call. Steps 2.. are averaged (the first step trains every block: freezing
    waits for the end of the first step in a multi-process run).
    """
    counts = {"all_gather": 0, "reduce_scatter": 0}
    originals = {"all_gather": dist.all_gather_single, "reduce_scatter": dist.reduce_scatter_single}

    def all_gather_single(output_tensor, input_tensor, *args, **kwargs):
        counts["all_gather"] += output_tensor.numel() * output_tensor.element_size()
        return originals["all_gather"](output_tensor, input_tensor, *args, **kwargs)

    def reduce_scatter_single(output, input, *args, **kwargs):  # FSDP2 passes output=, input=
        counts["reduce_scatter"] += input.numel() * input.element_size()
        return originals["reduce_scatter"](output, input, *args, **kwargs)

    out: dict[str, Any] = {}
    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single
    try:
        for method in ("adamw", "grass"):
            model = fsdp_model()
            opt: torch.optim.Optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-2) if method == "adamw" else
                                          GrassAdamW(model, **grass_kwargs(probe_steps=0, seed=0)))
            per_step = []
            for x, y in global_batches(steps):
                counts.update(all_gather=0, reduce_scatter=0)
                opt.zero_grad()
                loss_fn(model, shard(x, rank, world), shard(y, rank, world)).backward()
                grad_bytes = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
                opt.step()
                per_step.append(dict(counts))
            later = per_step[1:]
            out[method] = {k: sum(c[k] for c in later) / len(later) for k in counts}
            out[method]["step1"] = per_step[0]
            out[method]["grad_bytes_after_last_backward"] = grad_bytes  # this rank's gradient shards
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = originals["all_gather"], originals["reduce_scatter"]
    model = make_net(seed=0, d=FSDP_D)
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["block_bytes"] = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    return out


def _fsdp_opt(model: nn.Module, **grass: Any) -> GrassAdamW:
    return GrassAdamW(model, **grass_kwargs(**{"probe_steps": 2, "switch_every": 3, "update_every": 2,
                                               "seed": 0, **grass}))


def fsdp_resume_torch_save(rank: int, world: int, *, tmpdir: str, steps: int, stop: int,
                           weights_only: bool, **grass: Any) -> dict[str, Any]:
    """Uninterrupted run vs. a run saved after ``stop`` steps (per-rank ``torch.save`` of the model's and
    the optimizer's state dicts) and resumed into a fresh model and optimizer (``grass``: e.g. offload)."""
    data = global_batches(steps)
    model = fsdp_model()
    opt = _fsdp_opt(model, **grass)
    train_steps(model, opt, data, rank, world)
    reference = flat_params(model)
    final_state = _local_snapshot(model, opt)[1]

    model = fsdp_model()
    opt = _fsdp_opt(model, **grass)
    train_steps(model, opt, data[:stop], rank, world)
    path = Path(tmpdir) / f"rank{rank}.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    saved_types = sorted({type(v).__name__ for st in opt.state_dict()["state"].values() for v in st.values()})
    report_saved = opt.memory_report()
    del model, opt

    model = fsdp_model()
    opt = _fsdp_opt(model, **grass)
    out: dict[str, Any] = {"state_types": saved_types, "load_error": None}
    try:
        ckpt = torch.load(path, weights_only=weights_only)
    except Exception as err:  # weights_only=True refuses classes it does not know
        out["load_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        return out
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    out["resumed_step"] = opt.num_steps
    r = opt.memory_report()
    out["report_saved_loaded"] = [(x.device_state_bytes, x.host_state_bytes) for x in (report_saved, r)]
    history = train_steps(model, opt, data[stop:], rank, world)
    resumed = flat_params(model)
    state = _local_snapshot(model, opt)[1]
    out.update({"equal": torch.equal(resumed, reference), "max_diff": (resumed - reference).abs().max().item(),
                "state_equal": _same_state(state, final_state),
                "active_after": [h["active"] for h in history]})
    return out


def fsdp_dcp_probe(rank: int, world: int, *, tmpdir: str) -> dict[str, Any]:
    """What ``torch.distributed.checkpoint.state_dict`` does with a GrassAdamW (no recipe, just facts)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    data = global_batches(6)
    out: dict[str, Any] = {}
    # 1. During probing the base optimizer has no state yet: DCP "initialises" it by calling step().
    model = fsdp_model()
    opt = _fsdp_opt(model, probe_steps=4)
    train_steps(model, opt, data[:1], rank, world)
    opt.zero_grad()  # no gradients and no optimizer state: what DCP takes for "not initialised"
    before = opt.num_steps
    osd = get_optimizer_state_dict(model, opt)
    out["probing_steps_before_after_get"] = (before, opt.num_steps)
    out["keys_while_probing"] = sorted(osd)
    # 1b. The same through the base optimizer: GRASS counts nothing, but AdamW state (step 1, zero
    # moments) appears for every parameter that requires grad, which changes the later updates.
    model = fsdp_model()
    opt = _fsdp_opt(model, probe_steps=4)
    train_steps(model, opt, data[:1], rank, world)
    opt.zero_grad()
    get_optimizer_state_dict(model, opt.base_optimizer)
    out["base_while_probing_steps_and_states"] = (opt.num_steps, len(opt.base_optimizer.state))
    # 2. After training steps: the state is there, the 'grass' entry is not.
    model = fsdp_model()
    opt = _fsdp_opt(model)
    train_steps(model, opt, data[:5], rank, world)
    osd = get_optimizer_state_dict(model, opt)
    out["keys_after_training"] = sorted(osd)
    out["state_entries"] = len(osd["state"])
    # 3. Loading it back into a fresh GrassAdamW.
    fresh_model = fsdp_model()
    fresh = _fsdp_opt(fresh_model)
    try:
        set_optimizer_state_dict(fresh_model, fresh, osd)
        out["set_error"] = None
    except Exception as err:
        out["set_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    out["fresh_steps_after_set"] = fresh.num_steps
    try:
        set_optimizer_state_dict(fresh_model, fresh, osd, options=StateDictOptions(strict=False))
        out["set_nonstrict_error"] = None
    except Exception as err:
        out["set_nonstrict_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return out


def fsdp_resume_dcp(rank: int, world: int, *, tmpdir: str, steps: int, stop: int) -> dict[str, Any]:
    """The manual DCP recipe (before ``grass_optim.save_checkpoint``; docs/guides/fsdp2.md mentions it):
    DCP for the model and the *base* optimizer, the replicated ``"grass"`` entry saved by rank 0 with
    ``torch.save``; saved after probing, resumed into a fresh model and optimizer, compared with an
    uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    data = global_batches(steps)
    model = fsdp_model()
    opt = _fsdp_opt(model)
    train_steps(model, opt, data, rank, world)
    reference = flat_params(model)

    ckpt = Path(tmpdir) / "dcp"
    model = fsdp_model()
    opt = _fsdp_opt(model)
    train_steps(model, opt, data[:stop], rank, world)
    grass = opt.state_dict()["grass"]  # the same on every rank
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt.base_optimizer)},
             checkpoint_id=str(ckpt))
    if rank == 0:
        torch.save(grass, ckpt / "grass.pt")
    dist.barrier()
    del model, opt

    model = fsdp_model()
    opt = _fsdp_opt(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt.base_optimizer)}
    # get_optimizer_state_dict gave every parameter a state (it ran a zero-lr step to create them);
    # the checkpoint has none for blocks not trained yet: keep only the entries it has.
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    state["optim"]["state"] = {fqn: st for fqn, st in state["optim"]["state"].items()
                               if any(k.startswith(f"optim.state.{fqn}.") for k in saved)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt.base_optimizer, state["optim"], options=StateDictOptions(strict=False))
    opt.load_state_dict({**opt.base_optimizer.state_dict(), "grass": torch.load(ckpt / "grass.pt", weights_only=True)})
    out: dict[str, Any] = {"resumed_step": opt.num_steps}
    train_steps(model, opt, data[stop:], rank, world)
    resumed = flat_params(model)
    out.update({"equal": torch.equal(resumed, reference), "max_diff": (resumed - reference).abs().max().item()})
    return out


def _train_at(model: nn.Module, opt: GrassAdamW, data: list, rank: int, world: int, start: int = 0,
              at: Any = None) -> list[tuple[int, ...]]:
    """``tests.helpers.train_at`` on this rank's rows of each global batch."""
    return train_at(model, opt, data, start=start, at=at, part=lambda t: shard(t, rank, world))


def _with_state(model: nn.Module, opt: GrassAdamW) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if opt.state.get(p))


def _placed(opt: GrassAdamW) -> tuple[int, int]:
    """This rank's optimizer-state bytes on the device and parked on the host."""
    report = opt.memory_report()
    return report.device_state_bytes, report.host_state_bytes


def _dcp_model(wrapper: str) -> nn.Module:
    if wrapper == "fsdp":
        return fsdp_model()
    return DistributedDataParallel(make_net(seed=0, d=FSDP_D), find_unused_parameters=True)


def dcp_save_and_load(rank: int, world: int, *, wrapper: str, tmpdir: str, steps: int,
                      save_at: list[tuple[int, str]], **grass: Any) -> dict[str, Any]:
    """grass_optim.save_checkpoint/load_checkpoint with FSDP2 (``wrapper="fsdp"``) or DDP (``"ddp"``): a
    run saving at ``save_at`` vs. one that never saves, and a fresh model and optimizer resumed from
    each save, continued to the end (``grass``: further GrassAdamW settings, the same for every run)."""
    from grass_optim import load_checkpoint, save_checkpoint

    data = global_batches(steps)
    model = _dcp_model(wrapper)
    opt = _fsdp_opt(model, **grass)
    torch.manual_seed(TORCH_SEED)
    ref_actives = _train_at(model, opt, data, rank, world)
    out: dict[str, Any] = {"ref_rng": torch.get_rng_state(), "ref_with_state": _with_state(model, opt),
                           "reference": flat_params(model), "ref_actives": ref_actives}

    model = _dcp_model(wrapper)
    opt = _fsdp_opt(model, **grass)
    saved: dict[str, Any] = {}

    def save(i: int, where: str) -> None:
        if (i, where) in save_at:
            path = Path(tmpdir) / f"{i}-{where}"
            save_checkpoint(path, model, opt)
            saved[f"{i}-{where}"] = (path, _with_state(model, opt), i + 1 if where == "step" else i, _placed(opt))

    torch.manual_seed(TORCH_SEED)
    out["actives"] = _train_at(model, opt, data, rank, world, at=save)
    out.update(rng=torch.get_rng_state(), with_state=_with_state(model, opt), params=flat_params(model),
               saved_with_state={k: v[1] for k, v in saved.items()}, saved_placed={k: v[3] for k, v in saved.items()},
               resumed={})
    del model, opt
    for key, (path, _, start, _) in saved.items():
        model = _dcp_model(wrapper)
        opt = _fsdp_opt(model, **{**grass, "seed": 1234})
        load_checkpoint(path, model, opt)
        entry = {"with_state": _with_state(model, opt), "step": opt.num_steps, "placed": _placed(opt),
                 "state_types": sorted({type(v).__name__ for st in opt.state.values() for v in st.values()})}
        entry["actives"] = _train_at(model, opt, data, rank, world, start=start)
        entry["params"] = flat_params(model)
        out["resumed"][key] = entry
        del model, opt
    # The replicated part must agree across ranks: one rank with another learning rate is refused.
    model = _dcp_model(wrapper)
    opt = _fsdp_opt(model, **grass)
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.5
    try:
        save_checkpoint(Path(tmpdir) / "disagree", model, opt)
        out["disagree_error"] = None
    except RuntimeError as err:
        out["disagree_error"] = str(err)
    return out


TASKS = {f.__name__: f for f in (
    ddp_train, ddp_resume, ddp_invalid_wrappers, ddp_built_while_frozen, ddp_wrapped_after_first_step, seeds, ddp_comm,
    ddp_after_optimizer_without_unused, dist_memory,
    fsdp_train, fsdp_comm, fsdp_built_before_sharding, fsdp_offload_equal, fsdp_offload_memory,
    offload_dtensor_of_another_device_type,
    fsdp_resume_torch_save, fsdp_dcp_probe,
    fsdp_resume_dcp, dcp_save_and_load)}

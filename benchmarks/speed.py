"""Step time and peak memory of GrassAdamW against torch.optim.AdamW, on CPU.

    python benchmarks/speed.py                               # the full run: ~5-7 min on 2 shared cores
    python benchmarks/speed.py --quick                       # tiny sizes, < 60 s (used by the tests)
    python benchmarks/speed.py --sections time,memory --threads 2

Three sections, each printed as one Markdown table and all written to one JSON file: ``time``
(step-time ratios at three sizes, every method in its own worker process, driven round-robin),
``memory`` (peak RSS of training, one fresh process per method and malloc setting, against
``estimate_memory``) and ``scaling`` (as L, gamma and the width grow). How each is measured, and why
(worker processes, pinned glibc settings, one thread): docs/benchmarks.md ("Speed and memory on CPU").
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import (
    METHODS,
    MIB,
    PHASES,
    Worker,
    environment,
    grass_optim,
    log,
    markdown_table,
    progress,
    serve,
    state_bytes,
    train_step,
    write_json,
)
from harness import make_optimizer as build_optimizer
from llama import LlamaConfig, build_model, count_params
from torch import Tensor, nn

SECTIONS = ("time", "memory", "scaling", "refresh")
TIME_METHODS = ("adamw", "grass-all", "grass", "lisa")
MEMORY_METHODS = ("adamw", "lisa", "grass", "grass-inactive", "grass-stream")
# The refresh section: the step refresh_all adds before each refresh (every block's gradient measured,
# only the active blocks updated), and a probing step, each made *every* step so that its cost is
# measured alone, against an ordinary GRASS step.
REFRESH_VARIANTS = {"grass-measure-all": {"sampler": "grass", "refresh_all": True, "update_every": 1},
                    "grass-probing": {"sampler": "grass", "probe_steps": 10**9}}
REFRESH_METHODS = ("grass", "grass-measure-all", "grass-probing")
TARGETS = {"grass-all": 1.03, "grass": 0.75}  # step-time ratio vs AdamW, at most
MEMORY_TARGET = 0.10  # relative error of the estimate, at most
# glibc malloc settings of the memory subprocesses. "default": glibc's own (large blocks are mmap'ed
# until the first one is freed, after which its dynamic threshold rises to up to 32 MiB and blocks of
# that size come from the heap, where freed memory stays resident until trimmed). "mmap": a fixed
# 64 KiB threshold, so every tensor above it is mmap'ed and returned to the OS when freed: RSS then
# follows the live tensors, which is what the estimate predicts.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
MALLOC_MODES: dict[str, dict[str, str]] = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
# glibc malloc settings of the timing workers. "steady": every tensor here (< 32 MiB) comes from the heap
# and freed memory is never trimmed, so after the warm-up no step page-faults. With glibc's defaults,
# whether the gradients freed by zero_grad() are trimmed and faulted in again (zeroed by the kernel) in
# the next backward depends on what else sits at the top of the heap: up to ~240k minor faults (~1 GB
# touched) and +50 % backward time per step in trials, varying between methods and runs for reasons
# that have nothing to do with the optimizer.
TIMING_MALLOC: dict[str, dict[str, str]] = {
    "steady": {"MALLOC_MMAP_THRESHOLD_": str(32 * MIB), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024**3)},
    "default": {},
}

LR = 1e-4
WEIGHT_DECAY = 0.01
SEED = 0


def _mlp(width: int) -> int:
    """Llama's intermediate size ~2.75 x hidden, rounded to a multiple of 16."""
    return int(round(width * 2.75 / 16)) * 16


def model_cfg(width: int, layers: int, vocab: int, seq: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=_mlp(width), num_layers=layers,
                       num_heads=max(1, width // 64), max_seq_len=seq)


# (full run, --quick)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "time": (
        {"sizes": {"small": 256, "medium": 384, "large": 512}, "layers": 16, "vocab": 1024, "batch": 2, "seq": 64,
         "active_layers": 2, "switch_every": 10, "warmup": 3, "repeats": 11, "steps_per_slot": 2},
        {"sizes": {"small": 32, "medium": 48, "large": 64}, "layers": 16, "vocab": 128, "batch": 1, "seq": 16,
         "active_layers": 2, "switch_every": 2, "warmup": 1, "repeats": 3, "steps_per_slot": 1},
    ),
    "memory": (
        {"width": 512, "layers": 16, "vocab": 1024, "batch": 1, "seq": 32, "active_layers": 2, "switch_every": 1,
         "extra_steps": 3, "adamw_steps": 4, "max_steps": 200, "malloc": ["default", "mmap"]},
        {"width": 128, "layers": 16, "vocab": 256, "batch": 1, "seq": 16, "active_layers": 2, "switch_every": 1,
         "extra_steps": 2, "adamw_steps": 3, "max_steps": 200, "malloc": ["default"]},
    ),
    "refresh": (
        {"sizes": {"small": 256, "large": 512}, "layers": 16, "vocab": 1024, "batch": 2, "seq": 64,
         "active_layers": 2, "switch_every": 10**6, "warmup": 3, "repeats": 11, "steps_per_slot": 2,
         "memory": {"width": 512, "layers": 16, "vocab": 1024, "batch": 1, "seq": 32, "steps": 4}},
        {"sizes": {"small": 32}, "layers": 16, "vocab": 128, "batch": 1, "seq": 16,
         "active_layers": 2, "switch_every": 10**6, "warmup": 1, "repeats": 2, "steps_per_slot": 1,
         "memory": {"width": 64, "layers": 16, "vocab": 128, "batch": 1, "seq": 16, "steps": 3}},
    ),
    "scaling": (
        {"base": {"layers": 16, "width": 256, "active_layers": 2}, "layers": [8, 16, 32], "active_layers": [1, 2, 4, 8],
         "widths": [256, 512, 1024], "vocab": 1024, "batch": 2, "seq": 64, "switch_every": 10, "warmup": 2,
         "repeats": 7, "steps_per_slot": 1},
        {"base": {"layers": 16, "width": 32, "active_layers": 2}, "layers": [8, 16, 32], "active_layers": [1, 2, 4, 8],
         "widths": [32, 64, 128], "vocab": 128, "batch": 1, "seq": 16, "switch_every": 2, "warmup": 1,
         "repeats": 2, "steps_per_slot": 1},
    ),
}


# ----------------------------------------------------------------------------- small helpers
def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (as numpy's default)."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """ru_maxrss in bytes (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def make_batches(vocab: int, batch: int, seq: int, n: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(SEED + 1)
    tokens = torch.randint(vocab, (n, batch, seq + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def make_optimizer(method: str, model: nn.Module, *, active_layers: int, switch_every: int) -> torch.optim.Optimizer:
    return build_optimizer(method, model, lr=LR, weight_decay=WEIGHT_DECAY, active_layers=active_layers,
                           switch_every=switch_every, probe_steps=0, seed=SEED, variants=REFRESH_VARIANTS)


def timed_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]) -> tuple[float, ...]:
    """One full step; returns the seconds of each of ``harness.PHASES``."""
    x, y = batch
    return train_step(lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()), opt)[1]


def timing_worker(method: str, threads: int, malloc: str) -> Worker:
    """One method in its own process (own model, own allocator), driven step by step.

    Separate processes keep one method's allocations from changing another's: in one process, the
    memory AdamW frees in zero_grad() is reused by the next method's backward without page faults,
    which made whichever method ran after AdamW look ~5-10 % faster in its backward. Messages:
    {"build": spec} -> {"model": ...}; {"run": n} -> {"steps": [[*PHASES seconds, minor faults], ...]};
    {"info": true} -> {"blocks_trained": n, ...}; {"free": true} -> {"freed": true}.
    """
    env: dict[str, str | None] = {k: None for k in MALLOC_ENV}
    env.update(TIMING_MALLOC[malloc])
    return Worker(__file__, f"time:{method}", args=["--threads", str(threads)], env=env)


class _TimingRun:
    """The worker's side of :func:`timing_worker`."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.model: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.batches: list[tuple[Tensor, Tensor]] = []
        self.done = 0

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        if "build" in msg:
            spec = msg["build"]
            self.model = self.opt = None
            gc.collect()
            cfg = LlamaConfig(**spec["model"])
            self.model = build_model(cfg, "cpu", SEED)
            self.opt = make_optimizer(self.method, self.model, active_layers=spec["active_layers"],
                                      switch_every=spec["switch_every"])
            self.batches = make_batches(cfg.vocab_size, spec["batch"], spec["seq"])
            self.done = 0
            return {"model": model_info(cfg, self.model)}
        if "free" in msg:
            self.model = self.opt = None
            self.batches = []
            gc.collect()
            return {"freed": True}
        if "run" in msg:
            assert self.model is not None and self.opt is not None
            steps = []
            for _ in range(msg["run"]):
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                times = timed_step(self.model, self.opt, self.batches[self.done % len(self.batches)])
                steps.append([*times, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults])
                self.done += 1
            return {"steps": steps}
        trained = None
        if isinstance(self.opt, grass_optim.GrassAdamW):
            trained = len({b for e in self.opt.history["events"] for b in e["active"]})
        return {"blocks_trained": trained, "steps_done": self.done}


def interleaved(workers: dict[str, Worker], spec: dict[str, Any], warmup: int, repeats: int, per_slot: int,
                reference: str = "adamw") -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Build ``spec`` in every worker, then time them round-robin (order rotated per repeat).

    Returns the stats per worker (ratios vs ``reference``) and the model info.
    """
    names = list(workers)
    for w in workers.values():  # the builds run in parallel
        w.send({"build": spec})
    info = [w.receive()["model"] for w in workers.values()][0]
    for _ in range(warmup):
        for name in names:
            workers[name].call({"run": 1})
    slots: dict[str, list[list[list[float]]]] = {n: [] for n in names}
    bar = progress(range(repeats), desc=f"[time] {spec['model'].get('hidden_size', '')} repeats")
    for r in bar:
        k = r % len(names)
        for name in names[k:] + names[:k]:
            slots[name].append(workers[name].call({"run": per_slot})["steps"])
        bar.set_postfix({n: f"{1000 * slots[n][-1][-1][PHASES.index('total')]:.0f}ms" for n in names}, refresh=False)
    bar.close()
    out: dict[str, dict[str, Any]] = {}
    total = PHASES.index("total")
    ref_repeat = [statistics.median(s[total] for s in slot) for slot in slots[reference]]
    for name in names:
        trained = workers[name].call({"info": True})["blocks_trained"]
        steps = [s for slot in slots[name] for s in slot]
        totals = [s[total] for s in steps]
        per_repeat = [statistics.median(s[total] for s in slot) for slot in slots[name]]
        ratios = [a / b for a, b in zip(per_repeat, ref_repeat, strict=True)]
        out[name] = {
            "median_ms": 1000 * statistics.median(totals),
            "q25_ms": 1000 * quantile(totals, 0.25),
            "q75_ms": 1000 * quantile(totals, 0.75),
            "phases_median_ms": {p: 1000 * statistics.median(s[i] for s in steps) for i, p in enumerate(PHASES)},
            "ratio_median": statistics.median(ratios),
            "ratio_q25": quantile(ratios, 0.25),
            "ratio_q75": quantile(ratios, 0.75),
            "ratios": ratios,
            "step_ms": [1000 * t for t in totals],
            "steps_timed": len(totals),
            "minor_faults_per_step_median": statistics.median(s[len(PHASES)] for s in steps),
            "blocks_trained": trained,
        }
    return out, info


def model_info(cfg: LlamaConfig, model: nn.Module) -> dict[str, Any]:
    part = grass_optim.find_layers(model)
    return {**cfg.as_dict(), "params": count_params(model),
            "block_params": sum(p.numel() for p in part.block_params[0]),
            "outside_params": sum(p.numel() for p in part.outside_params)}


class WorkerPool:
    """The timing workers, one per method, started when first needed and shared by the sections."""

    def __init__(self, threads: int, malloc: str) -> None:
        self.threads, self.malloc = threads, malloc
        self.workers: dict[str, Worker] = {}

    def get(self, methods: list[str]) -> dict[str, Worker]:
        for m in methods:  # all started before any is waited for: their imports overlap
            if m not in self.workers:
                self.workers[m] = timing_worker(m, self.threads, self.malloc)
        return {m: self.workers[m] for m in methods}

    def release(self) -> None:
        """Drop every worker's model (before the memory section, so they hold no RAM meanwhile)."""
        for w in self.workers.values():
            w.send({"free": True})
        for w in self.workers.values():
            w.receive()

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers.clear()


# ----------------------------------------------------------------------------- section: time
def section_time(p: dict[str, Any], pool: WorkerPool) -> dict[str, Any]:
    rows = []
    workers = pool.get(list(TIME_METHODS))
    for size, width in p["sizes"].items():
        cfg = model_cfg(width, p["layers"], p["vocab"], p["seq"])
        t0 = time.perf_counter()
        log(f"[time] {size}: width {width} ...")
        spec = {"model": cfg.as_dict(), "active_layers": p["active_layers"], "switch_every": p["switch_every"],
                "batch": p["batch"], "seq": p["seq"]}
        stats, info = interleaved(workers, spec, p["warmup"], p["repeats"], p["steps_per_slot"])
        rows.append({"size": size, "model": info, "methods": stats, "wall_s": time.perf_counter() - t0})
        log(f"[time] {size}: done in {rows[-1]['wall_s']:.0f} s; "
            + ", ".join(f"{m} {s['ratio_median']:.3f}" for m, s in stats.items()))
    return {"config": {**p, "malloc": pool.malloc, "malloc_env": TIMING_MALLOC[pool.malloc]}, "rows": rows}


def table_time(sec: dict[str, Any]) -> str:
    header = ["size (params)", "method", "ms/step [25–75 %]", "vs AdamW [25–75 %]", "fwd / bwd / step ms",
              "target"]
    out = []
    for row in sec["rows"]:
        first = True
        for m, s in row["methods"].items():
            ph = s["phases_median_ms"]
            target = TARGETS.get(m)
            verdict = "" if target is None else f"≤ {target:.2f}: {'met' if s['ratio_median'] <= target else 'missed'}"
            out.append([
                f"{row['size']} ({row['model']['params'] / 1e6:.1f} M)" if first else "",
                m,
                f"{s['median_ms']:.0f} [{s['q25_ms']:.0f}–{s['q75_ms']:.0f}]",
                f"{s['ratio_median']:.3f} [{s['ratio_q25']:.3f}–{s['ratio_q75']:.3f}]",
                f"{ph['forward']:.0f} / {ph['backward']:.0f} / {ph['step']:.0f}",
                verdict,
            ])
            first = False
    return markdown_table(header, out)


# ----------------------------------------------------------------------------- section: memory
def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: train one method, report RSS and tensor accounting."""
    torch.set_num_threads(spec["threads"])
    method, p = spec["method"], spec["params"]
    # Page in the code of every kernel and optimizer path with a tiny model (2 blocks, one redraw per
    # step), so that the baseline below already holds it.
    tiny = build_model(model_cfg(32, 2, 64, p["seq"]), "cpu", SEED)
    topt = make_optimizer(method, tiny, active_layers=1, switch_every=1)
    for b in make_batches(64, p["batch"], p["seq"], n=3):
        timed_step(tiny, topt, b)
    del tiny, topt
    batches = make_batches(p["vocab"], p["batch"], p["seq"])
    gc.collect()

    cfg = model_cfg(p["width"], p["layers"], p["vocab"], p["seq"])
    rss_before = current_rss()
    model = build_model(cfg, "cpu", SEED)
    gc.collect()
    rss_after_build = current_rss()
    maxrss_after_build = peak_rss()
    opt = make_optimizer(method, model, active_layers=p["active_layers"], switch_every=p["switch_every"])
    grass = isinstance(opt, grass_optim.GrassAdamW)
    L = cfg.num_layers
    visited: set[int] = set()
    steps, extra = 0, None
    grad_max = state_dev_max = host_max = 0
    weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    t0 = time.perf_counter()
    while True:
        active = list(opt.active_layer_indices) if grass else list(range(L))
        x, y = batches[steps % len(batches)]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        grad_max = max(grad_max, sum(q.grad.numel() * q.grad.element_size() for q in model.parameters()
                                     if q.grad is not None))
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        visited.update(active)
        state_dev_max = max(state_dev_max, state_bytes(opt)["device"])
        if grass:
            host_max = max(host_max, opt.memory_report().host_buffer_bytes)
        if not grass:
            if steps >= p["adamw_steps"]:
                break
            continue
        if extra is None and len(visited) == L:
            extra = p["extra_steps"]
        if extra is not None:
            if extra == 0:
                break
            extra -= 1
        if steps >= p["max_steps"]:
            break
    train_s = time.perf_counter() - t0
    peak = peak_rss()
    est = grass_optim.estimate_memory(model, active_layers=p["active_layers"])
    row = est.rows[METHODS[method].estimate]
    # What parking keeps on the CPU host (unpinned here): AdamW's two moments of every block, all parked once.
    host_est = row["host_state"]
    return {
        "method": method, "steps": steps, "blocks_visited": len(visited), "num_layers": L, "train_s": train_s,
        "rss_before_build": rss_before, "rss_after_build": rss_after_build,
        "maxrss_after_build": maxrss_after_build, "peak_rss": peak, "weight_bytes": weight_bytes,
        "grad_bytes_max": grad_max, "device_state_bytes_max": state_dev_max, "host_buffer_bytes_max": host_max,
        "estimate": row, "estimate_host_buffers": host_est,
        "params": count_params(model),
    }


def run_memory_child(method: str, p: dict[str, Any], threads: int, timeout: float, malloc: str) -> dict[str, Any]:
    """:func:`memory_child` in a fresh process with the given glibc malloc settings."""
    env: dict[str, str | None] = {k: None for k in MALLOC_ENV}
    env.update(MALLOC_MODES[malloc])
    worker = Worker(__file__, "memory", args=["--threads", str(threads)], env=env)
    try:
        return worker.call({"method": method, "params": p, "threads": threads}, timeout=timeout)
    finally:
        worker.close()


def memory_row(r: dict[str, Any]) -> dict[str, Any]:
    """Add the derived numbers: predictions for RAM and the errors."""
    est = r["estimate"]
    dev_gs = est["gradients"] + est["optimizer_state"]  # what estimate_memory predicts, minus the weights
    ram_gs = dev_gs + r["estimate_host_buffers"]
    train = r["peak_rss"] - r["rss_after_build"]
    weights_rss = r["rss_after_build"] - r["rss_before_build"]
    r.update({
        "train_peak_bytes": train,
        "weights_rss_bytes": weights_rss,
        "estimate_device_gs": dev_gs,
        "estimate_ram_gs": ram_gs,
        "error_train": train / ram_gs - 1,
        "error_wgs": (r["peak_rss"] - r["rss_before_build"]) / (est["weights"] + ram_gs) - 1,
        "residual_bytes": train - ram_gs,
        "device_state_vs_estimate": r["device_state_bytes_max"] / est["optimizer_state"] - 1,
    })
    return r


def section_memory(p: dict[str, Any], threads: int, timeout: float, mallocs: list[str], jobs: int
                   ) -> dict[str, Any]:
    """Every (method, malloc) pair in its own fresh subprocess, ``jobs`` at a time (peak RSS is per
    process, so running two side by side changes nothing but the wall time)."""
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    errors: dict[str, tuple[str, str]] = {}

    def one(m: str, malloc: str) -> None:
        t0 = time.perf_counter()
        try:
            run = memory_row(run_memory_child(m, p, threads, timeout, malloc))
        except Exception as err:  # one method failing must not hide the others
            errors.setdefault(m, (f"{type(err).__name__}: {err}", traceback.format_exc()))
            log(f"[memory] {m}, malloc {malloc}: {traceback.format_exc()}")
            return
        run["wall_s"] = time.perf_counter() - t0
        runs[(m, malloc)] = run
        log(f"[memory] {m}, malloc {malloc}: {run['steps']} steps in {run['wall_s']:.0f} s; train peak "
            f"{run['train_peak_bytes'] / MIB:.1f} MiB vs est. {run['estimate_ram_gs'] / MIB:.1f} MiB")

    log(f"[memory] {len(MEMORY_METHODS) * len(mallocs)} fresh subprocesses, {jobs} at a time ...")
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        for f in [ex.submit(one, m, malloc) for m in MEMORY_METHODS for malloc in mallocs]:
            f.result()
    rows = []
    for m in MEMORY_METHODS:
        row: dict[str, Any] = {"method": m, "error": None, "runs": {}}
        if m in errors:
            row["error"], row["traceback"] = errors[m]
        row["runs"] = {malloc: runs[(m, malloc)] for malloc in mallocs if (m, malloc) in runs}
        if row["runs"]:
            first = next(iter(row["runs"].values()))
            # The same in every run (deterministic schedule, same model): lifted to the row.
            for k in ("steps", "blocks_visited", "num_layers", "params", "weight_bytes", "estimate",
                      "estimate_host_buffers", "estimate_device_gs", "estimate_ram_gs", "grad_bytes_max",
                      "device_state_bytes_max", "host_buffer_bytes_max", "device_state_vs_estimate"):
                row[k] = first[k]
        rows.append(row)
    return {"config": {**p, "malloc": mallocs, "malloc_env": {m: MALLOC_MODES[m] for m in mallocs}, "jobs": jobs},
            "rows": rows}


MALLOC_LABEL = {"default": "glibc default", "mmap": "MALLOC_MMAP_THRESHOLD_=64 KiB"}


def table_memory(sec: dict[str, Any]) -> str:
    mallocs = sec["config"]["malloc"]
    header = ["method", "steps (blocks trained)", "device state MiB: MemoryReport max / est.", "est. device g+s MiB",
              "+ host buffers MiB", "est. RAM g+s MiB"]
    header += [f"train peak MiB, {MALLOC_LABEL[m]} (error)" for m in mallocs]
    header += [f"w+g+s: RSS / est. MiB, {MALLOC_LABEL[mallocs[0]]} (error)"]
    out = []
    for r in sec["rows"]:
        if r["error"] and not r["runs"]:
            out.append([r["method"]] + ["—"] * (len(header) - 2) + [f"ERROR {r['error'].splitlines()[0][:200]}"])
            continue
        cells = [r["method"], f"{r['steps']} ({r['blocks_visited']}/{r['num_layers']})",
                 f"{r['device_state_bytes_max'] / MIB:.1f} / {r['estimate']['optimizer_state'] / MIB:.1f}",
                 f"{r['estimate_device_gs'] / MIB:.1f}", f"{r['estimate_host_buffers'] / MIB:.1f}",
                 f"{r['estimate_ram_gs'] / MIB:.1f}"]
        for m in mallocs:
            run = r["runs"].get(m)
            cells.append("—" if run is None else
                         f"{run['train_peak_bytes'] / MIB:.1f} ({100 * run['error_train']:+.1f} %)")
        run = r["runs"][mallocs[0]]
        rss = (run["peak_rss"] - run["rss_before_build"]) / MIB
        est = (run["estimate"]["weights"] + run["estimate_ram_gs"]) / MIB
        cells.append(f"{rss:.1f} / {est:.1f} ({100 * run['error_wgs']:+.1f} %)")
        if r["error"]:
            cells[-1] += f"; ERROR {r['error'].splitlines()[0][:200]}"
        out.append(cells)
    return markdown_table(header, out)


# ----------------------------------------------------------------------------- section: refresh
def refresh_memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: ``steps`` steps of one method; the peak RSS over RSS after building."""
    torch.set_num_threads(spec["threads"])
    p = spec["params"]
    cfg = model_cfg(p["width"], p["layers"], p["vocab"], p["seq"])
    batches = make_batches(p["vocab"], p["batch"], p["seq"])
    model = build_model(cfg, "cpu", SEED)
    gc.collect()
    rss_after_build = current_rss()
    opt = make_optimizer(spec["method"], model, active_layers=spec["active_layers"], switch_every=10**6)
    for i in range(p["steps"]):
        timed_step(model, opt, batches[i % len(batches)])
    return {"method": spec["method"], "train_peak_bytes": peak_rss() - rss_after_build}


def section_refresh(p: dict[str, Any], pool: WorkerPool, threads: int, timeout: float) -> dict[str, Any]:
    rows = []
    workers = pool.get(list(REFRESH_METHODS))
    for size, width in p["sizes"].items():
        cfg = model_cfg(width, p["layers"], p["vocab"], p["seq"])
        log(f"[refresh] {size}: width {width} ...")
        spec = {"model": cfg.as_dict(), "active_layers": p["active_layers"], "switch_every": p["switch_every"],
                "batch": p["batch"], "seq": p["seq"]}
        stats, info = interleaved(workers, spec, p["warmup"], p["repeats"], p["steps_per_slot"], reference="grass")
        rows.append({"size": size, "model": info, "methods": stats})
    pool.release()
    memory = {}
    for method in ("adamw", *REFRESH_METHODS):  # one fresh process each, RSS following live tensors
        worker = Worker(__file__, "refresh-memory", args=["--threads", str(threads)],
                        env={**{k: None for k in MALLOC_ENV}, **MALLOC_MODES["mmap"]})
        try:
            memory[method] = worker.call({"method": method, "params": p["memory"], "threads": threads,
                                          "active_layers": p["active_layers"]}, timeout=timeout)
        finally:
            worker.close()
    return {"config": {**p, "malloc": pool.malloc, "malloc_env": TIMING_MALLOC[pool.malloc]}, "rows": rows,
            "memory": memory}


def table_refresh(sec: dict[str, Any]) -> str:
    header = ["size (params)", "step", "ms/step [25–75 %]", "vs GRASS step [25–75 %]", "fwd / bwd / step ms",
              "train peak RSS MiB"]
    label = {"grass": "GRASS step (γ = 2)", "grass-measure-all": "refresh_all measure step",
             "grass-probing": "probing step"}
    out = []
    for row in sec["rows"]:
        first = True
        for m, s in row["methods"].items():
            ph = s["phases_median_ms"]
            mem = sec["memory"].get(m, {}).get("train_peak_bytes")
            out.append([f"{row['size']} ({row['model']['params'] / 1e6:.1f} M)" if first else "", label[m],
                        f"{s['median_ms']:.0f} [{s['q25_ms']:.0f}–{s['q75_ms']:.0f}]",
                        f"{s['ratio_median']:.3f} [{s['ratio_q25']:.3f}–{s['ratio_q75']:.3f}]",
                        f"{ph['forward']:.0f} / {ph['backward']:.0f} / {ph['step']:.0f}",
                        "—" if mem is None else f"{mem / MIB:.1f}"])
            first = False
    adamw = sec["memory"].get("adamw", {}).get("train_peak_bytes")
    if adamw is not None:
        out.append(["", "AdamW step (for scale)", "", "", "", f"{adamw / MIB:.1f}"])
    return markdown_table(header, out)


# ----------------------------------------------------------------------------- section: scaling
def scaling_configs(p: dict[str, Any]) -> list[dict[str, Any]]:
    base = p["base"]
    out = [{"vary": "L", **base, "layers": n} for n in p["layers"]]
    out += [{"vary": "γ", **base, "active_layers": g} for g in p["active_layers"]]
    out += [{"vary": "width", **base, "width": w} for w in p["widths"]]
    seen, unique = set(), []
    for c in out:
        key = (c["layers"], c["width"], c["active_layers"])
        if key in seen:
            continue
        seen.add(key)
        if key == (base["layers"], base["width"], base["active_layers"]):
            c["vary"] = "base"
        unique.append(c)
    return unique


def section_scaling(p: dict[str, Any], pool: WorkerPool) -> dict[str, Any]:
    rows = []
    workers = pool.get(["adamw", "grass"])
    for c in scaling_configs(p):
        t0 = time.perf_counter()
        cfg = model_cfg(c["width"], c["layers"], p["vocab"], p["seq"])
        log(f"[scaling] L={c['layers']} width={c['width']} γ={c['active_layers']} ...")
        spec = {"model": cfg.as_dict(), "active_layers": c["active_layers"], "switch_every": p["switch_every"],
                "batch": p["batch"], "seq": p["seq"]}
        stats, info = interleaved(workers, spec, p["warmup"], p["repeats"], p["steps_per_slot"])
        with torch.device("meta"):
            meta = build_model(cfg, "meta", SEED)
        est = grass_optim.estimate_memory(meta, active_layers=c["active_layers"])
        rows.append({**c, "model": info, "methods": stats,
                     "estimate": {k: est.rows[k]["total"] for k in ("adamw", "grass", "grass-stream")},
                     "wall_s": time.perf_counter() - t0})
        log(f"[scaling] done in {rows[-1]['wall_s']:.0f} s: ratio {stats['grass']['ratio_median']:.3f}")
    return {"config": {**p, "malloc": pool.malloc, "malloc_env": TIMING_MALLOC[pool.malloc]}, "rows": rows}


def table_scaling(sec: dict[str, Any]) -> str:
    header = ["varies", "L", "width", "γ", "params M", "AdamW ms", "GRASS ms", "GRASS / AdamW [25–75 %]",
              "est. w+g+s MiB: AdamW / GRASS / stream"]
    out = []
    for r in sec["rows"]:
        a, g, e = r["methods"]["adamw"], r["methods"]["grass"], r["estimate"]
        out.append([r["vary"], str(r["layers"]), str(r["width"]), str(r["active_layers"]),
                    f"{r['model']['params'] / 1e6:.1f}", f"{a['median_ms']:.0f}", f"{g['median_ms']:.0f}",
                    f"{g['ratio_median']:.3f} [{g['ratio_q25']:.3f}–{g['ratio_q75']:.3f}]",
                    f"{e['adamw'] / MIB:.0f} / {e['grass'] / MIB:.0f} / {e['grass-stream'] / MIB:.0f}"])
    return markdown_table(header, out)


# ----------------------------------------------------------------------------- output
def _shape(width: int, layers: int, vocab: int) -> str:
    return (f"hidden {width}, intermediate {_mlp(width)}, {layers} blocks x {max(1, width // 64)} heads, "
            f"vocab {vocab}, untied head")


def print_header(info: dict[str, Any], args: argparse.Namespace) -> None:
    env = info["environment"]
    print("## GRASS step time and memory on CPU" + (" (--quick)" if args.quick else "") + "\n")
    print(f"- date: {env['date']}")
    print(f"- CPU: {env['cpu_model']}, {env['cpu_count']} logical cores; load average at start "
          f"{'/'.join(f'{x:.2f}' for x in env['loadavg_start'])} (1/5/15 min)")
    print(f"- torch {env['torch']}, python {env['python']}, grass_optim {env['grass_optim']} (git {env['git']}); "
          f"torch.set_num_threads({args.threads}) (torch.get_num_threads() = {env['threads']})")
    print(f"- every run: Llama-style decoder (benchmarks/llama.py), fp32; torch.optim.AdamW and GrassAdamW "
          f"with lr {LR}, weight decay {WEIGHT_DECAY}, seed {SEED}; GrassAdamW probe_steps=0, offload=None "
          f"unless named")
    print(flush=True)


def _workers_line(sec: dict[str, Any], stats: list[tuple[str, dict[str, Any]]]) -> str:
    p = sec["config"]
    env = " ".join(f"{k}={v}" for k, v in p["malloc_env"].items()) or "glibc defaults"
    faults: dict[str, float] = {}
    for name, s in stats:
        faults[name] = max(faults.get(name, 0.0), s["minor_faults_per_step_median"])
    return (f"- each method in its own worker process (own model from the same seed, same batches, own allocator), "
            f"driven step by step by the parent; malloc {p['malloc']!r} ({env}); minor page faults per timed step, "
            f"largest median over the configs: " + ", ".join(f"{n} {f:.0f}" for n, f in faults.items()))


def print_section(name: str, sec: dict[str, Any]) -> None:
    p = sec["config"]
    if name == "time":
        print("### Step time: AdamW vs GrassAdamW\n")
        shapes = "; ".join(f"{s}: {_shape(w, p['layers'], p['vocab'])}" for s, w in p["sizes"].items())
        print(f"- models: {shapes}")
        print(f"- batch {p['batch']} x seq {p['seq']}; methods adamw, grass-all (active_layers={p['layers']}), "
              f"grass (active_layers={p['active_layers']}), lisa (sampler='uniform', active_layers="
              f"{p['active_layers']}); switch_every={p['switch_every']}")
        print(f"- {p['warmup']} warm-up steps per method, then {p['repeats']} repeats x {p['steps_per_slot']} "
              f"steps per method, round-robin, order rotated per repeat; step = forward + loss + backward + "
              f"step() + zero_grad")
        print(_workers_line(sec, [m for r in sec["rows"] for m in r["methods"].items()]))
        print("- ms/step: median over the timed steps; vs AdamW: median over repeats of the paired ratio; "
              "fwd / bwd / step: medians of the phases\n")
        print(table_time(sec))
    elif name == "memory":
        print("### Peak resident memory of training (one fresh process per method and malloc setting)\n")
        print(f"- model: {_shape(p['width'], p['layers'], p['vocab'])}; batch {p['batch']} x seq {p['seq']}; "
              f"active_layers={p['active_layers']}, switch_every={p['switch_every']}; GrassAdamW methods train "
              f"until every block was trained, then {p['extra_steps']} more steps; AdamW {p['adamw_steps']} steps; "
              f"{p['jobs']} subprocesses at a time (RSS is per process)")
        runs = [run for r in sec["rows"] for run in r["runs"].values()]
        if runs:
            grew = [run["weights_rss_bytes"] / MIB for run in runs]
            print(f"- weights: estimate {runs[0]['estimate']['weights'] / MIB:.1f} MiB; RSS grew "
                  f"{min(grew):.1f}–{max(grew):.1f} MiB while building the model (that is in the baseline)")
        print("- train peak = ru_maxrss − RSS after building the model (error: vs est. RAM g+s); est. device g+s = "
              "estimate_memory's gradients + optimizer state, the part it predicts for the device; host buffers = "
              "offloaded state, RAM too on CPU; est. RAM g+s = the two together")
        env = {m: " ".join(f"{k}={v}" for k, v in MALLOC_MODES[m].items()) or "no MALLOC_ variable"
               for m in p["malloc"]}
        modes = [f"{MALLOC_LABEL[m]} ({env[m]})" for m in p["malloc"]]
        print("- glibc malloc of the subprocesses: " + "; ".join(modes))
        print("- last column: RSS growth from before building the model (weights included) vs est. w+g+s in RAM\n")
        print(table_memory(sec))
    elif name == "refresh":
        m = p["memory"]
        print("### The cost of a refresh_all step (every block measured, the active ones updated)\n")
        print(f"- time: the sizes of the time section, {p['layers']} blocks, γ={p['active_layers']}, no redraws; "
              "each kind of step made every step (refresh_all with update_every=1; probing with probe_steps "
              "larger than the run), interleaved with ordinary GRASS steps in worker processes; ratio = paired "
              "median over repeats")
        print(f"- memory: {_shape(m['width'], p['layers'], m['vocab'])}, batch {m['batch']} x seq {m['seq']}, "
              f"{m['steps']} steps, one fresh process each, MALLOC_MMAP_THRESHOLD_=64 KiB (RSS follows the live "
              "tensors); train peak = ru_maxrss − RSS after building the model\n")
        print(table_refresh(sec))
    else:
        print("### Scaling: AdamW vs GrassAdamW(active_layers=γ)\n")
        print(f"- base: L={p['base']['layers']}, width {p['base']['width']}, γ={p['base']['active_layers']}; "
              f"intermediate = 2.75 x width, heads = width / 64, vocab {p['vocab']}; batch {p['batch']} x seq "
              f"{p['seq']}; switch_every={p['switch_every']}; {p['warmup']} warm-up + {p['repeats']} repeats x "
              f"{p['steps_per_slot']} steps, interleaved")
        print(_workers_line(sec, [m for r in sec["rows"] for m in r["methods"].items()]))
        print("- memory: estimate_memory's weights + gradients + optimizer state (no activations); GRASS = "
              "no offload once every block was visited; stream = device part under offload='stream'\n")
        print(table_scaling(sec))
    print(flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (< 60 s; used by the tests)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "speed.json"),
                   help="JSON output file (default: benchmarks/results/speed.json)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: see the docstring)")
    p.add_argument("--jobs", type=int, default=2, help="memory subprocesses run at a time (default 2)")
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds allowed to each memory subprocess")
    p.add_argument("--malloc", default=None,
                   help="glibc settings of the memory subprocesses, comma-separated subset of default,mmap "
                        "(default: both; --quick: default)")
    p.add_argument("--timing-malloc", choices=list(TIMING_MALLOC), default="steady",
                   help="glibc settings of the timing workers (default: steady, no page faults after warm-up)")
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if args.malloc is not None:
        args.malloc = [m.strip() for m in args.malloc.split(",") if m.strip()]
        if not args.malloc or any(m not in MALLOC_MODES for m in args.malloc):
            p.error(f"--malloc: choose from {list(MALLOC_MODES)}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    role = args.worker
    if role is not None:  # a harness.Worker process of this script
        handlers = {"memory": memory_child, "refresh-memory": refresh_memory_child}
        serve(_TimingRun(role.removeprefix("time:")) if role.startswith("time:") else handlers[role])
        return 0
    t_start = time.perf_counter()
    env = {**environment("cpu"), "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
           "loadavg_start": list(os.getloadavg())}
    which = 1 if args.quick else 0
    result: dict[str, Any] = {"environment": env, "quick": args.quick, "threads": args.threads,
                              "sections": {}, "complete": False}
    print_header(result, args)
    out = Path(args.out)
    failed = False
    pool = WorkerPool(args.threads, args.timing_malloc)
    try:
        for name in SECTIONS:
            if name not in args.sections:
                continue
            p = PRESETS[name][which]
            t0 = time.perf_counter()
            try:
                if name == "time":
                    sec = section_time(p, pool)
                elif name == "memory":
                    pool.release()  # idle workers keep no models in RAM meanwhile
                    sec = section_memory(p, args.threads, args.child_timeout, args.malloc or p["malloc"], args.jobs)
                    failed |= any(r["error"] for r in sec["rows"])
                elif name == "refresh":
                    sec = section_refresh(p, pool, args.threads, args.child_timeout)
                else:
                    sec = section_scaling(p, pool)
            except Exception as err:
                failed = True
                sec = {"config": p, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                log(sec["traceback"])
                print(f"### {name}: ERROR {sec['error']}\n", flush=True)
            else:
                print_section(name, sec)
            sec["wall_s"] = time.perf_counter() - t0
            result["sections"][name] = sec
            write_json(out, result)
    finally:
        pool.close()
    env["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t_start
    result["complete"] = True
    write_json(out, result)
    print(f"Wall time {result['wall_s']:.0f} s; load average at end "
          f"{'/'.join(f'{x:.2f}' for x in env['loadavg_end'])}. JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

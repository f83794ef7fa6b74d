"""Device memory and throughput of layer-wise training with and without optimizer-state offloading.

    python benchmarks/offload.py                           # GPU: ~1B-parameter Llama, 6 methods, ~2 min on an H200
    python benchmarks/offload.py --device cpu --quick      # tiny model, a few seconds (used by the tests)

Each method of ``--methods`` (names from ``harness.METHODS``) trains a fresh Llama-style decoder
(``llama.py``) for warm-up + timed steps in this process, one after the other; an error in one is
reported in its row and the next runs. Prints one Markdown table and writes JSON (``--out``).
Methods, columns, precision and the pinned-memory pre-warm are explained in docs/benchmarks.md
("Offloading: device memory and throughput").
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import (
    GIB,
    METHODS,
    environment,
    fmt_bytes,
    grass_optim,
    is_cuda,
    log,
    markdown_table,
    progress,
    state_bytes,
    synchronize,
    train_step,
    write_json,
)
from harness import make_optimizer as build_optimizer
from llama import LlamaConfig, build_model, count_params
from torch import Tensor

DEFAULT_METHODS = ["adamw", "lisa", "grass", "grass-inactive", "grass-stream", "grass-stream-blocking"]
REFERENCE = "grass"

# (GPU default, --quick default)
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "vocab": (32000, 256),
    "hidden": (2048, 64),
    "intermediate": (5632, 176),
    "layers": (16, 4),
    "heads": (16, 4),
    "seq": (1024, 32),
    "batch": (4, 2),
    "warmup": (5, 2),
    "steps": (40, 8),
    "switch_every": (5, 2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (a smoke run, seconds on CPU)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "offload.json"),
                   help="JSON output file (default: benchmarks/results/offload.json)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated, run in this order")
    for name, (gpu, quick) in DEFAULTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {gpu} ({quick} with --quick)")
    p.add_argument("--active-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=("bf16", "none"), default=None,
                   help="bf16 autocast over fp32 master weights (default on CUDA) or plain fp32 (default on CPU)")
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--no-prewarm-pinned", dest="prewarm_pinned", action="store_false",
                   help="do not pre-allocate the pinned host buffers before the offload methods")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, (gpu, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else gpu)
    if args.amp is None:
        args.amp = "bf16" if is_cuda(args.device) else "none"
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS or m in ("full", "grass-all", "grass-static")]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {DEFAULT_METHODS}")
    if is_cuda(args.device) and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device (use --device cpu --quick)")
    return args


# ----------------------------------------------------------------------------- pieces of a run
def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_layers=args.layers, num_heads=args.heads, max_seq_len=args.seq,
                       tie_embeddings=args.tie_embeddings)


def make_batches(args: argparse.Namespace, n: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(args.vocab, (n, args.batch, args.seq + 1), generator=g).to(args.device)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def make_optimizer(method: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return build_optimizer(method, model, lr=args.lr, weight_decay=args.weight_decay,
                                  active_layers=args.active_layers, switch_every=args.switch_every,
                                  probe_steps=0, seed=args.seed)


def device_state_bytes(opt: torch.optim.Optimizer) -> int:
    return state_bytes(opt)["device"]


def prewarm_pinned(model: torch.nn.Module) -> tuple[int, float]:
    """Allocate and free pinned buffers shaped like every block's AdamW state (2 per parameter).

    The caching host allocator keeps them, so the offload methods reuse them instead of pinning
    new memory inside the timed steps. Returns (bytes, seconds).
    """
    part = grass_optim.find_layers(model)
    t0 = time.perf_counter()
    bufs = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            for ps in part.block_params for p in ps for _ in range(2)]
    nbytes = sum(b.numel() * b.element_size() for b in bufs)
    del bufs
    return nbytes, time.perf_counter() - t0


class Reference:
    """Final parameters of the reference run (on the host) and the norm of its update."""

    def __init__(self) -> None:
        self.params: list[Tensor] | None = None
        self.update_norm: float | None = None
        self.active_sets: list[list[int]] | None = None

    def capture(self, model: torch.nn.Module, cfg: LlamaConfig, args: argparse.Namespace,
                active_sets: list[list[int]]) -> None:
        self.params = [p.detach().to("cpu", copy=True) for p in model.parameters()]
        init = build_model(cfg, args.device, args.seed)  # theta_0, rebuilt deterministically
        sq = sum(float((p.detach().double() - q.detach().double()).pow(2).sum())
                 for p, q in zip(model.parameters(), init.parameters(), strict=True))
        del init
        self.update_norm = math.sqrt(sq)
        self.active_sets = active_sets

    def deviation(self, model: torch.nn.Module) -> float | None:
        if self.params is None or not self.update_norm:
            return None
        sq = sum(float((p.detach().double() - q.to(p.device).double()).pow(2).sum())
                 for p, q in zip(model.parameters(), self.params, strict=True))
        return math.sqrt(sq) / self.update_norm


def run_method(method: str, cfg: LlamaConfig, args: argparse.Namespace, batches: list[tuple[Tensor, Tensor]],
               ref: Reference, row: dict[str, Any]) -> None:
    """Train one method and fill ``row``; exceptions propagate to the caller (which records them)."""
    dev = args.device
    cuda = is_cuda(dev)
    amp = (torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16)
           if args.amp == "bf16" else nullcontext())
    t_build = time.perf_counter()
    model = build_model(cfg, dev, args.seed)
    synchronize(dev)
    row["build_s"] = time.perf_counter() - t_build
    if cuda:
        row["allocated_after_build_bytes"] = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)  # both peaks: allocated (peak_bytes) and reserved
    opt = make_optimizer(method, model, args)
    grass = isinstance(opt, grass_optim.GrassAdamW)

    active_sets: list[list[int]] = []
    state_max = 0
    total = args.warmup + args.steps
    loss = None
    t0 = t_start = time.perf_counter()
    # The bar shows the active blocks (host data); the loss only at the end: reading it every step
    # would synchronise with the device and change what is timed.
    bar = progress(range(total), desc=f"[offload] {method}")
    for i in bar:
        if i == args.warmup:
            synchronize(dev)
            t0 = time.perf_counter()
            row["warmup_s"] = t0 - t_start
        if grass:
            current = list(opt.active_layer_indices)
            if not active_sets or active_sets[-1] != current:
                active_sets.append(current)
                bar.set_postfix(blocks=",".join(map(str, current)), refresh=False)
        x, y = batches[i % len(batches)]

        def loss_of(x: Tensor = x, y: Tensor = y) -> Tensor:
            with amp:
                logits = model(x)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        loss, _ = train_step(loss_of, opt)
        state_max = max(state_max, device_state_bytes(opt))  # reads sizes only: no synchronisation
    synchronize(dev)
    elapsed = time.perf_counter() - t0
    bar.set_postfix(loss=f"{float(loss.detach()):.3f}" if loss is not None else "-")
    bar.close()
    if args.warmup == 0:
        row["warmup_s"] = 0.0

    row["peak_bytes"] = torch.cuda.max_memory_allocated(dev) if cuda else None
    # What the caching allocator held at its peak (allocated + cached blocks, fragmentation): closer to
    # what nvidia-smi shows and to when an OOM happens than the allocated peak.
    row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev) if cuda else None
    row["device_state_bytes"] = device_state_bytes(opt)
    row["device_state_bytes_max"] = state_max
    row["timed_s"] = elapsed
    row["step_ms"] = 1000 * elapsed / args.steps
    row["tokens_per_s"] = args.steps * args.batch * args.seq / elapsed
    row["final_loss"] = float(loss.detach()) if loss is not None else None
    if grass:
        rep = opt.memory_report()
        row["memory_report"] = rep.as_dict()
        row["active_sets"] = active_sets
        row["blocks_trained"] = len({b for s in active_sets for b in s})
        row["redraws"] = len(active_sets) - 1
        row["same_draws_as_grass"] = None if ref.active_sets is None else active_sets == ref.active_sets
    else:
        row["blocks_trained"] = cfg.num_layers
    if method == REFERENCE:
        ref.capture(model, cfg, args, active_sets)
        row["deviation_vs_grass"] = 0.0
    elif grass:
        row["deviation_vs_grass"] = ref.deviation(model)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    ref_tps = next((r["tokens_per_s"] for r in rows if r["method"] == REFERENCE), None)
    for r in rows:
        r["ratio_vs_grass"] = r["tokens_per_s"] / ref_tps if r["tokens_per_s"] and ref_tps else None


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method; the JSON file is rewritten after each one (``complete`` false until the end),
    so a run cut short by a timeout still leaves the rows it finished."""
    out = Path(args.out)
    cfg = model_config(args)
    with torch.device("meta"):
        meta = build_model(cfg, "meta", args.seed)
    est = grass_optim.estimate_memory(meta, active_layers=args.active_layers)
    part = grass_optim.find_layers(meta)
    blocks = part.names[0].rsplit(".", 1)[0] + f"[{part.num_layers}]"  # "layers[16]"
    info: dict[str, Any] = {
        "environment": environment(args.device),
        "model": {**cfg.as_dict(), "params": count_params(meta), "block_params": list(est.block_numel),
                  "outside_params": est.outside_numel, "blocks": blocks},
        "run": {"batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
                "warmup_steps": args.warmup, "timed_steps": args.steps, "active_layers": args.active_layers,
                "switch_every": args.switch_every, "probe_steps": 0, "lr": args.lr,
                "weight_decay": args.weight_decay, "seed": args.seed,
                "precision": ("fp32 master weights/grads/optimizer state, bf16 autocast" if args.amp == "bf16"
                              else "fp32"),
                "methods": args.methods},
        "estimate": {"rows": est.rows, "outside_dominates": est.outside_dominates},
        "prewarm_pinned": None,
    }
    if args.prewarm_pinned and is_cuda(args.device) and any(
            (METHODS[m].grass or {}).get("offload") for m in args.methods):
        try:
            nbytes, secs = prewarm_pinned(meta)
            info["prewarm_pinned"] = {"bytes": nbytes, "seconds": secs}
        except Exception as err:  # not worth losing the run over
            info["prewarm_pinned"] = {"error": f"{type(err).__name__}: {err}"}
    del meta
    print_header(info)

    batches = make_batches(args)
    ref = Reference()
    rows = []
    for method in args.methods:
        row: dict[str, Any] = {"method": method, "peak_bytes": None, "peak_reserved_bytes": None,
                               "device_state_bytes": None, "device_state_bytes_max": None, "tokens_per_s": None,
                               "estimate": est.rows[METHODS[method].estimate], "error": None}
        if is_cuda(args.device):
            row["allocated_before_bytes"] = torch.cuda.memory_allocated(args.device)
        log(f"[{method}] running ...")
        t = time.perf_counter()
        try:
            run_method(method, cfg, args, batches, ref, row)
        except Exception as err:  # an OOM or a bug in one method must not hide the others
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc()
            log(row["traceback"])
        gc.collect()
        if is_cuda(args.device):
            torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - t
        tps = row["tokens_per_s"]
        log(f"[{method}] done in {row['wall_s']:.1f} s" + (f": {tps:,.0f} tokens/s" if tps else "")
            + (f" -- {row['error'].splitlines()[0]}" if row["error"] else ""))
        rows.append(row)
        add_ratios(rows)
        write_json(out, {**info, "complete": False, "rows": rows})
    return {**info, "complete": True, "rows": rows}


# ----------------------------------------------------------------------------- output
def print_header(info: dict[str, Any]) -> None:
    env, m, run = info["environment"], info["model"], info["run"]
    name = env["device_name"] or "CPU"
    print("## GRASS optimizer-state offloading benchmark\n")
    print(f"- date: {env['date']}")
    print(f"- device: {env['device']} ({name}); torch {env['torch']} (CUDA {env['cuda']}); python {env['python']}; "
          f"grass_optim {env['grass_optim']} (git {env['git']})")
    print(f"- model: Llama-style decoder, {m['params'] / 1e6:,.1f} M params: vocab {m['vocab_size']}, hidden "
          f"{m['hidden_size']}, intermediate {m['intermediate_size']}, {m['num_layers']} layers x "
          f"{m['num_heads']} heads, {'tied' if m['tie_embeddings'] else 'untied'} embeddings; blocks "
          f"{m['blocks']} of {m['block_params'][0] / 1e6:,.2f} M params, {m['outside_params'] / 1e6:,.2f} M outside")
    print(f"- precision: {run['precision']}")
    print(f"- run: batch {run['batch']} x seq {run['seq']} = {run['tokens_per_step']} tokens/step; "
          f"{run['warmup_steps']} warm-up + {run['timed_steps']} timed steps; AdamW lr {run['lr']}, "
          f"weight decay {run['weight_decay']}; GrassAdamW active_layers={run['active_layers']}, "
          f"switch_every={run['switch_every']}, probe_steps=0 (no probing in the timed runs), seed {run['seed']}")
    pre = info["prewarm_pinned"]
    if pre is not None:
        print("- pinned host buffers for every block's state pre-allocated (then freed into the caching host "
              "allocator) before the runs: " + (f"{pre['bytes'] / GIB:.2f} GiB in {pre['seconds']:.1f} s"
                                                 if "bytes" in pre else f"failed: {pre['error']}"))
    if info["estimate"]["outside_dominates"]:
        print("- note: the always-trained parameters outside the blocks (embeddings, head) outnumber those of "
              "the active blocks, so they dominate the layer-wise methods' gradients and state")
    print(flush=True)


def table(result: dict[str, Any], unit: str = "GiB") -> str:
    def b(nbytes: float | None, digits: int = 2) -> str:
        return fmt_bytes(nbytes, unit, digits)

    header = ["method", f"peak {unit}", f"peak reserved {unit}", f"state on device {unit} (end / max)",
              f"est. state {unit}", f"est. w+g+s {unit}", f"est. peak w+g+s+in flight {unit}",
              "tokens/s", "vs grass", "blocks (redraws)", "dθ vs grass",
              "notes"]
    out = []
    for r in result["rows"]:
        est = r["estimate"]
        if r["error"]:
            first = r["error"].splitlines()[0]
            out.append([r["method"], "—", "—", "—", b(est["optimizer_state"], 3), b(est["total"]), b(est["peak"]),
                        "—", "—", "—", "—", f"ERROR {first[:200]}"])
            continue
        redraws = f" ({r['redraws']})" if "redraws" in r else ""
        dev = r.get("deviation_vs_grass")
        notes = []
        if r.get("same_draws_as_grass") is False:
            notes.append("other draws than grass")
        out.append([
            r["method"],
            b(r["peak_bytes"]),
            b(r["peak_reserved_bytes"]),
            f"{b(r['device_state_bytes'], 3)} / {b(r['device_state_bytes_max'], 3)}",
            b(est["optimizer_state"], 3),
            b(est["total"]),
            b(est["peak"]),
            f"{r['tokens_per_s']:,.0f}",
            "n/a" if r["ratio_vs_grass"] is None else f"{r['ratio_vs_grass']:.3f}",
            f"{r['blocks_trained']}{redraws}",
            "n/a" if dev is None else f"{dev:.2e}",
            "; ".join(notes),
        ])
    return markdown_table(header, out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not is_cuda(args.device) and args.quick:
        # The tiny model gains nothing from threads, and a busy machine makes them spin: 100x slower.
        torch.set_num_threads(1)
    if not is_cuda(args.device) and not args.quick:
        log("warning: the full-size model on CPU is very slow; use --quick for a smoke run")
    result = run_all(args)
    print(table(result, "MiB" if args.quick else "GiB"), flush=True)
    write_json(Path(args.out), result)
    print(f"\nJSON: {args.out}")
    return 0 if all(r["error"] is None for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

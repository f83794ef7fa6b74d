"""Gradient and optimizer-state bytes per rank: AdamW and GrassAdamW under DDP and FSDP2, with offloading.

    python benchmarks/dist_memory.py            # 2 CPU processes (gloo), 24 steps per method, ~40 s
    python benchmarks/dist_memory.py --quick    # 6 steps per method

Two ranks (harness workers, gloo) train the Llama-style decoder of ``llama.py`` (8 blocks) with each
method, GrassAdamW training 2 blocks at a time (a redraw every 2 steps, no probing). Per rank and
per step it counts, after backward and before ``step()``, the gradient memory: for DDP the reducer's
buckets (one slot for every registered parameter, frozen or not) plus the ``.grad`` tensors, which
are separate storages unless ``gradient_as_bucket_view=True``; for FSDP2 the local gradient shards.
After ``step()`` it reads the optimizer state with ``memory_report``: this rank's shards on the
device (the most held between steps), parked on the host now, and the host buffers allocated so
far. Steps 2.. count (in a multi-process run GrassAdamW freezes from the end of step 1).
``estimate_memory`` predicts the same per rank (``world_size=2`` for FSDP2).
Results: docs/benchmarks.md; what each path saves: docs/guides/ddp.md and docs/guides/fsdp2.md.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Worker,
    environment,
    grad_storages,
    grass_optim,
    map_unordered,
    markdown_table,
    serve,
    state_bytes,
    token_batches,
    write_json,
)
from llama import LlamaConfig, build_model  # noqa: E402

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=8, num_heads=4,
                     max_seq_len=32)
SEQ = 32
BATCH_PER_RANK = 4
SEED = 0
ACTIVE = 2
KB = 1024
METHODS = ("adamw+ddp", "grass+ddp", "grass+ddp+bucket_view", "grass+ddp+inactive", "adamw+fsdp2", "grass+fsdp2",
           "grass+fsdp2+inactive", "grass+fsdp2+stream")
ESTIMATE_ROW = {"adamw": "adamw", "grass": "grass", "inactive": "grass-inactive", "stream": "grass-stream"}


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def run_method(method: str, rank: int, world: int, steps: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = build_model(CONFIG, "cpu", SEED)
    grass, fsdp = method.startswith("grass"), "fsdp2" in method
    offload = next((m for m in ("inactive", "stream") if method.endswith(m)), None)
    ddp: DistributedDataParallel | None = None
    if fsdp:
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        wrapped: torch.nn.Module = model
    else:
        ddp = DistributedDataParallel(model, find_unused_parameters=grass,
                                      gradient_as_bucket_view=method.endswith("bucket_view"))
        wrapped = ddp
    if grass:
        opt: torch.optim.Optimizer = grass_optim.GrassAdamW(
            wrapped, lr=1e-3, active_layers=ACTIVE, switch_every=2, probe_steps=0, seed=SEED, offload=offload)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads, device, host, visited = [], [], [], set()
    for tokens in token_batches(CONFIG.vocab_size, BATCH_PER_RANK * world, SEQ, steps):
        tokens = tokens.chunk(world)[rank]
        opt.zero_grad()
        logits = wrapped(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
        grads.append(grad_storages(model))
        opt.step()
        sb = state_bytes(opt)
        device.append(sb["device"])
        host.append(sb["host"])
        if grass:
            visited |= set(opt.active_layer_indices)  # type: ignore[attr-defined]
    later = range(1, steps)
    grad_tensors = max(sum(grads[i].values()) for i in later)
    buckets = 0
    views = False
    if ddp is not None:  # the reducer's buckets as they are now (after DDP's rebuild): their sizes
        buckets = sum(b.buffer().numel() * b.buffer().element_size()
                      for b in ddp.reducer._get_zeros_like_grad_buckets())
        views = method.endswith("bucket_view")
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    params = torch.cat([t.detach().flatten() for t in full])
    return {
        "method": method,
        "weight_bytes": sum(local_bytes(p) for p in model.parameters()),
        "bucket_bytes": buckets,
        "grad_tensor_bytes": grad_tensors,
        # Gradient memory held after backward: the buckets, plus the .grad tensors unless they are views of them.
        "grad_memory_bytes": buckets + (0 if views else grad_tensors),
        "state_device_bytes": max(device[i] for i in later),  # the most held between steps
        "state_host_bytes": host[-1],  # parked now
        # host buffers allocated for parking: every block parked at least once (what estimate_memory predicts)
        "host_buffer_bytes": opt.memory_report().host_buffer_bytes if grass else 0,  # type: ignore[attr-defined]
        "blocks_visited": len(visited),
        "params": params,
    }


def estimates(rank: int, world: int) -> dict[str, dict[str, dict[str, int]]]:
    """``estimate_memory``'s rows for this rank: ``"fsdp2"`` sharded over ``world``, ``"ddp"`` unsharded."""
    with torch.device("meta"):
        model = build_model(CONFIG, "meta", SEED)
    return {"fsdp2": grass_optim.estimate_memory(model, active_layers=ACTIVE, world_size=world, rank=rank).rows,
            "ddp": grass_optim.estimate_memory(model, active_layers=ACTIVE).rows}


def measure(rank: int, world: int, *, steps: int = 24, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run every method on this rank (every rank must call it); one row per method."""
    rows = [run_method(m, rank, world, steps) for m in methods]
    params = {r["method"]: r.pop("params") for r in rows}
    est = estimates(rank, world)
    for r in rows:
        kind = "fsdp2" if "fsdp2" in r["method"] else "ddp"
        parts = r["method"].split("+")
        row = est[kind][ESTIMATE_ROW[parts[2] if parts[-1] in ("inactive", "stream") else parts[0]]]
        r["estimate_state_bytes"] = row["optimizer_state"]
        r["estimate_host_bytes"] = row["host_state"]
        # estimate_memory models FSDP2's gradient shards; DDP's buckets it does not (they hold every gradient).
        r["estimate_grad_bytes"] = row["gradients"] if kind == "fsdp2" else None
        ref = "grass+" + kind
        if r["method"].startswith("grass") and ref in params:
            r["same_params_as_" + ref] = torch.equal(params[r["method"]], params[ref])
    total = sum(p.numel() * p.element_size() for p in build_model(CONFIG, "meta", SEED).parameters())
    return {"rank": rank, "world_size": world, "steps": steps, "active_layers": ACTIVE,
            "num_layers": CONFIG.num_layers, "model_bytes": total, "rows": rows}


def _rank(msg: dict[str, Any]) -> dict[str, Any]:
    """One rank, in a harness.Worker process of this script: join the group, measure, leave."""
    torch.set_num_threads(1)
    rank, world = msg["rank"], msg["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{msg['port']}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        return measure(rank, world, steps=msg["steps"])
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, steps: int) -> list[dict[str, Any]]:
    """:func:`measure` on ``world`` ranks; their results in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [Worker(__file__, "rank") for _ in range(world)]
    try:
        messages = [{"rank": r, "world": world, "port": port, "steps": steps} for r in range(world)]
        results = list(map_unordered(workers, messages, timeout=600))
    finally:
        for w in workers:
            w.close()
    return sorted(results, key=lambda r: r["rank"])


def table(ranks: list[dict[str, Any]]) -> str:
    """Rank 0's row per method (KiB), with whether every rank measured the same."""
    def kib(x: int | None) -> str:
        return "n/a" if x is None else f"{x / KB:.1f}"

    keys = ("weight_bytes", "bucket_bytes", "grad_memory_bytes", "state_device_bytes", "state_host_bytes",
            "host_buffer_bytes")
    header = ["method", "weights", "DDP buckets", "gradient memory", "(estimate)", "state on device",
              "(estimate)", "state parked", "host buffers", "(estimate)", "blocks visited", "ranks equal",
              "same params as grass (same wrapper)"]
    out = []
    for i, r in enumerate(ranks[0]["rows"]):
        equal = all(all(other["rows"][i][k] == r[k] for k in keys) for other in ranks[1:])
        same = next((str(v) for k, v in r.items() if k.startswith("same_params_as_")), "n/a")
        out.append([r["method"], kib(r["weight_bytes"]), kib(r["bucket_bytes"]), kib(r["grad_memory_bytes"]),
                    kib(r["estimate_grad_bytes"]), kib(r["state_device_bytes"]), kib(r["estimate_state_bytes"]),
                    kib(r["state_host_bytes"]), kib(r["host_buffer_bytes"]), kib(r["estimate_host_bytes"]),
                    str(r["blocks_visited"]) if r["method"].startswith("grass") else "all", str(equal), same])
    return markdown_table(header, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 steps per method instead of 24")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dist_memory.json"))
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # a harness.Worker process of this script
        serve(_rank)
        return
    steps = args.steps or (6 if args.quick else 24)
    env = environment("cpu")  # the commit as the run starts
    ranks = run_ranks(2, steps)
    r0 = ranks[0]
    result = {"command": "python benchmarks/dist_memory.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
              "environment": env, "config": CONFIG.as_dict(), "ranks": ranks}
    print(f"model {r0['model_bytes'] / KB:.1f} KiB fp32, {r0['num_layers']} blocks, active_layers={ACTIVE}, "
          f"2 ranks (gloo, CPU), {steps} steps per method; KiB per rank (rank 0)")
    print(table(ranks))
    write_json(args.out, result)
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()

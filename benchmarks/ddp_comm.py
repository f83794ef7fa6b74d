"""What DDP communicates, and what gradient memory it holds, when GrassAdamW freezes most blocks.

    python benchmarks/ddp_comm.py            # 2 CPU processes (gloo), 30 steps per method, ~15 s
    python benchmarks/ddp_comm.py --quick    # 8 steps per method

Two ranks (harness workers, gloo) train the tiny Llama-style decoder of ``llama.py`` under
DistributedDataParallel with each method (AdamW, GrassAdamW with find_unused_parameters=True, with
DDP's skip_all_reduce_unused_params, with a skip-frozen-buckets hook, with gradient_as_bucket_view),
counting per step the bucket bytes all-reduced and skipped, and the gradient memory held. Methods
and columns: docs/guides/ddp.md ("What DDP communicates") and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Worker,
    grad_storages,
    grass_optim,
    map_unordered,
    markdown_table,
    serve,
    token_batches,
    write_json,
)
from llama import LlamaConfig, build_model  # noqa: E402

CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=4, num_heads=4,
                     max_seq_len=32)
SEQ = 32
BATCH_PER_RANK = 4
SEED = 0
MB = 1e6
METHODS = ("adamw", "adamw+bucket_view", "grass", "grass+skip_unused", "grass+skip_hook", "grass+skip_hook@25MB",
           "grass+bucket_view")


# ----------------------------------------------------------------------------- the hooks
class CommState:
    """Per-step byte counts of the buckets DDP hands to the hook."""

    def __init__(self, skip_frozen: bool) -> None:
        self.skip_frozen = skip_frozen
        self.reduced: list[int] = []
        self.skipped: list[int] = []
        self.calls: list[int] = []
        self.buffer_ptrs: set[int] = set()  # storages of the buckets handed over this step

    def new_step(self) -> None:
        self.reduced.append(0)
        self.skipped.append(0)
        self.calls.append(0)
        self.buffer_ptrs = set()


def counting_hook(state: CommState, bucket):  # DDP checks the annotations: none, or the real classes
    """``allreduce_hook`` (DDP's default behaviour), counting bytes; with ``state.skip_frozen``, a
    bucket whose parameters all have requires_grad=False is returned as it is, not all-reduced.

    Safe only when every rank freezes the same parameters at every step (GrassAdamW checks that the
    ranks draw the same blocks): a bucket skipped on one rank and all-reduced on another would pair
    collectives wrongly. DDP writes back only the gradients of parameters used on some rank, so the
    un-reduced buffer of a frozen bucket never reaches a ``.grad``.
    """
    buf = bucket.buffer()
    nbytes = buf.numel() * buf.element_size()
    state.calls[-1] += 1
    state.buffer_ptrs.add(buf.untyped_storage().data_ptr())
    if state.skip_frozen and not any(p.requires_grad for p in bucket.parameters()):
        state.skipped[-1] += nbytes
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(buf)
        return fut
    state.reduced[-1] += nbytes
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- one method
def run_method(method: str, rank: int, world: int, steps: int, bucket_cap_mb: float) -> dict[str, Any]:
    model = build_model(CONFIG, "cpu", SEED)
    grass = method.startswith("grass")
    ddp_kwargs: dict[str, Any] = {"bucket_cap_mb": 25.0 if method.endswith("@25MB") else bucket_cap_mb}
    if grass:
        ddp_kwargs["find_unused_parameters"] = True
    if method == "grass+skip_unused":
        ddp_kwargs["skip_all_reduce_unused_params"] = True
    if method.endswith("+bucket_view"):
        ddp_kwargs["gradient_as_bucket_view"] = True
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    state = CommState(skip_frozen="skip_hook" in method)
    ddp.register_comm_hook(state, counting_hook)
    if grass:
        opt: torch.optim.Optimizer = grass_optim.GrassAdamW(ddp, lr=1e-3, active_layers=1, switch_every=4,
                                                            probe_steps=0, seed=SEED)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    active, losses = [], []
    grads: dict[int, int] = {}
    t0 = time.perf_counter()
    for tokens in token_batches(CONFIG.vocab_size, BATCH_PER_RANK * world, SEQ, steps):
        tokens = tokens.chunk(world)[rank]
        state.new_step()
        opt.zero_grad()
        logits = ddp(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        grads = grad_storages(model)
        in_buckets = set(grads) <= state.buffer_ptrs
        opt.step()
        losses.append(loss.item())
        if grass:
            active.append(opt.active_layer_indices)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - t0
    # The reducer's buckets as they are now (after DDP's rebuild, if any): zero tensors of their sizes.
    buckets = [b.buffer().numel() * b.buffer().element_size() for b in ddp.reducer._get_zeros_like_grad_buckets()]
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    later = range(1, steps)
    return {
        "method": method,
        "bucket_cap_mb": ddp_kwargs["bucket_cap_mb"],
        "buckets": len(buckets),
        "bucket_bytes": sum(buckets),
        "registered_tensors": ddp._get_ddp_logging_data().get("num_parameter_tensors"),
        "step1_reduced_bytes": state.reduced[0],
        "reduced_bytes_per_step": sum(state.reduced[i] for i in later) / len(later),
        "skipped_bytes_per_step": sum(state.skipped[i] for i in later) / len(later),
        "hook_calls_per_step": sum(state.calls[i] for i in later) / len(later),
        "grad_storage_bytes": sum(grads.values()),
        "grads_are_bucket_views": in_buckets,
        # Gradient memory held after backward: the buckets, plus the .grad tensors unless they are views of them.
        "grad_memory_bytes": sum(buckets) + (0 if in_buckets else sum(grads.values())),
        "ms_per_step": 1e3 * elapsed / steps,
        "same_on_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
        "final_loss": losses[-1],
        "active": active,
        "params": params,
    }


# ----------------------------------------------------------------------------- all methods
def block_bytes() -> int:
    with torch.device("meta"):
        model = build_model(CONFIG, "meta", SEED)
    return sum(p.numel() * p.element_size() for p in model.layers[0].parameters())


def measure(rank: int, world: int, *, steps: int = 30, bucket_cap_mb: float | None = None,
            methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run every method on this rank (every rank must call it); the rows, compared with the grass row."""
    cap = bucket_cap_mb if bucket_cap_mb is not None else round(block_bytes() / 4 / 2**20, 4)
    rows = [run_method(m, rank, world, steps, cap) for m in methods]
    params = {r["method"]: r.pop("params") for r in rows}
    ref = next((r for r in rows if r["method"] == "grass"), None)
    adamw = next((r for r in rows if r["method"] == "adamw"), None)
    for r in rows:
        if ref is not None and r["method"].startswith("grass"):
            r["same_params_as_grass"] = torch.equal(params[r["method"]], params["grass"])
            r["same_draws_as_grass"] = r["active"] == ref["active"]
        if adamw is not None:
            r["reduced_vs_adamw"] = r["reduced_bytes_per_step"] / adamw["reduced_bytes_per_step"]
    with torch.device("meta"):
        total = sum(p.numel() * p.element_size() for p in build_model(CONFIG, "meta", SEED).parameters())
    return {"rank": rank, "world_size": world, "steps": steps, "bucket_cap_mb": cap, "model_bytes": total,
            "block_bytes": block_bytes(), "rows": rows}


def _rank(msg: dict[str, Any]) -> dict[str, Any]:
    """One rank, in a harness.Worker process of this script: join the group, measure, leave."""
    torch.set_num_threads(1)
    rank, world = msg["rank"], msg["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{msg['port']}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        return measure(rank, world, steps=msg["steps"], bucket_cap_mb=msg["cap"])
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, steps: int, cap: float | None) -> dict[str, Any]:
    """:func:`measure` on ``world`` ranks; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [Worker(__file__, "rank") for _ in range(world)]
    try:
        messages = [{"rank": r, "world": world, "port": port, "steps": steps, "cap": cap} for r in range(world)]
        results = list(map_unordered(workers, messages, timeout=600))
    finally:
        for w in workers:
            w.close()
    return next(r for r in results if r["rank"] == 0)


def table(result: dict[str, Any]) -> str:
    header = ["method", "bucket_cap_mb", "buckets", "bucket MB", "MB reduced/step", "vs adamw", "MB skipped/step",
              "step 1 MB", "grad MB", "total grad MB", "ms/step", "same params (ranks / grass)", "same draws"]
    rows = []
    for r in result["rows"]:
        rows.append([
            r["method"], f"{r['bucket_cap_mb']:g}", str(r["buckets"]), f"{r['bucket_bytes'] / MB:.3f}",
            f"{r['reduced_bytes_per_step'] / MB:.3f}", f"{r.get('reduced_vs_adamw', float('nan')):.2f}",
            f"{r['skipped_bytes_per_step'] / MB:.3f}", f"{r['step1_reduced_bytes'] / MB:.3f}",
            f"{r['grad_storage_bytes'] / MB:.3f}", f"{r['grad_memory_bytes'] / MB:.3f}", f"{r['ms_per_step']:.1f}",
            f"{r['same_on_ranks']} / {r.get('same_params_as_grass', 'n/a')}", str(r.get("same_draws_as_grass", "n/a")),
        ])
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 steps per method instead of 30")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--bucket-cap-mb", type=float, default=None,
                   help="DDP bucket size for all methods but @25MB (default: a quarter of a block)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ddp_comm.json"))
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # a harness.Worker process of this script
        serve(_rank)
        return
    steps = args.steps or (8 if args.quick else 30)
    result = run_ranks(2, steps, args.bucket_cap_mb)
    result["command"] = "python benchmarks/ddp_comm.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    result["torch"] = torch.__version__
    print(f"model {result['model_bytes'] / MB:.3f} MB fp32, block {result['block_bytes'] / MB:.3f} MB, "
          f"2 ranks (gloo), {steps} steps per method, bucket cap {result['bucket_cap_mb']} MB")
    print(table(result))
    for r in result["rows"]:
        r.pop("active", None)
    write_json(args.out, result)
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()

"""What DDP communicates, and what gradient memory it holds, when GrassAdamW freezes most blocks.

    python benchmarks/ddp_comm.py            # 2 CPU processes (gloo), 30 steps per method, ~15 s
    python benchmarks/ddp_comm.py --quick    # 8 steps per method

Spawns 2 ranks (gloo on CPU; the byte counts do not depend on the backend) and trains the tiny
Llama-style decoder of ``benchmarks/common.py`` (4 blocks of 50,304 parameters, 266,816 in all,
fp32) under DistributedDataParallel with each method below, one after the other in the same
process group. Every method gets a fresh model from the same seed and the same token batches
(rank r takes rows [4r, 4r + 4) of each global batch of 8). Every DDP gets a communication hook
that records, per bucket and per step, the bytes of the bucket it was handed, whether it was
all-reduced or skipped; the all-reduce itself is ``default_hooks.allreduce_hook`` (what DDP does
without a hook).

Methods (GrassAdamW: ``active_layers=1`` of 4 blocks, ``switch_every=4``, ``probe_steps=0``, so
after the first step 1 block + the outside parameters train and 3 blocks are frozen):
  adamw            torch.optim.AdamW, DistributedDataParallel(model), find_unused_parameters=False:
                   the baseline
  grass            GrassAdamW, DistributedDataParallel(model, find_unused_parameters=True)
  grass+skip_unused
                   as grass, with DDP's own ``skip_all_reduce_unused_params=True``
  grass+skip_hook  as grass, with the prototype hook below: a bucket whose parameters all have
                   requires_grad=False is not all-reduced (the hook returns a completed future
                   holding the bucket's own buffer)
  grass+skip_hook@25MB
                   as grass+skip_hook with DDP's default bucket size (25 MB)
  adamw+bucket_view, grass+bucket_view
                   as adamw / grass, with gradient_as_bucket_view=True (for the memory columns)

All methods but the @25MB one use ``--bucket-cap-mb`` (default: a quarter of a block, 0.048; DDP's
unit is MiB), so that a block spans several buckets as in a real LLM, whose blocks are hundreds of
MB against DDP's 25 MB buckets. With the default 25 MB, this tiny model fits in one bucket and
nothing can be skipped.

Columns:
  buckets, bucket MB   number of DDP reducer buckets and the sum of their sizes, after the run
                       (``ddp.reducer._get_zeros_like_grad_buckets()``: zero tensors shaped like the
                       buckets' flat gradient buffers). The reducer allocates these buffers for every
                       parameter registered when DDP was built and keeps them for its lifetime
  MB reduced/step      bucket bytes all-reduced per step, mean over steps 2.. (step 1 is special:
                       GrassAdamW freezes nothing before the end of the first step in a
                       multi-process run, so every bucket carries gradients); "vs adamw" the ratio
  MB skipped/step      bucket bytes the hook was handed but did not all-reduce
  step 1 MB            bytes all-reduced in the first step
  grad MB              distinct storage bytes behind the parameters' ``.grad`` after the last
                       backward: only the trained parameters' gradients, or, with
                       gradient_as_bucket_view=True, the buckets those gradients are views of
  total grad MB        bucket MB + grad MB, or bucket MB alone when every ``.grad`` is a view of a
                       bucket (checked: its storage is one of the bucket buffers handed to the hook)
  ms/step              wall time per step on CPU (indicative only)
  same params          final parameters bit-identical on both ranks / bit-identical to the grass row
  same draws           the active sets of every step equal the grass row's

Not counted: with find_unused_parameters=True DDP also all-reduces a map of which parameters were
used (one int32 per registered parameter tensor, 39 here) every step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LlamaConfig, build_model, import_grass_optim, markdown_table  # noqa: E402

grass_optim = import_grass_optim()

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
def token_batches(steps: int, world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, CONFIG.vocab_size, (BATCH_PER_RANK * world, SEQ + 1), generator=g) for _ in range(steps)]


def grad_storages(model: torch.nn.Module) -> dict[int, int]:
    """Distinct storages behind the parameters' ``.grad``: data pointer -> bytes."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.grad is not None:
            s = p.grad.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return seen


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
    for tokens in token_batches(steps, world):
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
    return {"world_size": world, "steps": steps, "bucket_cap_mb": cap, "model_bytes": total,
            "block_bytes": block_bytes(), "rows": rows}


def _worker(rank: int, world: int, port: int, steps: int, cap: float | None, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = measure(rank, world, steps=steps, bucket_cap_mb=cap)
        if rank == 0:
            Path(out).write_text(json.dumps(result, default=str))
    finally:
        dist.destroy_process_group()


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
    args = p.parse_args(argv)
    steps = args.steps or (8 if args.quick else 30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(2, port, steps, args.bucket_cap_mb, path), nprocs=2)
        result = json.loads(Path(path).read_text())
    result["command"] = "python benchmarks/ddp_comm.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    result["torch"] = torch.__version__
    print(f"model {result['model_bytes'] / MB:.3f} MB fp32, block {result['block_bytes'] / MB:.3f} MB, "
          f"2 ranks (gloo), {steps} steps per method, bucket cap {result['bucket_cap_mb']} MB")
    print(table(result))
    for r in result["rows"]:
        r.pop("active", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""GrassAdamW with FSDP2 (``fully_shard``): sharded training a few blocks at a time, with a checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2.py                   # ~1 minute on 2 CPU cores (gloo)
    torchrun --nproc_per_node=2 examples/fsdp2.py --quick --check-resume   # ~20 s (tests/test_distributed.py)
    torchrun --nproc_per_node=2 examples/fsdp2.py --offload inactive      # inactive blocks' shards on the host

On GPUs (one per process) it uses NCCL; otherwise gloo on the CPU. The model and the task are those
of ``examples/ddp.py``: a small GPT-style decoder whose blocks are ``model.layers``, learning
``t[i] = (t[i-1] + t[i-2]) mod V``.

The run is cut in two, as a preempted job would be: the first half trains and saves a checkpoint
with ``grass_optim.save_checkpoint`` (torch.distributed.checkpoint: each rank writes its shards of
the model and of the optimizer state; GrassAdamW's schedule, the same on every rank, is written
once); then a fresh model and optimizer are built, the checkpoint is loaded with
``load_checkpoint``, and the second half trains. ``--check-resume`` also trains an uninterrupted run
and checks that both end with bit-identical parameters.

What matters for GRASS under FSDP2 (docs/guides/fsdp2.md):
  * ``fully_shard`` every block, then the root, *before* building GrassAdamW: it then sees the
    sharded parameters. Each block's gradient norm is summed over the shards of all ranks, so the
    scores, and the draws, are the same on every rank and equal to an unsharded run's.
  * ``offload="inactive"`` (``--offload inactive``) parks each rank's shards of the inactive blocks'
    state on its host; results are bit-identical to no offloading (docs/offload.md).
  * Checkpoints: ``save_checkpoint``/``load_checkpoint``, not torch's ``get_optimizer_state_dict``
    on the optimizer (it drops the ``"grass"`` entry, and may call ``step()``: see the guide). They
    may be called anywhere in the loop, probing included, without changing the run.
"""

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

try:
    from grass_optim import GrassAdamW, load_checkpoint, save_checkpoint
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grass_optim import GrassAdamW, load_checkpoint, save_checkpoint

# ----------------------------------------------------------------------------- settings
VOCAB, SEQ = 32, 32
D_MODEL, HEADS, LAYERS = 64, 4, 4
BATCH_PER_RANK = 16
LR = 3e-3
ACTIVE_LAYERS = 2  # blocks trained at a time, out of 4
SWITCH_EVERY = 20  # steps between redraws (8 with --quick)
PROBE_STEPS = 5  # steps that only measure every block before the first draw
STEPS, QUICK_STEPS = 400, 60
SEED = 0


class TinyLM(nn.Module):
    """Token + position embeddings, ``LAYERS`` pre-norm causal transformer blocks, a head; returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``tokens`` (batch, SEQ + 1), from position 2 on (the first
        two tokens of a sequence are random)."""
        inputs, targets = tokens[:, :-1], tokens[:, 2:]
        s = inputs.shape[1]
        x = self.embed(inputs) + self.pos[:s]
        for layer in self.layers:
            x = layer(x, src_mask=self.mask[:s, :s], is_causal=True)
        logits = self.head(self.norm(x[:, 1:]))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def make_sequences(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(n, SEQ + 1, dtype=torch.long)
    t[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    for i in range(2, SEQ + 1):
        t[:, i] = (t[:, i - 1] + t[:, i - 2]) % VOCAB
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {STEPS}, {QUICK_STEPS} with --quick)")
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--ckpt-dir", default="runs/fsdp2_example", help="the checkpoint's directory (DCP)")
    p.add_argument("--check-resume", action="store_true",
                   help="also train without interruption and compare the final parameters")
    p.add_argument("--offload", choices=["none", "inactive", "stream"], default="none",
                   help="where the blocks' optimizer state lives (GrassAdamW's offload=)")
    args = p.parse_args()
    offload = None if args.offload == "none" else args.offload
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    switch_every = 8 if args.quick else SWITCH_EVERY
    log_every = 10 if args.quick else 50

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    def build() -> tuple[nn.Module, GrassAdamW]:
        torch.manual_seed(SEED)
        model = TinyLM().to(device)
        for layer in model.layers:
            fully_shard(layer)  # each block is one FSDP unit: its parameters become DTensor shards
        fully_shard(model)  # the root: embeddings, final norm, head
        opt = GrassAdamW(model, lr=LR, active_layers=ACTIVE_LAYERS, switch_every=switch_every,
                         probe_steps=PROBE_STEPS, offload=offload)  # seed=None: rank 0's seed, on all ranks
        return model, opt

    def batch(step: int) -> torch.Tensor:
        """This rank's share of the global batch of ``step`` (a function of the step: resuming needs
        no data-loader state; a real job would checkpoint its sampler too)."""
        tokens = make_sequences(BATCH_PER_RANK * world, seed=SEED * 100_003 + step)
        return tokens.chunk(world)[rank].to(device)

    def train(model: nn.Module, opt: GrassAdamW, start: int, stop: int, log: bool) -> None:
        for step in range(start, stop):
            opt.zero_grad()
            loss = model(batch(step))
            loss.backward()  # FSDP2 reduce-scatters (averages) the gradients of the active blocks
            opt.step()  # per-block norms: local shards, all-reduced; then update, refresh, redraw
            if log and ((step + 1) % log_every == 0 or step + 1 == stop):
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                if rank == 0:
                    print(f"step {step + 1:4d} | loss {mean_loss.item() / world:.4f} "
                          f"| active {opt.active_layer_indices}")

    half = steps // 2
    ckpt = Path(args.ckpt_dir)
    t0 = time.perf_counter()

    # --- first job: train, then save
    model, opt = build()
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())  # DTensors report the global size
        print(f"{world} ranks ({'nccl' if use_cuda else 'gloo'}), {n_params / 1e6:.2f}M parameters sharded "
              f"{world} ways, {opt.num_layers} blocks, {ACTIVE_LAYERS} trained at a time, {steps} steps")
    train(model, opt, 0, half, log=True)
    save_checkpoint(ckpt, model, opt, extra={"step": half})  # every rank: its shards + the GRASS schedule
    del model, opt

    # --- second job: a fresh model and optimizer, restored from the checkpoint
    model, opt = build()
    extra = {"step": 0}
    load_checkpoint(ckpt, model, opt, extra=extra)  # model, optimizer state (DTensor shards), schedule
    if rank == 0:
        print(f"resumed from {ckpt} at step {extra['step']}")
    train(model, opt, extra["step"], steps, log=True)
    elapsed = time.perf_counter() - t0

    with torch.no_grad():
        eval_loss = model(make_sequences(256, seed=SEED + 1).to(device)).item()  # a collective: every rank runs it
    model.reshard()  # a forward without backward leaves the root's parameters gathered: shard them again
    if rank == 0:
        print(f"held-out loss: {eval_loss:.4f} (uniform guess: {torch.log(torch.tensor(float(VOCAB))).item():.4f})")
        print("importance:   ", [round(v, 5) for v in opt.importance.tolist()])
        print("probabilities:", [round(v, 3) for v in opt.probabilities.tolist()])
        print(f"{elapsed:.1f} s, {1e3 * elapsed / steps:.1f} ms/step")
        r = opt.memory_report()  # this rank's shards
        print(f"optimizer state on rank 0: {r.device_state_bytes / 1024:.1f} KiB on the device, "
              f"{r.host_state_bytes / 1024:.1f} KiB parked on the host (offload={offload!r})")

    if args.check_resume:
        ref_model, ref_opt = build()
        train(ref_model, ref_opt, 0, steps, log=False)
        same = all(torch.equal(a.full_tensor(), b.full_tensor())  # full_tensor: a collective on every rank
                   for a, b in zip(model.parameters(), ref_model.parameters(), strict=True))
        if rank == 0:
            print(f"resumed run matches the uninterrupted one: {same}")
    # Tear down in order: the sharded modules before the process group they use, both ranks together
    # (gloo can abort a process whose peer hung up mid-teardown).
    del model, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

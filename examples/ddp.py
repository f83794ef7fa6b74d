"""GrassAdamW with DistributedDataParallel: data-parallel training, a few blocks at a time.

    torchrun --nproc_per_node=2 examples/ddp.py            # ~30 s on 2 CPU cores (gloo)
    torchrun --nproc_per_node=2 examples/ddp.py --quick    # ~13 s smoke run (tests/test_distributed.py)
    torchrun --nproc_per_node=2 examples/ddp.py --skip-unused-allreduce   # DDP skips frozen buckets

On GPUs (one per process) it uses NCCL; otherwise gloo on the CPU. Nothing is downloaded: the model
is a small GPT-style decoder built from ``nn.TransformerEncoderLayer`` blocks (``model.layers``,
which GrassAdamW finds by itself), and the task is synthetic: every sequence follows
``t[i] = (t[i-1] + t[i-2]) mod V`` from two random tokens, so predicting the next token needs
attention to the two previous positions (the blocks), not just the embeddings.

What matters for GRASS under DDP (docs/guides/ddp.md):
  * ``find_unused_parameters=True``: frozen blocks get no gradient, and DDP must not wait for them;
    GrassAdamW refuses a DDP without it.
  * Wrap while every parameter still requires grad. GrassAdamW freezes nothing before the end of the
    first ``step()`` in a multi-process run, so both orders work: ``GrassAdamW(ddp_model)`` (as here)
    or ``GrassAdamW(model)`` followed by ``DistributedDataParallel(model, ...)`` before the first step.
  * The same schedule on every rank: leave ``seed=None`` (rank 0's seed is broadcast) or pass the
    same seed everywhere. GrassAdamW checks at every redraw that the ranks drew the same blocks, and
    at every refresh that the trained blocks' gradient norms agree (they do when DDP averaged them).
  * Communication: DDP all-reduces the buckets of frozen blocks too (zeros). With
    ``--skip-unused-allreduce``, DDP's ``skip_all_reduce_unused_params=True`` (added in 2025,
    pytorch/pytorch#151503; older torch rejects the argument) skips the buckets whose parameters
    all went unused in the step: the same training, fewer bytes when frozen blocks fill whole
    buckets. This 0.8 MB model fits in one of DDP's 25 MB buckets, so here nothing is skipped; an
    LLM block spans many buckets (benchmarks/ddp_comm.py measures the saving).
"""

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

try:
    from grass_optim import GrassAdamW
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grass_optim import GrassAdamW

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
    p.add_argument("--skip-unused-allreduce", action="store_true",
                   help="DistributedDataParallel(skip_all_reduce_unused_params=True): do not all-reduce buckets "
                        "whose parameters are all frozen (none here: the model fits in one bucket)")
    args = p.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    switch_every = 8 if args.quick else SWITCH_EVERY

    # One process per rank, started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).
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

    torch.manual_seed(SEED)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    model = TinyLM().to(device)
    ddp_kwargs = {"skip_all_reduce_unused_params": True} if args.skip_unused_allreduce else {}
    # find_unused_parameters=True: frozen blocks get no gradient, and DDP must not wait for them.
    ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None,
                                        find_unused_parameters=True, **ddp_kwargs)
    opt = GrassAdamW(ddp_model, lr=LR, active_layers=ACTIVE_LAYERS, switch_every=switch_every,
                     probe_steps=PROBE_STEPS)  # seed=None: rank 0's seed, broadcast to all ranks

    data = TensorDataset(make_sequences(BATCH_PER_RANK * world * 50, seed=SEED))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    loader = DataLoader(data, batch_size=BATCH_PER_RANK, sampler=sampler, drop_last=True)
    held_out = make_sequences(256, seed=SEED + 1).to(device)

    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{world} ranks ({'nccl' if use_cuda else 'gloo'}), {n_params / 1e6:.2f}M parameters, "
              f"{opt.num_layers} blocks, {ACTIVE_LAYERS} trained at a time, {steps} steps")
    active_sets = []
    step, epoch = 0, 0
    t0 = time.perf_counter()
    while step < steps:
        sampler.set_epoch(epoch)
        for (tokens,) in loader:
            tokens = tokens.to(device)
            opt.zero_grad()
            loss = ddp_model(tokens)
            loss.backward()  # DDP averages the gradients of the active blocks (and the outside) here
            opt.step()  # GrassAdamW updates the active blocks, then refreshes/redraws when due
            step += 1
            if not active_sets or active_sets[-1] != opt.active_layer_indices:
                active_sets.append(opt.active_layer_indices)
            if step % (10 if args.quick else 50) == 0 or step == steps:
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                if rank == 0:
                    print(f"step {step:4d} | loss {mean_loss.item() / world:.4f} | active {opt.active_layer_indices}")
            if step == steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - t0

    with torch.no_grad():
        eval_loss = model(held_out).item()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        print(f"held-out loss: {eval_loss:.4f} (uniform guess: {torch.log(torch.tensor(float(VOCAB))).item():.4f})")
        print(f"active sets in order (probing all blocks, then {len(active_sets) - 1} changes): {active_sets}")
        print("importance:   ", [round(v, 5) for v in opt.importance.tolist()])
        print("probabilities:", [round(v, 3) for v in opt.probabilities.tolist()])
        print(f"parameters identical on all ranks: {all(torch.equal(g, gathered[0]) for g in gathered)}")
        print(f"{elapsed:.1f} s, {1e3 * elapsed / steps:.1f} ms/step")
    # Tear down in order: DDP's reducer before the process group it uses, both ranks together
    # (gloo can abort a process whose peer hung up mid-teardown).
    del ddp_model, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

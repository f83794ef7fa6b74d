"""Run by tests/test_hf_accelerate.py under torchrun (2 gloo processes): GrassTrainer under the
Trainer's own DDP. With activation checkpointing the Trainer builds DDP with
find_unused_parameters=False; GrassAdamW must refuse it at its first step, before any update. With
ddp_find_unused_parameters=True the same run trains and the processes agree. Rank 0 prints one
RESULT line per run and rank."""

import gc
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainingArguments  # noqa: E402

from grass_optim.integrations import GrassTrainer, find_grass_optimizer  # noqa: E402
from tests.test_hf_trainer import Arithmetic, tiny_llama  # noqa: E402

GRASS = {"active_layers": 1, "switch_every": 2, "probe_steps": 1, "seed": 0}


def run(name: str, out: str, **extra) -> None:
    args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=4, logging_steps=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                             activation_checkpointing=True, **extra)
    model = tiny_llama()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = GrassTrainer(model=model, args=args, train_dataset=Arithmetic(), grass=GRASS)
    try:
        trainer.train()
        outcome = {"error": None}
    except ValueError as err:  # raised on every rank at the same step, so the collective below is safe
        outcome = {"error": str(err)}
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    outcome.update(steps=find_grass_optimizer(trainer.optimizer).num_steps,
                   unchanged=all(torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True)))
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    outcome["same_on_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if dist.get_rank() == 0:  # one writer: two ranks printing to one pipe interleave their lines
        for rank, o in enumerate(outcomes):
            print(f"RESULT {name} rank={rank} steps={o['steps']} unchanged={o['unchanged']} "
                  f"same={o['same_on_ranks']} error={o['error']}", flush=True)


if __name__ == "__main__":
    out = sys.argv[1]
    run("default", os.path.join(out, "default"))
    run("find_unused", os.path.join(out, "find_unused"), ddp_find_unused_parameters=True)
    # DDP's reducers (garbage now) before the process group they use, every rank together.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()

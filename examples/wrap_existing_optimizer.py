"""Wrap an optimizer you already have (param groups, hyperparameters, scheduler) with GRASS.

    python examples/wrap_existing_optimizer.py                  # AdamW with decay / no-decay groups
    python examples/wrap_existing_optimizer.py --optimizer sgd  # SGD with Nesterov momentum

A few seconds on CPU. What it does, top to bottom:
  1. builds a small residual MLP (an input layer, six identical blocks in an ``nn.ModuleList``, a
     head) and a synthetic regression task from a fixed random "teacher" network;
  2. builds the optimizer the usual way, with the usual two param groups (weight decay on matrices,
     none on biases and norms), then wraps it: ``GrassAdamW(model, base_optimizer=opt, ...)``. The
     wrapped optimizer keeps its groups and hyperparameters; GRASS splits each group per block and
     decides which blocks get gradients;
  3. attaches a warm-up + cosine schedule to the *wrapper* (it sees every group, frozen blocks
     included), clips gradients before each step, and trains;
  4. prints how the groups were split, every redraw of the active blocks, and the final scores.
"""

import argparse
import os
import sys
from collections import Counter

import torch
from torch import nn

try:
    from grass_optim import GrassAdamW
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grass_optim import GrassAdamW

# ----------------------------------------------------------------------------- settings
STEPS = 300
BATCH = 64
D_IN, WIDTH, D_OUT, BLOCKS = 16, 64, 4, 6
ACTIVE_LAYERS = 2  # gamma: blocks trained at a time, out of BLOCKS
SWITCH_EVERY = 25  # redraw the active blocks every 25 optimizer steps
PROBE_STEPS = 10  # first steps measure every block's gradient RMS and update nothing
WARMUP = PROBE_STEPS + 20  # the warm-up starts during probing, so make it longer than probing
CLIP = 1.0

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
parser.add_argument("--steps", type=int, default=STEPS)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if args.steps <= WARMUP:
    parser.error(f"--steps must be more than the warm-up ({WARMUP})")
torch.manual_seed(args.seed)
torch.set_num_threads(1)  # a model this small runs fastest on one thread


# ----------------------------------------------------------------------------- model and data
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(self.norm(h))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D_IN, WIDTH)
        self.layers = nn.ModuleList(Block(WIDTH) for _ in range(BLOCKS))  # the blocks GRASS samples
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, D_OUT)

    def forward(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(self.norm(h))


teacher = nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, D_OUT))
data_gen = torch.Generator().manual_seed(args.seed + 1)


def sample(n):
    x = torch.randn(n, D_IN, generator=data_gen)
    with torch.no_grad():
        return x, teacher(x)


x_eval, y_eval = sample(1024)
model = Net()


@torch.no_grad()
def eval_loss():
    return nn.functional.mse_loss(model(x_eval), y_eval).item()


# ----------------------------------------------------------------------------- your optimizer, as usual
decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # matrices
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases and norm weights
if args.optimizer == "adamw":
    base = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                              {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95))
else:
    base = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                            {"params": no_decay, "weight_decay": 0.0}], lr=0.05, momentum=0.9, nesterov=True)
print(f"base optimizer: {type(base).__name__} with {len(base.param_groups)} groups "
      f"({len(decay)} matrices with decay, {len(no_decay)} vectors without)")

# ----------------------------------------------------------------------------- wrap it
opt = GrassAdamW(model, base_optimizer=base, active_layers=ACTIVE_LAYERS, switch_every=SWITCH_EVERY,
                 probe_steps=PROBE_STEPS, seed=args.seed)
assert opt.base_optimizer is base and opt.param_groups is base.param_groups  # same objects, split in place
split = Counter(("outside" if g["grass_block"] is None else "block", g["weight_decay"]) for g in opt.param_groups)
print(f"GrassAdamW split them into {len(opt.param_groups)} groups (one per user group and part of the model): "
      + ", ".join(f"{n} x {part} wd={wd}" for (part, wd), n in sorted(split.items())))
print(f"blocks: {opt.num_layers} ({opt.layer_names[0]} .. {opt.layer_names[-1]}), {ACTIVE_LAYERS} active at a time, "
      f"redrawn every {SWITCH_EVERY} steps after {PROBE_STEPS} probing steps")

# The scheduler goes on the wrapper: it steps the lr of every group, inactive blocks included.
warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=WARMUP)
cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps - WARMUP, eta_min=1e-5)
sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[WARMUP])

# ----------------------------------------------------------------------------- train
loss_before = eval_loss()
print(f"\n{'step':>5} {'phase':<16}{'lr':>10}{'train loss':>12}")
steps_per_block = Counter()
last = None
for step in range(args.steps):
    probing, active = opt.is_probing, opt.active_layer_indices  # what this step trains
    lr = opt.param_groups[0]["lr"]  # the lr this step uses
    x, y = sample(BATCH)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # only the gradients that exist: active blocks + outside
    opt.step()
    sched.step()
    if not probing:
        steps_per_block.update(active)
    phase = "probing" if probing else f"blocks {','.join(map(str, active))}"
    if phase != last or step == args.steps - 1:
        print(f"{step:>5} {phase:<16}{lr:>10.2e}{loss.item():>12.4f}")
        last = phase

# ----------------------------------------------------------------------------- report
loss_after = eval_loss()
print(f"\neval loss: {loss_before:.4f} -> {loss_after:.4f}")
print(f"{'block':>5}{'steps':>7}{'importance':>12}{'probability':>13}")
for i in range(opt.num_layers):
    print(f"{i:>5}{steps_per_block[i]:>7}{opt.importance[i].item():>12.3e}{opt.probabilities[i].item():>13.3f}")
final_lrs = sorted({f"{g['lr']:.2e}" for g in opt.param_groups})
print(f"active blocks now: {list(opt.active_layer_indices)}; "
      f"final lr of all {len(opt.param_groups)} groups: {final_lrs}")

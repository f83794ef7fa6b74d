"""GrassAdamW with Hugging Face Accelerate: the same script on 1 process or many.

    python examples/hf_accelerate.py --quick                                       # 1 process
    torchrun --nproc_per_node=2 examples/hf_accelerate.py --quick                  # 2 processes (gloo on CPU)
    accelerate launch --num_processes=2 examples/hf_accelerate.py --quick          # the same, via accelerate
    torchrun --nproc_per_node=2 examples/hf_accelerate.py --quick --without-kwargs # GrassAdamW's error

The one Accelerate setting GRASS needs: ``Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(
find_unused_parameters=True)])``. With more than one process ``accelerator.prepare`` wraps the model
in DistributedDataParallel, with ``find_unused_parameters=False`` unless told; the blocks GrassAdamW
freezes then get no gradient and DDP, waiting for them, fails a step after the first freeze. With
``--without-kwargs`` GrassAdamW stops at its first step instead, before anything is updated, with an
error naming the setting (docs/guides/accelerate.md).

The model (4 small MLP blocks in ``model.layers``) and the data (a fixed random regression) are
built in the script; nothing is downloaded. The script prints every 10th step's loss averaged over
the processes, and at the end whether all processes hold the same parameters.
"""

import argparse
import gc
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    from grass_optim import GrassAdamW
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grass_optim import GrassAdamW

D, LAYERS, BATCH = 32, 4, 16  # BATCH: per process
STEPS, QUICK_STEPS = 200, 30
SEED = 0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(LAYERS))
        self.out = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = h + block(h)
        return self.out(h)


def train(accelerator: Accelerator, steps: int) -> int:
    """Train; 0, or 1 when GrassAdamW refuses the model (``--without-kwargs``)."""
    torch.manual_seed(SEED)  # the same initial model on every process (DDP broadcasts rank 0's anyway)
    model = Net()
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH * 64, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=g)

    # Built on the model itself, before prepare() wraps it in DDP: GrassAdamW freezes nothing before
    # its first step in a multi-process run, so DDP registers every block. seed=None: rank 0's seed.
    opt = GrassAdamW(model, lr=3e-3, active_layers=2, switch_every=5, probe_steps=3)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    unwrapped = accelerator.unwrap_model(model)
    initial = [q.detach().clone() for q in unwrapped.parameters()]

    step = 0
    while step < steps:
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            accelerator.backward(loss)
            try:
                opt.step()
            except ValueError as err:  # --without-kwargs: refused at the first step, nothing updated
                unchanged = all(torch.equal(a, b) for a, b in zip(initial, unwrapped.parameters(), strict=True))
                if accelerator.is_main_process:
                    print(f"GrassAdamW refused the model at step {step + 1} (parameters unchanged: {unchanged}): "
                          f"{err}")
                return 1
            step += 1
            mean = accelerator.reduce(loss.detach(), reduction="mean")
            if step % 10 == 0 and accelerator.is_main_process:
                grass = opt.optimizer  # accelerate's AcceleratedOptimizer wraps GrassAdamW
                print(f"step {step:4d} | loss {mean.item():.5f} | active {grass.active_layer_indices}")
            if step == steps:
                break

    flat = torch.cat([q.detach().flatten() for q in unwrapped.parameters()])
    gathered = accelerator.gather(flat[None])
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es), {step} steps")
        print(f"parameters identical on all processes: {all(torch.equal(r, gathered[0]) for r in gathered)}")
        print(f"checksum {flat.double().sum().item():.10f}")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps instead of {STEPS}")
    p.add_argument("--without-kwargs", action="store_true",
                   help="leave out DistributedDataParallelKwargs(find_unused_parameters=True), to see the error")
    args = p.parse_args()

    # find_unused_parameters=True: the blocks GrassAdamW freezes get no gradient, and DDP must not
    # wait for them. Harmless on one process (there is no DDP then).
    handlers = [] if args.without_kwargs else [DistributedDataParallelKwargs(find_unused_parameters=True)]
    accelerator = Accelerator(kwargs_handlers=handlers, cpu=not torch.cuda.is_available())
    code = train(accelerator, QUICK_STEPS if args.quick else STEPS)
    # Tear down in order: DDP's reducer before the process group it uses, all processes together
    # (gloo can abort a process whose peer hung up mid-teardown).
    accelerator.free_memory()  # the accelerator's own references to the DDP model and the optimizer
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()

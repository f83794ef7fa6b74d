"""What the tests share: a small transformer-shaped model, its data and loss, training loops, and
the reference comparisons (parameters, optimizer state, checkpoints).

Fixtures (the base-optimizer x offload-mode matrix) are in ``conftest.py``.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from grass_optim import GrassAdamW, GrassSampler


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class TinyNet(nn.Module):
    """Embedding-like input layer, a ModuleList of blocks, a head: the shape of a transformer."""

    def __init__(self, d: int = 8, num_layers: int = 4, d_in: int = 3, d_out: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(num_layers))
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def make_net(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def batches(n: int, seed: int = 123, d_in: int = 3, d_out: int = 2, batch: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, data, after_step=None) -> list[float]:
    losses = []
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(i)
    return losses


def train_at(model: nn.Module, opt: torch.optim.Optimizer, data, start: int = 0, at=None, part=None) -> list:
    """The loop zero_grad, backward, step over ``data[start:]``, calling ``at(i, where)`` after each
    of them (``where`` is "zero_grad", "backward", "step") of iteration ``i``; ``part(t)`` is the
    rank's part of a global batch tensor (multi-process runs). Returns the active set after every step."""
    actives = []
    for i in range(start, len(data)):
        x, y = data[i]
        if part is not None:
            x, y = part(x), part(y)
        opt.zero_grad()
        if at:
            at(i, "zero_grad")
        loss_fn(model, x, y).backward()
        if at:
            at(i, "backward")
        opt.step()
        if at:
            at(i, "step")
        actives.append(opt.active_layer_indices)
    return actives


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"parameter {name} differs"


def assert_same_state(ref_opt: torch.optim.Optimizer, ref_model: nn.Module, opt: torch.optim.Optimizer,
                      model: nn.Module) -> None:
    """Same optimizer state, bit for bit, for corresponding parameters (wherever it lives)."""
    for (name, rp), p in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        rs, s = ref_opt.state[rp], opt.state[p]
        assert rs.keys() == s.keys(), name
        for key in rs:
            a, b = torch.as_tensor(rs[key]), torch.as_tensor(s[key])
            assert torch.equal(a, b.to(a.device)), f"{name}: state {key!r}"


def round_trip(obj):
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def decay_groups(model: nn.Module, **lrs: float) -> list[dict]:
    """The usual decay / no-decay split (``decay_lr=``/``no_decay_lr=`` set per-group learning rates)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if lrs:
        groups[0]["lr"], groups[1]["lr"] = lrs["decay_lr"], lrs["no_decay_lr"]
    return groups


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_params(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}


def block_of(name: str) -> int | None:
    """Block index of a TinyNet parameter name (``layers.<i>.``), or None outside the blocks."""
    return int(name.split(".")[1]) if name.startswith("layers.") else None


class RecordingSampler(GrassSampler):
    """GrassSampler that records every window the schedule hands to refresh()."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def refresh(self, importance, window_mean, measured):
        self.calls.append((window_mean.clone(), measured.clone()))
        return super().refresh(importance, window_mean, measured)


# The scenario of the offload, memory, history and resume tests: gradient accumulation over two
# micro-batches, a cosine LR schedule, redraws every 3 steps and a parameter the user froze.
SCENARIO = dict(lr=1e-2, weight_decay=0.1, active_layers=2, switch_every=3, update_every=2, probe_steps=2, seed=4)


def scenario_model(num_layers: int = 4) -> TinyNet:
    model = make_net(num_layers=num_layers)
    model.layers[1].norm.bias.requires_grad_(False)  # frozen by the user: must stay so
    return model


def train_scenario(model, opt, data, sched=None, accumulate=2, log=None) -> None:
    """Gradient accumulation over ``accumulate`` micro-batches per optimizer step, LR scheduler;
    ``log`` collects (active blocks, memory report) after every step."""
    for start in range(0, len(data), accumulate):
        opt.zero_grad()
        for x, y in data[start:start + accumulate]:
            (loss_fn(model, x, y) / accumulate).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if log is not None:
            log.append((opt.active_layer_indices, opt.memory_report()))


def run_scenario(offload, data, model=None, opt=None, **kwargs):
    """The scenario with GrassAdamW(offload=...) and a cosine schedule; returns (model, opt, log)."""
    model = model or scenario_model()
    opt = opt or GrassAdamW(model, offload=offload, **{**SCENARIO, **kwargs})
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    log: list = []
    train_scenario(model, opt, data, sched, log=log)
    return model, opt, log


def resumable_run(save_at: int | None, total: int = 37, **overrides):
    """Train ``total`` steps; if ``save_at`` is set, checkpoint there (through torch.save) and continue
    in a fresh model and optimizer. Returns (model, optimizer, active set after every step)."""
    kwargs = {**dict(lr=1e-2, active_layers=2, switch_every=5, update_every=3, probe_steps=4, seed=3), **overrides}
    model = make_net()
    opt = GrassAdamW(model, **kwargs)
    data = batches(total)
    schedule = []
    if save_at is None:
        train(model, opt, data, after_step=lambda _: schedule.append(opt.active_layer_indices))
        return model, opt, schedule
    train(model, opt, data[:save_at], after_step=lambda _: schedule.append(opt.active_layer_indices))
    ckpt = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
    model = make_net(seed=99)  # other weights: everything must come from the checkpoint
    opt = GrassAdamW(model, **{**kwargs, "seed": 1234})
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    for i, block in enumerate(model.layers):
        for p in block.parameters():
            assert p.requires_grad == (i in opt.schedule.gradient_blocks)
    train(model, opt, data[save_at:], after_step=lambda _: schedule.append(opt.active_layer_indices))
    return model, opt, schedule

"""Stateful property tests: random sequences of what a training loop (and a hostile helper) does.

Rules: backward with ordinary, zero, missing (None), NaN or Inf gradients, or accumulated over two
micro-batches; step; zero_grad; an LR scheduler's step; a helper unfreezing the whole model; the
user freezing the embedding; saving and loading into a fresh model and optimizer, possibly with
another offload mode. After loading, the fresh pair runs as a twin beside the original and must
stay identical to it, bit for bit.

Invariants after every rule: parameters of blocks outside the active set and parameters the user
froze never change in a step; exactly gamma sampleable blocks are active after probing; the
probabilities are a distribution; the scores are finite or NaN (not scored); optimizer state is
where the offload mode says; the twins agree.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from grass_optim import GrassAdamW
from tests.helpers import batches, loss_fn, make_net, round_trip

L = 4
MODES = [None, "inactive", "stream"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits, so that NaN compares equal to the same NaN."""
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


class Twin:
    def __init__(self, model, opt, sched):
        self.model, self.opt, self.sched = model, opt, sched


class GrassMachine(RuleBasedStateMachine):
    @initialize(offload=st.sampled_from(MODES), sampler=st.sampled_from(["grass", "uniform", "l1", "gain", "static"]),
                probe=st.integers(0, 3), switch=st.integers(1, 4), refresh_all=st.booleans(),
                gamma=st.integers(1, 3), seed=st.integers(0, 2**31))
    def build(self, offload, sampler, probe, switch, refresh_all, gamma, seed):
        self.kwargs = {"lr": 1e-2, "weight_decay": 0.1, "sampler": sampler, "probe_steps": probe,
                       "switch_every": switch, "refresh_all": refresh_all, "active_layers": gamma, "seed": seed}
        model = make_net()
        model.layers[1].norm.bias.requires_grad_(False)  # the user's own freeze: never trained
        self.user_frozen = {"layers.1.norm.bias"}
        self.twins = [self._twin(model, offload)]
        self.data = batches(64, seed=seed % 1000)
        self.turn = 0
        self.pending = False  # gradients exist (step() keeps them): a checkpoint must wait for zero_grad

    def _twin(self, model, offload):
        opt = GrassAdamW(model, offload=offload, **self.kwargs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.97 ** s)
        return Twin(model, opt, sched)

    def _batch(self):
        self.turn += 1
        return self.data[self.turn % len(self.data)]

    # ------------------------------------------------------------------ rules
    @rule(kind=st.sampled_from(["normal", "zero", "missing", "nan", "inf", "accumulate"]))
    def backward(self, kind):
        x, y = self._batch()
        x2, y2 = self._batch()
        for t in self.twins:
            if kind == "accumulate":
                (loss_fn(t.model, x, y) / 2).backward()
                (loss_fn(t.model, x2, y2) / 2).backward()
            else:
                loss = loss_fn(t.model, x, y)
                (loss * 0 if kind == "zero" else loss).backward()
            # The same parameter in every twin: the first trained block's (a helper may have given
            # gradients to other blocks in one twin; they never reach the update).
            target = t.model.layers[t.opt.active_layer_indices[0]].fc.bias
            if target.grad is not None and kind == "missing":
                target.grad = None
            elif target.grad is not None and kind in ("nan", "inf"):
                target.grad[0] = float(kind)
        self.pending = True

    @rule()
    def step(self):
        for t in self.twins:
            before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
            trained = set(t.opt.active_layer_indices) if not t.opt.is_probing else set()
            t.opt.step()
            for n, p in t.model.named_parameters():
                block = int(n.split(".")[1]) if n.startswith("layers.") else None
                if n in self.user_frozen or (block is not None and block not in trained):
                    assert _same(p, before[n]), f"{n} changed in a step (active {trained})"

    @rule()
    def zero_grad(self):
        for t in self.twins:
            t.opt.zero_grad()
        self.pending = False

    @rule()
    def scheduler_step(self):
        for t in self.twins:
            t.sched.step()

    @rule()
    def helper_unfreezes_everything(self):
        for t in self.twins:
            for n, p in t.model.named_parameters():
                if n not in self.user_frozen:
                    p.requires_grad_(True)

    @precondition(lambda self: "embed.weight" not in self.user_frozen)
    @rule()
    def user_freezes_the_embedding(self):
        for t in self.twins:
            t.model.embed.weight.requires_grad_(False)
        self.user_frozen |= {"embed.weight"}

    @precondition(lambda self: not self.pending)
    @rule(offload=st.sampled_from(MODES))
    def save_and_load(self, offload):
        src = self.twins[0]
        saved = round_trip({"model": src.model.state_dict(), "opt": src.opt.state_dict(),
                            "sched": src.sched.state_dict()})
        model = make_net(seed=99)
        model.load_state_dict(saved["model"])
        for n, p in model.named_parameters():
            if n in self.user_frozen:
                p.requires_grad_(False)
        twin = self._twin(model, offload)
        twin.opt.load_state_dict(saved["opt"])
        twin.sched.load_state_dict(saved["sched"])
        self.twins = [src, twin]

    # ------------------------------------------------------------------ invariants
    @invariant()
    def schedule_is_consistent(self):
        for t in self.twins:
            opt = t.opt
            p = opt.probabilities
            assert torch.isfinite(p).all() and (p >= 0).all() and abs(float(p.sum()) - 1.0) < 1e-9
            assert not torch.isinf(opt.importance).any()
            if not opt.is_probing:
                active = opt.active_layer_indices
                assert len(active) == len(set(active)) == self.kwargs["active_layers"]

    @invariant()
    def state_lives_where_the_mode_says(self):
        for t in self.twins:
            opt, rep = t.opt, t.opt.memory_report()
            mode = opt.config.offload
            if mode is None:
                assert rep.host_state_bytes == 0
            elif not opt.is_probing:
                resident = set(opt.active_layer_indices) if mode == "inactive" else {min(opt.active_layer_indices)}
                assert all(b == 0 for i, b in enumerate(rep.device_state_bytes_per_block) if i not in resident)

    @invariant()
    def twins_agree(self):
        if len(self.twins) < 2:
            return
        a, b = self.twins
        assert a.opt.num_steps == b.opt.num_steps
        assert a.opt.active_layer_indices == b.opt.active_layer_indices
        assert _same(a.opt.importance, b.opt.importance)
        for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
            assert _same(p, q), n
            sa, sb = a.opt.state[p], b.opt.state[q]
            assert sa.keys() == sb.keys(), n
            for k in sa:
                assert _same(sa[k].cpu(), sb[k].cpu()), (n, k)


GrassMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestGrassMachine = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")(
    GrassMachine.TestCase)

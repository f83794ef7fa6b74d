"""A step that raises part-way, then is tried again, ends exactly where an uninterrupted run does.

Out of memory in the base optimizer (mid-pipeline in "stream": after the outside and the first
block were updated), a sampler that raises at a redraw (after the whole update), a move of state
that fails after the schedule advanced: in every offload mode the step tried again applies no part
of the update twice, counts its signal once, and finds every state where the schedule expects it.
A checkpoint taken between the failure and the retry carries what was already applied.
"""

from __future__ import annotations

import pytest
import torch

from grass_optim import GrassAdamW, GrassSampler, load_checkpoint, save_checkpoint
from tests.helpers import assert_same_params, assert_same_state, batches, loss_fn, make_net, round_trip

SETTINGS = dict(lr=1e-2, weight_decay=0.1, active_layers=3, switch_every=3, update_every=2, probe_steps=2, seed=4)
STEPS = 14
FAIL_AT = 6  # an ordinary step (no refresh, no redraw) after probing


class InjectedError(RuntimeError):
    pass


class FailingAdamW(torch.optim.AdamW):
    """AdamW whose (unhooked) step raises once, when ``fail(self)`` says so, before updating anything;
    and which refuses to update state parked in a host buffer (on an accelerator: a device mismatch,
    which this CPU machine would not notice)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.fail = lambda opt: False
        self.grass = None

    def step(self, closure=None):
        if self.fail(self):
            self.fail = lambda opt: False
            raise InjectedError("out of memory (injected)")
        offloader = getattr(self.grass, "_offloader", None)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and offloader is not None:
                    assert not any(offloader.is_parked(p, k, v) for k, v in self.state[p].items()), \
                        "an update of state parked on the host"
        return super().step(closure)


def _build(offload, fail_base=False):
    model = make_net(num_layers=5)
    base = FailingAdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"]) if fail_base \
        else torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
    opt = GrassAdamW(model, base, **{k: v for k, v in SETTINGS.items() if k not in ("lr", "weight_decay")},
                     offload=offload)
    base.grass = opt
    return model, opt


def _step(model, opt, batch):
    opt.zero_grad()
    loss_fn(model, *batch).backward()
    opt.step()


def _reference(offload):
    model, opt = _build(offload)
    for batch in batches(STEPS):
        _step(model, opt, batch)
    return model, opt


def _expect_placement(opt):
    """Every block's state where the schedule says: only the resident blocks' on the device."""
    assert not opt._placement_dirty
    if opt.config.offload is not None:
        per_block = opt.memory_report().device_state_bytes_per_block
        assert {i for i, b in enumerate(per_block) if b} <= opt._resident()
        assert all(per_block[i] > 0 for i in opt._resident() if opt._block_states(i)), (per_block, opt._resident())


def _retry_after(model, opt, data, failing_step, retry=lambda model, opt, batch: opt.step()):
    """Train; at ``failing_step`` the step raises InjectedError, then ``retry`` runs it again."""
    for n, batch in enumerate(data):
        if n != failing_step:
            _step(model, opt, batch)
            continue
        opt.zero_grad()
        loss_fn(model, *batch).backward()
        with pytest.raises(InjectedError):
            opt.step()
        assert opt.num_steps == failing_step  # not counted
        retry(model, opt, batch)
        assert opt.num_steps == failing_step + 1
        _expect_placement(opt)


def _fail_on_second_block(opt):
    """In "stream" the base steps the outside, then each active block: fail on the second block."""
    def fail(base):
        blocks = {g["grass_block"] for g in base.param_groups}
        return opt.num_steps == FAIL_AT and blocks == {sorted(opt.active_layer_indices)[1]}
    return fail


@pytest.mark.parametrize("offload", [None, "inactive", "stream"])
def test_out_of_memory_in_the_base_optimizer_then_a_retry_equals_an_uninterrupted_run(offload):
    ref_model, ref_opt = _reference(offload)
    model, opt = _build(offload, fail_base=True)
    if offload == "stream":
        opt.base_optimizer.fail = _fail_on_second_block(opt)
    else:
        opt.base_optimizer.fail = lambda base: opt.num_steps == FAIL_AT
    _retry_after(model, opt, batches(STEPS), FAIL_AT)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, ref_model, opt, model)
    assert torch.equal(ref_opt.importance, opt.importance)


def test_a_retry_with_the_gradients_computed_again_gives_the_same_result():
    """The usual recovery: zero_grad, forward and backward again, step. Nothing was applied before the
    failure, so the same batch gives the same step."""
    ref_model, ref_opt = _reference(None)
    model, opt = _build(None, fail_base=True)
    opt.base_optimizer.fail = lambda base: opt.num_steps == FAIL_AT
    _retry_after(model, opt, batches(STEPS), FAIL_AT, lambda model, opt, batch: _step(model, opt, batch))
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, ref_model, opt, model)
    assert torch.equal(ref_opt.importance, opt.importance)  # the failed try's signal was not counted


def test_in_stream_a_retry_with_new_gradients_updates_only_the_parts_not_yet_updated():
    """Part of the update was applied before the failure (the outside and the first active block):
    the retry's gradients come from the partly updated model, and only the other parts take them.
    Every parameter is updated as many times as in an uninterrupted run (AdamW's step counts)."""
    ref_model, ref_opt = _reference("stream")
    model, opt = _build("stream", fail_base=True)
    opt.base_optimizer.fail = _fail_on_second_block(opt)
    updated = {}

    def again(model, opt, batch):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _step(model, opt, batch)
        updated.update({n: not torch.equal(before[n], p) for n, p in model.named_parameters()})
    data = batches(STEPS)
    _retry_after(model, opt, data, FAIL_AT, again)
    ref_counts = [float(ref_opt.state[p]["step"]) if p in ref_opt.state else 0.0 for p in ref_model.parameters()]
    counts = [float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in model.parameters()]
    assert counts == ref_counts
    assert not updated["embed.weight"] and not updated["head.weight"]  # the outside: done before the failure


class FailOnceSampler(GrassSampler):
    """The published sampler, except that one draw raises (after the step's update was applied)."""

    def __init__(self, fail_at_draw: int):
        super().__init__()
        self.draws, self.fail_at_draw = 0, fail_at_draw

    def draw(self, probabilities, k, generator):
        self.draws += 1
        if self.draws == self.fail_at_draw:
            raise InjectedError("sampler failed (injected)")
        return super().draw(probabilities, k, generator)


@pytest.mark.parametrize("offload", [None, "inactive", "stream"])
def test_a_sampler_raising_after_the_update_does_not_make_the_retry_update_again(offload):
    def build(fail_at_draw):
        model = make_net(num_layers=5)
        opt = GrassAdamW(model, sampler=FailOnceSampler(fail_at_draw), offload=offload, **SETTINGS)
        return model, opt
    ref_model, ref_opt = build(0)
    for batch in batches(STEPS):
        _step(ref_model, ref_opt, batch)
    model, opt = build(2)  # the first redraw after probing: step 2 + switch_every = the 5th step
    _retry_after(model, opt, batches(STEPS), SETTINGS["probe_steps"] + SETTINGS["switch_every"] - 1)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, ref_model, opt, model)


@pytest.mark.parametrize("offload", ["inactive", "stream"])
def test_a_move_that_fails_after_the_schedule_advanced_is_completed_by_the_next_step(offload):
    """The step counted (its update was whole); the state it was moving is put in place first thing."""
    ref_model, ref_opt = _reference(offload)
    model, opt = _build(offload, fail_base=True)  # never fails: it checks that no update reads parked state
    data = batches(STEPS)
    redraw = SETTINGS["probe_steps"] + 3 * SETTINGS["switch_every"] - 1  # blocks with state enter here
    real_prefetch = opt._offloader.prefetch
    for n, batch in enumerate(data):
        if n == redraw:
            had_state = {i for i in range(5) if opt._block_states(i)}
            calls = []

            def failing_prefetch(unit, states, n=n, calls=calls):
                if opt.num_steps == n + 1 and not calls:  # the moves after the step was counted
                    calls.append(unit)
                    raise InjectedError("device allocation failed (injected)")
                real_prefetch(unit, states)
            opt._offloader.prefetch = failing_prefetch
            opt.zero_grad()
            loss_fn(model, *batch).backward()
            with pytest.raises(InjectedError):
                opt.step()
            opt._offloader.prefetch = real_prefetch
            assert opt.num_steps == n + 1 and opt._placement_dirty
            assert opt._resident() & had_state, "not a redraw that brings back a block with state"
            continue
        _step(model, opt, batch)
        if n == redraw + 1:
            _expect_placement(opt)  # the blocks that were not brought in were, before this step's update
    _expect_placement(opt)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, ref_model, opt, model)


def test_state_dict_after_a_failed_step_puts_the_state_in_place_first():
    model, opt = _build("inactive")
    data = batches(STEPS)
    for batch in data[:FAIL_AT]:
        _step(model, opt, batch)
    opt._placement_dirty = True
    stray = min(set(range(5)) - opt._resident())
    opt._offloader.prefetch(stray, opt._block_states(stray))  # a block left on the device by a failure
    assert opt.memory_report().device_state_bytes_per_block[stray] > 0
    opt.state_dict()
    _expect_placement(opt)
    assert opt.memory_report().device_state_bytes_per_block[stray] == 0


@pytest.mark.parametrize("through", ["torch.save", "dcp"])
@pytest.mark.parametrize("offload", [None, "inactive", "stream"])
def test_a_checkpoint_between_the_failure_and_the_retry_resumes_as_the_retry_in_memory(offload, through, tmp_path):
    """Failure, then the usual recovery (zero_grad, backward, step) in the same process, against:
    failure, checkpoint (torch.save, or grass_optim.save_checkpoint), a fresh model and optimizer
    loading it, the same recovery."""
    def failing_run():
        model, opt = _build(offload, fail_base=True)
        opt.base_optimizer.fail = _fail_on_second_block(opt) if offload == "stream" else (
            lambda base: opt.num_steps == FAIL_AT)
        data = batches(STEPS)
        for batch in data[:FAIL_AT]:
            _step(model, opt, batch)
        opt.zero_grad()
        loss_fn(model, *data[FAIL_AT]).backward()
        with pytest.raises(InjectedError):
            opt.step()
        return model, opt, data[FAIL_AT:]

    ref_model, ref_opt, rest = failing_run()
    for batch in rest:
        _step(ref_model, ref_opt, batch)
    model, opt, rest = failing_run()
    if through == "dcp":
        save_checkpoint(tmp_path, model, opt)  # first: state_dict() puts the state in place itself
    saved = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
    if offload == "stream":
        assert saved["opt"]["grass"]["progress"]["parts"][0] == -1  # the outside was updated
    model, opt = _build(offload)
    if through == "dcp":
        load_checkpoint(tmp_path, model, opt)
    else:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    for batch in rest:
        _step(model, opt, batch)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, ref_model, opt, model)


def test_a_checkpoint_with_a_bad_progress_entry_is_refused():
    model, opt = _build(None)
    for batch in batches(3):
        _step(model, opt, batch)
    sd = opt.state_dict()
    sd["grass"]["progress"] = {"step": 2, "everything": False, "parts": [7]}
    with pytest.raises(ValueError, match="'progress'"):
        opt.load_state_dict(sd)
    sd["grass"]["progress"] = {"step": 3, "everything": True, "parts": []}  # fine
    opt.load_state_dict(sd)

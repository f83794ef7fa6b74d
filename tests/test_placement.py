"""grass_optim.placement: the offload policy, on its own (a recording stand-in for the offloader) and as
estimate_memory and GrassAdamW use it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from grass_optim.placement import OffloadPolicy, Progress


class _Moves:
    """Records what the policy asks the offloader and the base optimizer to do, in order."""

    def __init__(self):
        self.log = []

    def prefetch(self, unit, states):
        self.log.append(("prefetch", unit))

    def wait(self, unit):
        self.log.append(("wait", unit))

    def offload(self, unit, states):
        self.log.append(("offload", unit))

    def step_all(self):
        self.log.append(("step", "all"))

    @contextmanager
    def step_parts(self):
        self.log.append(("hooks", "pre"))
        yield lambda block: self.log.append(("step", block))
        self.log.append(("hooks", "post"))


def _states(_i):
    return []


@pytest.mark.parametrize(("mode", "resident"), [(None, set()), ("inactive", {1, 3}), ("stream", {1})])
def test_resident_blocks_between_steps(mode, resident):
    policy = OffloadPolicy(mode)
    assert policy.resident((1, 3), probing=False) == resident
    assert policy.resident((1, 3), probing=True) == set(), "probing updates nothing: nothing is resident"


@pytest.mark.parametrize(("mode", "expected"), [(None, 8), ("inactive", 3), ("stream", 2)])
def test_device_blocks_bound_what_the_estimate_counts(mode, expected):
    assert OffloadPolicy(mode).device_blocks(active_layers=3, num_blocks=8) == expected
    assert OffloadPolicy("stream").device_blocks(active_layers=1, num_blocks=8) == 1


def test_stream_updates_outside_then_each_block_between_its_moves():
    m = _Moves()
    progress = Progress(7)
    after = OffloadPolicy("stream").update((0, 2, 5), m.step_all, m.step_parts, m, _states, progress)
    assert after == set()
    assert m.log == [("hooks", "pre"), ("step", None),
                     ("prefetch", 2), ("wait", 0), ("step", 0), ("offload", 0),
                     ("prefetch", 5), ("wait", 2), ("step", 2), ("offload", 2),
                     ("wait", 5), ("step", 5), ("offload", 5), ("hooks", "post")]
    assert progress == Progress(7, everything=True, parts={None, 0, 2, 5})


def test_inactive_waits_for_the_active_blocks_then_steps_once():
    m = _Moves()
    assert OffloadPolicy("inactive").update((4, 1), m.step_all, m.step_parts, m, _states, Progress(0)) == {1, 4}
    assert m.log == [("wait", 1), ("wait", 4), ("step", "all")]
    m = _Moves()
    assert OffloadPolicy(None).update((4, 1), m.step_all, m.step_parts, None, _states, Progress(0)) == set()
    assert m.log == [("step", "all")]


def test_a_step_tried_again_skips_the_parts_a_failed_try_applied():
    # "stream" failed on block 2 (outside and block 0 done): block 2 is brought in (the block prefetched
    # for the step was 0), block 0 put back if the repair brought it in.
    m = _Moves()
    progress = Progress(3, parts={None, 0})
    assert OffloadPolicy("stream").update((0, 2, 5), m.step_all, m.step_parts, m, _states, progress) == set()
    assert m.log == [("prefetch", 2), ("hooks", "pre"),
                     ("prefetch", 5), ("wait", 2), ("step", 2), ("offload", 2),
                     ("wait", 5), ("step", 5), ("offload", 5), ("hooks", "post"), ("offload", 0)]
    assert progress.everything
    # A checkpoint of that failure resumed without offloading: the rest, part by part.
    m = _Moves()
    rest = Progress(3, parts={None, 0})
    assert OffloadPolicy(None).update((0, 2, 5), m.step_all, m.step_parts, None, _states, rest) == set()
    assert m.log == [("hooks", "pre"), ("step", 2), ("step", 5), ("hooks", "post")]
    # The whole update was applied (the sampler raised after it): nothing again.
    m = _Moves()
    assert OffloadPolicy("inactive").update((1, 4), m.step_all, m.step_parts, m, _states,
                                            Progress(3, everything=True)) == {1, 4}
    assert m.log == []


@pytest.mark.parametrize(("mode", "expected"), [(None, 8), ("inactive", 6), ("stream", 4)])
def test_peak_device_blocks_count_state_whose_copy_to_the_host_is_still_running(mode, expected):
    assert OffloadPolicy(mode).peak_device_blocks(active_layers=3, num_blocks=8) == expected
    assert OffloadPolicy("inactive").peak_device_blocks(active_layers=5, num_blocks=8) == 8


def test_move_writes_back_leaving_blocks_then_prefetches_entering_ones():
    m = _Moves()
    OffloadPolicy("inactive").move({0, 1}, {1, 3}, m, _states)
    assert m.log == [("offload", 0), ("prefetch", 3)]
    OffloadPolicy("inactive").move({0}, {3}, None, _states)  # off: nothing to move


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="Invalid offload: 'gpu'"):
        OffloadPolicy("gpu")

"""grass_optim.history: the sampler's decisions and the per-step records, as plain data that survives a
checkpoint and changes nothing in the run."""

from __future__ import annotations

import io
import json

import pytest
import torch

from grass_optim import GrassAdamW
from tests.helpers import (
    SCENARIO,
    assert_same_params,
    assert_same_state,
    batches,
    make_net,
    resumable_run,
    round_trip,
    run_scenario,
    scenario_model,
    train_scenario,
)

L = 4


def test_history_is_plain_data_and_survives_a_resume():
    model_a, opt_a, sched_a = resumable_run(None)
    h = opt_a.history
    json.dumps(h)  # plain data
    events = h["events"]
    assert events[0]["event"] == "start" and events[1]["event"] == "probe_end" and events[1]["step"] == 4
    for e in events[1:]:  # sched_a[i]: the active set after step i + 1
        assert e["active"] == list(sched_a[e["step"] - 1])
    redraw_steps = [e["step"] for e in events if "redraw" in e["event"]]
    assert redraw_steps == list(range(4 + 5, 38, 5))
    assert all(len(e["probabilities"]) == L for e in events)
    _, opt_b, _ = resumable_run(17)
    assert json.dumps(opt_b.history, sort_keys=True) == json.dumps(h, sort_keys=True)
    assert GrassAdamW(make_net(), history=False).history["events"] == []


@pytest.mark.parametrize("mode", [None, "inactive", "stream"])
def test_history_steps_records_state_bytes_and_copies_of_every_step(mode):
    data = batches(24, seed=3)
    model_ref, opt_ref, _ = run_scenario(mode, data)
    model = scenario_model()
    opt = GrassAdamW(model, offload=mode, history="steps", **SCENARIO)
    model, opt, log = run_scenario(mode, data, model, opt)
    # Copy timings are resolved as their copies finish (at once here: host copies are synchronous), not
    # kept as raw events until the history is read.
    assert not any("copies" in s for s in opt._history.steps) and not opt._history._unresolved
    assert_same_params(model, model_ref)  # recording changes nothing
    assert_same_state(opt, model, opt_ref, model_ref)
    steps = opt.history["steps"]
    assert [s["step"] for s in steps] == list(range(1, len(data) // 2 + 1))
    for s, (_, rep) in zip(steps, log, strict=True):
        assert s["device_state_bytes"] == rep.device_state_bytes
        assert s["host_state_bytes"] == rep.host_state_bytes
        for direction in ("to_host", "to_device"):
            moved, ms = s[f"bytes_{direction}"], s[f"copy_ms_{direction}"]
            assert (ms > 0.0) == (moved > 0), (direction, s)  # timed exactly when something moved
    final = opt.memory_report()
    assert sum(s["bytes_to_host"] for s in steps) == final.bytes_to_host
    assert sum(s["bytes_to_device"] for s in steps) == final.bytes_to_device
    if mode is None:
        assert final.bytes_to_host == final.bytes_to_device == 0
    else:
        assert final.bytes_to_host > 0 and final.bytes_to_device > 0
        assert any(s["copy_ms_to_device"] > 0 for s in steps)


def test_history_steps_is_plain_data_and_survives_a_checkpoint():
    data = batches(16, seed=5)
    model = scenario_model()
    opt = GrassAdamW(model, offload="inactive", history="steps", **SCENARIO)
    train_scenario(model, opt, data[:8])
    model2 = scenario_model()
    model2.load_state_dict(model.state_dict())
    opt2 = GrassAdamW(model2, offload="inactive", history="steps", **SCENARIO)
    opt2.load_state_dict(round_trip(opt.state_dict()))
    assert opt2.history["steps"] == opt.history["steps"]
    train_scenario(model, opt, data[8:])
    train_scenario(model2, opt2, data[8:])
    assert [s["step"] for s in opt2.history["steps"]] == list(range(1, 9))
    for a, b in zip(opt.history["steps"], opt2.history["steps"], strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("copy_ms")} == \
               {k: v for k, v in b.items() if not k.startswith("copy_ms")}
    assert "steps" not in GrassAdamW(scenario_model(), **SCENARIO).history  # only when asked for


@pytest.mark.parametrize("value, error", [("step", ValueError), ("events", ValueError), (1, TypeError),
                                          (None, TypeError)])
def test_history_rejects_other_values(value, error):
    with pytest.raises(error, match=r"Invalid history: .* \(expected True, False or 'steps'\)"):
        GrassAdamW(scenario_model(), history=value, **SCENARIO)


def test_history_is_bounded_in_memory_and_in_checkpoints():
    """Issue 11.8: at most history_limit events and per-step records, the most recent; older ones
    counted; the checkpoint does not grow with the run."""
    model = scenario_model()
    opt = GrassAdamW(model, history="steps", history_limit=5, **{**SCENARIO, "switch_every": 1})
    data = batches(2)
    sizes = []
    for _ in range(30):
        train_scenario(model, opt, data, accumulate=1)
        buf = io.BytesIO()
        torch.save(opt.state_dict()["grass"], buf)
        sizes.append(len(buf.getvalue()))
    h = opt.history
    assert len(h["events"]) == 5 and len(h["steps"]) == 5
    assert h["events"][-1]["step"] == opt.num_steps and h["steps"][-1]["step"] == opt.num_steps
    assert h["dropped"]["events"] > 0 and h["dropped"]["steps"] == opt.num_steps - 5
    assert sizes[-1] == sizes[10], "the checkpoint stops growing once the history is full"
    again = GrassAdamW(scenario_model(), history="steps", history_limit=3, **{**SCENARIO, "switch_every": 1})
    again.load_state_dict(round_trip(opt.state_dict()))
    assert [e["step"] for e in again.history["events"]] == [e["step"] for e in h["events"]][-3:]
    assert again.history["dropped"]["events"] == h["dropped"]["events"] + 2


def test_history_limit_is_checked():
    with pytest.raises(ValueError, match=r"Invalid history_limit: 0 \(expected an int >= 1\)"):
        GrassAdamW(scenario_model(), history_limit=0)


def test_resolving_finished_copy_timings_never_waits_on_an_event():
    """The timings of copies that have finished are read without Event.synchronize (step() resolves
    them as they finish, and promises no event synchronisation)."""
    from grass_optim.offload import resolve_timings, timings_ready

    class Finished:
        def query(self):
            return True

        def synchronize(self):
            raise AssertionError("waited on a finished copy")

    class Start:
        def elapsed_time(self, end):
            return 1.5

    raw = [("to_host", 8, Start(), Finished())]
    assert timings_ready(raw)
    assert resolve_timings(raw) == [{"direction": "to_host", "bytes": 8, "ms": 1.5}]

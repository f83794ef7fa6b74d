"""Soak: 20 000 steps on a small model, a redraw every 5 steps, state offloaded, the per-step
history on, the exploration floor on. What must stay flat stays flat: resident memory, host
buffers, the offloader's pending transfers, the history and the checkpoint; every block gets drawn.
The measured drift is printed (``pytest -s``) and recorded in docs/reliability.md."""

from __future__ import annotations

import io
import os

import pytest
import torch

from grass_optim import GrassAdamW
from tests.helpers import batches, loss_fn, make_net

STEPS = 20_000


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _checkpoint_bytes(opt) -> int:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return len(buf.getvalue())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_twenty_thousand_steps_stay_flat():
    model = make_net(d=32, num_layers=6)
    opt = GrassAdamW(model, lr=1e-3, active_layers=2, switch_every=5, probe_steps=3, exploration=0.1,
                     offload="inactive", history="steps", seed=0)
    data = batches(16, d_in=3, batch=8)
    drawn: set[int] = set()
    samples = {}
    for step in range(STEPS):
        x, y = data[step % len(data)]
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        drawn.update(opt.active_layer_indices if not opt.is_probing else ())
        if step + 1 in (6_000, STEPS):  # 6 000: the history is full (1000 events)
            rep = opt.memory_report()
            samples[step + 1] = {"rss": _rss(), "host_buffers": rep.host_buffer_bytes,
                                 "pending": len(opt._offloader._pending),  # noqa: SLF001  (transfers in flight)
                                 "checkpoint": _checkpoint_bytes(opt), "events": len(opt.history["events"]),
                                 "steps": len(opt.history["steps"])}
    a, b = samples[6_000], samples[STEPS]
    print(f"\nsoak {STEPS} steps: RSS {a['rss'] / 2**20:.1f} -> {b['rss'] / 2**20:.1f} MiB; host buffers "
          f"{a['host_buffers']} -> {b['host_buffers']} B; pending transfers {a['pending']} -> {b['pending']}; "
          f"checkpoint {a['checkpoint']} -> {b['checkpoint']} B; history {a['events']}/{a['steps']} -> "
          f"{b['events']}/{b['steps']} events/steps; blocks drawn {sorted(drawn)}")
    assert drawn == set(range(6)), "the exploration floor lets every block be drawn"
    assert b["host_buffers"] == a["host_buffers"] and b["pending"] <= a["pending"] + 6
    assert b["events"] == a["events"] == 1000 and b["steps"] == a["steps"] == 1000
    assert abs(b["checkpoint"] - a["checkpoint"]) <= 0.01 * a["checkpoint"]
    assert b["rss"] - a["rss"] < 8 * 2**20, "resident memory grows by less than 8 MiB over 14 000 steps"

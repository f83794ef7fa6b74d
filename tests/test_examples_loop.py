"""Runs examples/wrap_existing_optimizer.py as a user would, with both kinds of base optimizer."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "wrap_existing_optimizer.py")


@pytest.mark.parametrize("args", [[], ["--optimizer", "sgd", "--steps", "120"]], ids=["adamw", "sgd-short"])
def test_wrap_existing_optimizer_example_runs_and_learns(args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
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

"""benchmarks/dist_memory.py from its command line, ``--quick`` (2 gloo processes on CPU, ~30 s:
``@pytest.mark.slow``). Its numbers are checked on the test pool's ranks, in a few seconds, by
``tests/test_distributed.py::test_gradient_and_state_memory_per_rank_under_ddp_and_fsdp2``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["adamw+ddp", "grass+ddp", "grass+ddp+bucket_view", "grass+ddp+inactive", "adamw+fsdp2", "grass+fsdp2",
           "grass+fsdp2+inactive", "grass+fsdp2+stream"]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_quick_run_prints_one_table_and_writes_json(tmp_path):
    out = tmp_path / "dist_memory.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "benchmarks/dist_memory.py", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert sum(line.startswith("|---") for line in lines) == 1
    assert [row.split("|")[1].strip() for row in lines[2:]] == METHODS
    result = json.loads(out.read_text())
    assert result["command"] == f"python benchmarks/dist_memory.py --quick --out {out}"
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    assert [r["method"] for r in result["ranks"][0]["rows"]] == METHODS
    assert result["environment"]["git"]

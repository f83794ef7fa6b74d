"""The offload benchmark's code path, on CPU with the tiny ``--quick`` model (a few seconds).

The GPU run (``benchmarks/gpu_check.sh``) happens once, on a borrowed machine: whatever would break
there in the table, the JSON or the per-method error handling should break here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench_helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "offload.py"
METHODS = ["adamw", "lisa", "grass", "grass-inactive", "grass-stream", "grass-stream-blocking"]
OFFLOAD = ["grass-inactive", "grass-stream", "grass-stream-blocking"]


def _table_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "offload.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    return proc, out


def test_quick_run_exits_cleanly_with_one_table(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = _table_lines(proc.stdout)
    assert sum(line.startswith("|---") for line in lines) == 1, proc.stdout  # one Markdown table
    rows = lines[2:]
    assert [r.split("|")[1].strip() for r in rows] == METHODS
    for method in METHODS:
        assert method in proc.stdout
    assert "ERROR" not in proc.stdout
    assert "probe_steps=0" in proc.stdout  # the header states the config
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header[:3] == ["method", "peak MiB", "peak reserved MiB"]
    for row in rows:  # CPU: no device peaks
        assert [c.strip() for c in row.split("|")[2:4]] == ["n/a", "n/a"], row


def test_quick_run_json(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["environment"]["torch"] == torch.__version__
    assert result["run"]["probe_steps"] == 0
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == METHODS
    for method, r in rows.items():
        assert r["error"] is None, (method, r.get("traceback"))
        assert r["peak_bytes"] is None  # CPU: no device peak
        assert r["peak_reserved_bytes"] is None
        assert isinstance(r["device_state_bytes"], int) and r["device_state_bytes"] > 0
        assert isinstance(r["tokens_per_s"], float) and r["tokens_per_s"] > 0
        assert set(r["estimate"]) == {"weights", "gradients", "optimizer_state", "total", "in_flight", "peak",
                                      "host_state", "pinned"}
    assert rows["grass"]["ratio_vs_grass"] == pytest.approx(1.0)

    # AdamW: every parameter's two moments, exactly as estimated.
    assert rows["adamw"]["device_state_bytes"] == rows["adamw"]["estimate"]["optimizer_state"]
    # The redraws happened within the run, and the offload modes never hold more than estimated.
    for method in ["lisa", "grass", *OFFLOAD]:
        assert rows[method]["redraws"] >= 2, method
    for method in OFFLOAD:
        r = rows[method]
        assert r["device_state_bytes_max"] <= r["estimate"]["optimizer_state"], method
        assert r["device_state_bytes_max"] < rows["grass"]["device_state_bytes_max"], method
        assert r["memory_report"]["bytes_to_host"] > 0, method
        # Offloading changes where the state lives, not the steps taken: same draws, same weights.
        assert r["same_draws_as_grass"] is True, method
        assert r["deviation_vs_grass"] == 0.0, method


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/offload.py imported in-process."""
    yield from benchmark_module("offload", monkeypatch)


def test_an_error_in_one_method_is_reported_and_the_others_run(bench, monkeypatch, tmp_path, capsys):
    real = bench.make_optimizer

    def failing(method, model, args):
        if method == "grass-inactive":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return real(method, model, args)

    monkeypatch.setattr(bench, "make_optimizer", failing)
    out = tmp_path / "sub" / "offload.json"  # the directory is created
    rc = bench.main(["--device", "cpu", "--quick", "--methods", "adamw,grass-inactive,grass", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 1
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["adamw", "grass-inactive", "grass"]
    assert rows["grass-inactive"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert rows["grass-inactive"]["tokens_per_s"] is None
    assert rows["grass-inactive"]["ratio_vs_grass"] is None
    assert rows["adamw"]["error"] is None and rows["grass"]["error"] is None
    assert rows["adamw"]["ratio_vs_grass"] > 0
    failed = next(line for line in _table_lines(stdout) if line.startswith("| grass-inactive "))
    assert "ERROR OutOfMemoryError" in failed


def test_table_shows_the_allocated_and_the_reserved_peak(bench):
    """The CUDA columns, from a made-up row (the CPU runs above leave them n/a)."""
    mib = 2**20
    est = {"weights": 10 * mib, "gradients": 10 * mib, "optimizer_state": 20 * mib, "total": 40 * mib,
           "in_flight": 8 * mib, "peak": 48 * mib, "host_state": 64 * mib, "pinned": 80 * mib}
    row = {"method": "grass", "peak_bytes": 300 * mib, "peak_reserved_bytes": 512 * mib, "device_state_bytes": mib,
           "device_state_bytes_max": 2 * mib, "tokens_per_s": 1000.0, "ratio_vs_grass": 1.0, "estimate": est,
           "error": None, "blocks_trained": 4, "redraws": 3, "deviation_vs_grass": 0.0}
    failed = {"method": "adamw", "peak_bytes": None, "peak_reserved_bytes": None, "estimate": est,
              "error": "OutOfMemoryError: CUDA out of memory"}
    lines = bench.table({"rows": [row, failed]}, "MiB").splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    error = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert len(cells) == len(error) == len(header)
    assert dict(zip(header, cells, strict=True))["peak MiB"] == "300.00"
    assert dict(zip(header, cells, strict=True))["peak reserved MiB"] == "512.00"
    assert dict(zip(header, cells, strict=True))["est. peak w+g+s+in flight MiB"] == "48.00"
    assert error[1:3] == ["—", "—"] and error[-1].startswith("ERROR OutOfMemoryError")

"""The speed benchmark's code path, on CPU with its tiny ``--quick`` sizes (~45 s on 2 shared cores).

Timing ratios are not asserted (the machines are shared and noisy); the structure of the tables and
the JSON is, and so are the memory numbers that do not depend on timing: every method measured, the
estimates present, and the tensor accounting of the optimizer state equal to the estimate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench_helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"
TIME_METHODS = ["adamw", "grass-all", "grass", "lisa"]
MEMORY_METHODS = ["adamw", "lisa", "grass", "grass-inactive", "grass-stream"]
OFFLOAD = ["grass-inactive", "grass-stream"]
TABLE_HEADERS = {
    "time": "| size (params) | method | ms/step [25–75 %] | vs AdamW [25–75 %] |",
    "memory": "| method | steps (blocks trained) | device state MiB: MemoryReport max / est. |",
    "scaling": "| varies | L | width | γ | params M | AdamW ms | GRASS ms | GRASS / AdamW [25–75 %] |",
    "refresh": "| size (params) | step | ms/step [25–75 %] | vs GRASS step [25–75 %] |",
}
ESTIMATE_KEYS = {"weights", "gradients", "optimizer_state", "total", "in_flight", "peak", "host_state", "pinned"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sub" / "speed.json"  # the directory is created
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=170, cwd=ROOT, env=_env())
    return proc, out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_run_exits_cleanly_with_four_tables(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert sum(line.startswith("|---") for line in lines) == 4, out  # one Markdown table per section
    for name, header in TABLE_HEADERS.items():
        assert any(line.startswith(header) for line in lines), (name, out)
    assert "ERROR" not in out
    # The header states the machine and the exact settings.
    for text in ("- date: ", "- CPU: ", "logical cores", f"torch {torch.__version__}", "torch.set_num_threads(",
                 "probe_steps=0", "active_layers=16", "sampler='uniform'", "batch ", "switch_every=",
                 "MALLOC_MMAP_THRESHOLD_"):
        assert text in out, text
    # One row per (size, method) in the time table, one per method in the memory table.
    time_table, memory_table, scaling_table, refresh_table = _tables(out)
    assert [row[1] for row in time_table] == TIME_METHODS * 3
    assert [row[0] for row in memory_table] == MEMORY_METHODS
    assert len(scaling_table) == 8
    assert [row[1] for row in refresh_table] == ["GRASS step (γ = 2)", "refresh_all measure step", "probing step",
                                                 "AdamW step (for scale)"]
    assert all(row[5].replace(".", "").isdigit() for row in refresh_table), "a peak RSS for every kind of step"


def _tables(stdout: str) -> list[list[list[str]]]:
    """The body rows of each Markdown table, as lists of stripped cells."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in stdout.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            if not previous.startswith("|"):
                tables.append([])  # a header row
            else:
                tables[-1].append([c.strip() for c in line.strip().strip("|").split("|")])
        previous = line
    return tables


def test_quick_run_json(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["quick"] is True
    env = result["environment"]
    assert env["torch"] == torch.__version__
    assert env["threads"] >= 1 and env["cpu_model"]
    assert set(result["sections"]) == {"time", "memory", "scaling", "refresh"}

    # time: every method at every size, with numbers (their values are not asserted: noisy machine)
    sec = result["sections"]["time"]
    assert len(sec["rows"]) == 3
    for row in sec["rows"]:
        assert list(row["methods"]) == TIME_METHODS
        assert row["model"]["num_layers"] == 16 and row["model"]["params"] > 0
        for m, s in row["methods"].items():
            assert all(_number(s[k]) and s[k] > 0 for k in ("median_ms", "q25_ms", "q75_ms", "ratio_median",
                                                             "ratio_q25", "ratio_q75")), m
            assert s["steps_timed"] == sec["config"]["repeats"] * sec["config"]["steps_per_slot"]
            assert set(s["phases_median_ms"]) == {"forward", "backward", "step", "zero_grad", "total"}
        assert row["methods"]["adamw"]["ratio_median"] == pytest.approx(1.0)
        assert row["methods"]["adamw"]["blocks_trained"] is None
        assert row["methods"]["grass-all"]["blocks_trained"] == 16

    # memory: numbers for every method, next to the estimates
    sec = result["sections"]["memory"]
    rows = {r["method"]: r for r in sec["rows"]}
    assert list(rows) == MEMORY_METHODS
    for m, r in rows.items():
        assert r["error"] is None, (m, r.get("traceback"))
        assert set(r["runs"]) == set(sec["config"]["malloc"]) and r["runs"], m
        assert set(r["estimate"]) == ESTIMATE_KEYS and all(_number(v) and v >= 0 for v in r["estimate"].values()), m
        assert all(r["estimate"][k] > 0 for k in ("weights", "gradients", "optimizer_state")), m
        assert r["estimate"]["total"] == sum(r["estimate"][k] for k in ("weights", "gradients", "optimizer_state"))
        assert r["blocks_visited"] == r["num_layers"], m  # the state crept to every block
        for run in r["runs"].values():
            for k in ("peak_rss", "rss_before_build", "rss_after_build", "train_peak_bytes", "estimate_device_gs",
                      "estimate_ram_gs", "error_train", "error_wgs", "residual_bytes"):
                assert _number(run[k]), (m, k)
            assert run["peak_rss"] >= run["rss_after_build"] > run["rss_before_build"] > 0, m
            assert run["train_peak_bytes"] > 0, m
        # Offloaded state is RAM too on CPU: the RAM prediction adds the host buffers.
        if m in OFFLOAD:
            assert r["estimate_host_buffers"] > 0 and r["host_buffer_bytes_max"] == r["estimate_host_buffers"], m
            assert r["estimate_ram_gs"] == r["estimate_device_gs"] + r["estimate_host_buffers"], m
        else:
            assert r["estimate_host_buffers"] == 0 and r["estimate_ram_gs"] == r["estimate_device_gs"], m
    # Tensor accounting (not timing): the state on the "device" is what estimate_memory predicts...
    for m in ["adamw", "lisa", "grass", "grass-inactive"]:
        assert rows[m]["device_state_bytes_max"] == rows[m]["estimate"]["optimizer_state"], m
    # ... and "stream" holds less between steps than the two blocks the estimate bounds inside step().
    assert 0 < rows["grass-stream"]["device_state_bytes_max"] < rows["grass-stream"]["estimate"]["optimizer_state"]
    assert rows["adamw"]["estimate"]["gradients"] > rows["grass"]["estimate"]["gradients"]

    # scaling: L, gamma and width each vary around the base
    sec = result["sections"]["scaling"]
    varies = [r["vary"] for r in sec["rows"]]
    assert varies.count("base") == 1 and {"L", "γ", "width"} <= set(varies)
    for r in sec["rows"]:
        assert list(r["methods"]) == ["adamw", "grass"]
        assert _number(r["methods"]["grass"]["ratio_median"])
        assert set(r["estimate"]) == {"adamw", "grass", "grass-stream"}
        assert r["estimate"]["adamw"] > r["estimate"]["grass"] > r["estimate"]["grass-stream"] > 0

    # refresh: the measure-every-block step and the probing step against an ordinary GRASS step
    sec = result["sections"]["refresh"]
    for r in sec["rows"]:
        assert list(r["methods"]) == ["grass", "grass-measure-all", "grass-probing"]
        assert r["methods"]["grass"]["ratio_median"] == 1.0
        assert all(_number(m["ratio_median"]) for m in r["methods"].values())
    assert set(sec["memory"]) == {"adamw", "grass", "grass-measure-all", "grass-probing"}
    assert all(m["train_peak_bytes"] > 0 for m in sec["memory"].values())


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/speed.py imported in-process."""
    yield from benchmark_module("speed", monkeypatch)


def test_helpers(bench):
    assert bench.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert bench.quantile([5.0], 0.25) == 5.0
    configs = bench.scaling_configs(bench.PRESETS["scaling"][0])
    keys = [(c["layers"], c["width"], c["active_layers"]) for c in configs]
    assert len(keys) == len(set(keys)) == 8  # the base appears once
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "time,bogus"])
    args = bench.parse_args(["--sections", "memory", "--malloc", "mmap"])
    assert args.sections == ["memory"] and args.malloc == ["mmap"]

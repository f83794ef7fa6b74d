"""GrassAdamW under Hugging Face Accelerate (docs/guides/accelerate.md): examples/hf_accelerate.py on
1 process (in this one) and on 2 gloo processes under torchrun, with and without the DDP setting GRASS needs.
~25 s on 2 CPU cores (each torchrun starts 2 fresh processes).
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys

import pytest
import torch.distributed as dist

pytest.importorskip("accelerate")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

from tests.dist_helpers import ROOT, free_port  # noqa: E402

SCRIPT = "examples/hf_accelerate.py"


def run(*args: str, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port",
              str(free_port()), SCRIPT]
    return subprocess.run([*launch, "--quick", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step\s+\d+ \| loss ([\d.]+)", out, re.M)]


def check_run(out: str, processes: int) -> None:
    assert f"{processes} process(es), 30 steps" in out, out
    assert "parameters identical on all processes: True" in out, out
    assert len(losses(out)) == 3
    actives = re.findall(r"active (\(.*\))", out)
    assert len(set(actives)) >= 2, out  # the active set changed: blocks were frozen and unfrozen


def test_example_accelerate_one_process(monkeypatch, capsys):
    """In this process (no process group: Accelerate does not wrap the model)."""
    monkeypatch.setattr(sys, "argv", ["hf_accelerate.py", "--quick"])
    runpy.run_path(str(ROOT / SCRIPT), run_name="__main__")
    check_run(capsys.readouterr().out, 1)


def test_example_accelerate_two_processes():
    proc = run(processes=2)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    check_run(proc.stdout, 2)


def test_accelerate_without_find_unused_parameters_is_refused_before_any_update():
    """Accelerate's default DDP (find_unused_parameters=False), GrassAdamW built before prepare():
    GrassAdamW's first step names the Accelerate setting, with the parameters untouched (before:
    DDP's "Expected to have finished reduction" a step after the first freeze)."""
    proc = run("--without-kwargs", processes=2)
    assert proc.returncode != 0
    assert "Expected to have finished reduction" not in proc.stdout + proc.stderr
    line = next((x for x in proc.stdout.splitlines() if x.startswith("GrassAdamW refused")), "")
    assert "at step 1 (parameters unchanged: True)" in line, proc.stdout + proc.stderr[-4000:]
    assert "DistributedDataParallelKwargs(find_unused_parameters=True)" in line
    assert "DistributedDataParallel(model, find_unused_parameters=True)" in line


@pytest.mark.slow  # ~20 s: a torchrun of two Trainer runs
def test_trainer_ddp_with_activation_checkpointing(tmp_path):
    """GrassTrainer under the Trainer's DDP. Activation checkpointing makes the Trainer build DDP with
    find_unused_parameters=False: refused at GrassAdamW's first step, parameters untouched, the error
    naming ddp_find_unused_parameters=True; with that setting the processes train and agree."""
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "tests/hf_ddp_script.py", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    results = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    errors = [x for x in results if x.startswith("RESULT default")]
    assert len(errors) == 2 and all("steps=0 unchanged=True same=True error=Invalid model" in x for x in errors), \
        proc.stdout
    assert all("TrainingArguments(ddp_find_unused_parameters=True)" in x for x in errors)
    assert [x for x in results if x.startswith("RESULT find_unused")] == [
        f"RESULT find_unused rank={r} steps=8 unchanged=False same=True error=None" for r in (0, 1)], proc.stdout

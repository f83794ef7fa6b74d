"""benchmarks/gpu_check.sh and benchmarks/cuda_mutations.py, without a GPU.

The GPU check runs once, on a borrowed machine with no network and no pip, under a hard time limit:
whatever would break there (a network probe, an install, a missing output file, a stale mutation)
should break here first. The dry run is cut off from the network with ``unshare -rn`` where the
machine allows unprivileged user namespaces (skipped where it does not; the text checks still run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RUNNER = ROOT / "benchmarks" / "cuda_mutations.py"


# ----------------------------------------------------------------------------- gpu_check.sh, as text
def test_gpu_check_names_no_network_host_and_installs_nothing():
    text = SCRIPT.read_text()
    index = "py" "pi"  # in two parts, so that this file does not name it either
    for word in (index, "pip install", "pip_", "-m pip", "socket", "http", "curl", "wget", "online"):
        assert word not in text.lower(), word
    assert "set -uo pipefail" in text
    assert "BENCH_ARGS" in text


def test_gpu_check_stage_limits_fit_the_600_s_command_limit():
    """The stage limits (and the kill grace after each) add up to well under 600 s."""
    text = SCRIPT.read_text()
    limits = {k: int(v) for k, v in re.findall(r"^([A-Z_]+_TIMEOUT)=(\d+)", text, re.M)}
    grace = int(re.search(r"^KILL_AFTER=(\d+)", text, re.M).group(1))
    assert {"ENV_TIMEOUT", "TESTS_TIMEOUT", "MUTATIONS_TIMEOUT", "BENCH_TIMEOUT"} <= set(limits)
    assert sum(limits.values()) + grace * len(limits) <= 540, limits
    budget = float(re.search(r"--budget (\d+)", text).group(1))
    assert budget < limits["MUTATIONS_TIMEOUT"]  # the runner stops itself before it is killed


# ----------------------------------------------------------------------------- the dry run
def _network_cut() -> list[str]:
    """``unshare -rn`` (a new user and network namespace: no network at all) where it works, else nothing."""
    if shutil.which("unshare") is None:
        return []
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ["unshare", "-rn"] if ok else []


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of this repository: its committed files only."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    dest = tmp_path_factory.mktemp("gpu_check") / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=60)
    return dest


def _gpu_check(clone: Path, out: Path, bench_args: str, path_prefix: Path | None = None):
    """Run gpu_check.sh in ``clone`` without PYTHONPATH and, where possible, without network."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT", "BENCH_ARGS", "PYTHON", "GIT_COMMIT")}
    env.update(BENCH_ARGS=bench_args, OUT=str(out))
    python3 = shutil.which("python3")
    if python3 is None or os.path.realpath(python3) != os.path.realpath(sys.executable):
        env["PYTHON"] = sys.executable  # the script's default is python3: the same one where it is this one
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    cut = _network_cut()
    t0 = time.perf_counter()
    proc = subprocess.run([*cut, "bash", "benchmarks/gpu_check.sh"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, bool(cut), time.perf_counter() - t0


@pytest.fixture(scope="module")
def dry_run(clone):
    """The CPU dry run: BENCH_ARGS="--device cpu --quick" (about 10 s)."""
    out = clone.parent / "out"
    proc, cut, seconds = _gpu_check(clone, out, "--device cpu --quick")
    return proc, out, cut, seconds


def test_dry_run_succeeds_and_writes_the_log_and_the_json(dry_run):
    proc, out, _, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cuda_mutations.json", "gpu_check.json", "gpu_check.log", "offload.json"], names
    log = (out / "gpu_check.log").read_text()
    assert "CUDA tests: skipped: no CUDA" in log
    assert "| grass-stream " in log  # the benchmark's table
    offload = json.loads((out / "offload.json").read_text())
    assert offload["complete"] is True and all(r["error"] is None for r in offload["rows"])
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] is True
    assert summary["cuda_available"] is False
    assert summary["cuda_tests"]["status"] == "skipped: no CUDA"
    assert summary["cuda_tests"]["skipped"] > 0 and summary["cuda_tests"]["passed"] == 0
    assert summary["benchmark"]["status"] == "ok"
    assert summary["mutations"]["rc"] == 0
    assert summary["versions"]["torch"] and summary["versions"]["python"]
    assert summary["git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                   text=True).stdout.strip()
    assert summary["started"] <= summary["finished"]
    mutations = json.loads((out / "cuda_mutations.json").read_text())
    assert mutations["ok"] is True
    for m in mutations["mutations"]:  # without CUDA every valid mutation is skipped; none is invalid
        assert m["status"] == "skipped", m


def test_dry_run_ran_without_network(dry_run):
    """The dry run above passed inside a network namespace of its own: nothing it does needs the network."""
    proc, _, cut, _ = dry_run
    if not cut:
        pytest.skip("unshare -rn does not work here: the dry run had the network")
    assert proc.returncode == 0


# ----------------------------------------------------------------------------- the mutation runner
@pytest.fixture
def runner(monkeypatch):
    """benchmarks/cuda_mutations.py imported in-process (registered: its dataclasses need the module)."""
    spec = importlib.util.spec_from_file_location("cuda_mutations_under_test", RUNNER)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_runner_imports_without_torch():
    code = f"import sys; sys.modules['torch'] = None; import runpy; runpy.run_path({str(RUNNER)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


MODULE = '''\
def add(a, b):
    total = a + b
    return total


def scale(x):
    unused = x  # a line no test notices
    return 2 * x
'''

TESTS = '''\
import pytest

import mod

MUTATIONS = {mutations}


def test_add():
    assert mod.add(1, 2) == 3


def test_scale():
    assert mod.scale(2) == 4


@pytest.mark.skip(reason="needs a CUDA device")
def test_skipped():
    assert mod.add(1, 2) == 3


def test_broken():
    assert mod.add(1, 1) == 3
'''


def _project(tmp_path: Path, mutations: list[tuple[str, str, str]] | None) -> Path:
    root = tmp_path / "project"
    (root / "tests").mkdir(parents=True)
    (root / "mod.py").write_text(MODULE)
    text = TESTS.format(mutations=repr(mutations))
    if mutations is None:
        text = text.replace("MUTATIONS = None\n", "")
    (root / "tests" / "test_cuda.py").write_text(text)
    return root


def _run(runner, root: Path, *extra: str) -> tuple[int, dict]:
    out = root.parent / "mutations.json"
    rc = runner.main(["--root", str(root), "--test-file", "tests/test_cuda.py", "--out", str(out),
                      "--python", sys.executable, "--timeout", "60", *extra])
    return rc, json.loads(out.read_text())


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_runner_classifies_caught_not_caught_and_invalid(runner, tmp_path, capsys, jobs):
    root = _project(tmp_path, [
        ("test_add", "mod.py", "total = a + b"),  # removing it breaks add: caught
        ("test_scale", "mod.py", "unused = x"),  # nothing notices: NOT caught
        ("test_add", "mod.py", "no such line"),  # invalid: matched 0 lines
        ("test_add", "mod.py", "return"),  # invalid: matched 2 lines
        ("test_add", "mod.py", "def scale(x):"),  # invalid: `pass` there leaves an indented body
        ("test_add", "nothere.py", "x"),  # invalid: no such file
        ("test_missing", "mod.py", "total = a + b"),  # invalid: no such test
        ("test_broken", "mod.py", "total = a + b"),  # the test fails unmutated
        ("test_skipped", "mod.py", "total = a + b"),  # skipped (fine: no CUDA expected)
    ])
    before = (root / "mod.py").read_text()
    rc, result = _run(runner, root, "--expect-cuda", "no", "--jobs", jobs)  # 3: side by side, same outcome
    assert rc == 1
    assert result["ok"] is False
    status = [m["status"] for m in result["mutations"]]
    assert status[:2] == ["caught", "NOT caught"]
    assert status[2] == "invalid: matched 0 lines"
    assert status[3].startswith("invalid: matched 2 lines")
    assert status[4].startswith("invalid: the mutated file does not parse")
    assert status[5] == "invalid: no file nothere.py"
    assert status[6].startswith("invalid: no test test_missing")
    assert status[7] == "baseline fails"
    assert status[8] == "skipped"
    assert [m["ok"] for m in result["mutations"]] == [True] + [False] * 7 + [True]
    caught = result["mutations"][0]
    assert caught["line"] == 2 and caught["original"] == "total = a + b" and caught["baseline"] == "passes"
    assert "NameError" in caught["output_tail"]
    assert (root / "mod.py").read_text() == before  # the checkout itself is never touched
    table = capsys.readouterr().out
    assert "| test_scale | mod.py:7 | `unused = x  # a line no test notices` | passes | NOT caught |" in table


@pytest.mark.parametrize(("expect_cuda", "rc"), [("no", 0), ("yes", 1)])
def test_runner_exit_status_and_skips(runner, tmp_path, expect_cuda, rc):
    root = _project(tmp_path, [("test_add", "mod.py", "total = a + b"), ("test_skipped", "mod.py", "return total")])
    got, result = _run(runner, root, "--expect-cuda", expect_cuda)
    assert got == rc
    assert [m["status"] for m in result["mutations"]] == ["caught", "skipped"]
    assert result["cuda"] is (expect_cuda == "yes")


def test_runner_budget(runner, tmp_path):
    root = _project(tmp_path, [("test_add", "mod.py", "total = a + b")])
    rc, result = _run(runner, root, "--budget", "0")
    assert rc == 1
    assert result["mutations"][0]["status"] == "not run: budget"


def test_runner_without_mutations(runner, tmp_path, capsys):
    root = _project(tmp_path, None)
    rc, result = _run(runner, root)
    assert rc == 0
    assert result["ok"] is True and result["mutations"] == []
    assert "declares no MUTATIONS" in result["problem"]
    assert runner.main(["--root", str(root), "--list"]) == 0
    assert "declares no MUTATIONS" in capsys.readouterr().out


def test_runner_list(runner, tmp_path, capsys):
    root = _project(tmp_path, [("test_add", "mod.py", "total = a + b")])
    assert runner.main(["--root", str(root), "--list"]) == 0
    assert capsys.readouterr().out.strip() == "test_add\tmod.py\ttotal = a + b"


def test_apply_mutation_keeps_indentation_and_line_endings(runner, tmp_path):
    (tmp_path / "m.py").write_bytes(b"def f():\r\n    if True:\r\n        x = 1\r\n    return 2\r\n")
    m = runner.Mutation("test_f", "m.py", "x = 1")
    assert runner.apply_mutation(tmp_path, m) is None
    assert (tmp_path / "m.py").read_bytes() == b"def f():\r\n    if True:\r\n        pass\r\n    return 2\r\n"
    assert (m.line, m.original) == (3, "x = 1")
    assert runner.apply_mutation(tmp_path, runner.Mutation("t", "../m.py", "x")).startswith("invalid: ../m.py is")


def test_the_repository_mutations_are_well_formed(runner, tmp_path):
    """Every entry of tests/test_cuda.py's MUTATIONS names a test there and removes exactly one line,
    leaving a file that parses (what the GPU run would report as invalid, found here)."""
    declared = runner.read_mutations(ROOT / "tests" / "test_cuda.py")
    if declared.problem and not declared.fatal:
        pytest.skip(declared.problem)
    assert not declared.problem, declared.problem
    for k, m in enumerate(declared.mutations):
        assert m.status == "pending", (m.test, m.status)
        assert m.test.split("::")[0].split("[")[0] in declared.test_names, m.test
        copy = tmp_path / str(k) / m.file
        copy.parent.mkdir(parents=True)
        shutil.copy2(ROOT / m.file, copy)
        assert runner.apply_mutation(tmp_path / str(k), m) is None, (m.file, m.substring)


def test_with_a_gpu_torch_cannot_see_skipped_cuda_tests_fail(clone, tmp_path):
    """nvidia-smi lists a GPU but torch has no CUDA (a CPU-only torch, say): the skips are a failure."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'name, memory.total [MiB], memory.used [MiB], driver_version'\n"
                    "echo 'NVIDIA H200, 143771 MiB, 0 MiB, 570.00'\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc, _, _ = _gpu_check(clone, out, "--device cpu --quick --methods adamw", path_prefix=bin_dir)
    # The CUDA tests' bit; the mutations' bit too where tests/test_cuda.py declares MUTATIONS (all skipped).
    assert proc.returncode in (1, 3), proc.stdout[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["cuda_expected"] is True and summary["cuda_available"] is False
    assert summary["gpu"] == "NVIDIA H200"
    assert summary["cuda_tests"]["status"] == "all skipped although CUDA is present"
    assert summary["exit_status"] == proc.returncode and summary["ok"] is False
    assert summary["mutations"]["ok"] is (not summary["mutations"].get("results"))
    assert summary["benchmark"]["status"] == "ok"

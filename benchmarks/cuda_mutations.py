"""Mutation check of the CUDA tests: does each test fail when the line it guards is removed?

    python3 benchmarks/cuda_mutations.py             # on the GPU machine (benchmarks/gpu_check.sh runs it)
    python3 benchmarks/cuda_mutations.py --list      # print the mutations, run nothing

``tests/test_cuda.py`` declares a module-level constant, read here with ``ast`` (never imported)::

    MUTATIONS = [
        # (test node name, file relative to the repository root, a substring of exactly one line)
        ("test_prefetch_target_outlives_a_stalled_copy", "grass_optim/offload.py",
         "d.record_stream(self._to_device)"),
    ]

First the unmutated tests run once, together, in a copy of the checkout (the baseline: each must
pass). Then, for each mutation, a fresh copy has that one line replaced by ``pass`` at the same
indentation and ``pytest -x tests/test_cuda.py::<test>`` runs there, with PYTHONPATH pointing at the
copy. Results:

- ``caught``: the test failed (pytest exit 1), as it should;
- ``NOT caught``: the test ran and passed with the line gone;
- ``skipped``: the test was skipped (no CUDA); acceptable only where there is no CUDA;
- ``invalid: ...``: the substring matched no line or several, the file or test does not exist, or the
  mutated file does not parse;
- ``baseline fails``: the unmutated test did not pass, so the mutation proves nothing;
- ``error: ...``: pytest could not run (timeout, collection error, ...);
- ``not run: budget``: ``--budget`` seconds were spent before its turn.

Prints a Markdown table and writes JSON (``--out``, rewritten after each mutation). Exit status 0 when
every mutation is caught (or, without CUDA, skipped), 1 otherwise; 0 with an empty table when the
test file declares no MUTATIONS. Standard library only: torch is imported by the tests, never here.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import datetime as _dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEST_FILE = "tests/test_cuda.py"
CONSTANT = "MUTATIONS"
IGNORED = (".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache", ".venv",
           "*.egg-info", "*.pyc")
TAIL = 2000  # characters of pytest output kept per run


# ----------------------------------------------------------------------------- reading MUTATIONS
@dataclass
class Mutation:
    test: str
    file: str
    substring: str
    status: str = "pending"
    ok: bool = False
    line: int | None = None  # 1-based, in the unmutated file
    original: str | None = None  # the line that was replaced (stripped)
    baseline: str | None = None
    seconds: float | None = None
    pytest_rc: int | None = None
    output_tail: str | None = None

    @property
    def label(self) -> str:
        return f"{self.test} / {self.file}"


@dataclass
class Declared:
    mutations: list[Mutation] = field(default_factory=list)
    problem: str | None = None  # why there is nothing to run (no constant, file missing, not a literal)
    fatal: bool = False  # the problem is a defect (exit 1), not just an absence (exit 0)
    test_names: set[str] = field(default_factory=set)  # top-level functions and classes of the test file


def read_mutations(test_file: Path) -> Declared:
    """The MUTATIONS constant of ``test_file``, parsed, not imported."""
    if not test_file.is_file():
        return Declared(problem=f"{test_file} does not exist", fatal=True)
    try:
        tree = ast.parse(test_file.read_text(encoding="utf-8"), filename=str(test_file))
    except SyntaxError as err:
        return Declared(problem=f"{test_file} does not parse: {err}", fatal=True)
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    value = None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == CONSTANT for t in targets) and node.value is not None:
            value = node.value  # the last assignment wins, as on import
    if value is None:
        return Declared(problem=f"{test_file} declares no {CONSTANT} constant: nothing to check", test_names=names)
    try:
        entries = ast.literal_eval(value)
    except ValueError:
        return Declared(problem=f"{CONSTANT} in {test_file} is not a literal (line {value.lineno})", fatal=True,
                        test_names=names)
    if not isinstance(entries, (list, tuple)):
        return Declared(problem=f"{CONSTANT} in {test_file} is not a list", fatal=True, test_names=names)
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(x, str) for x in entry):
            out.append(Mutation(*entry))
        else:
            m = Mutation(test=f"<entry {i}>", file="?", substring=repr(entry))
            m.status = "invalid: not a tuple of three strings"
            out.append(m)
    return Declared(mutations=out, test_names=names)


# ----------------------------------------------------------------------------- the copies
def _tracked_files(root: Path) -> list[str] | None:
    """Files git knows of or would add (tracked + untracked-not-ignored), or None without git."""
    if not (root / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [p for p in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def copy_checkout(root: Path, dest: Path) -> Path:
    """Copy the checkout at ``root`` into the new directory ``dest``: the files git lists where there is
    a usable .git, else everything but .git, caches and benchmarks/results."""
    files = _tracked_files(root)
    if files is None:
        def ignore(directory: str, names: list[str]) -> set[str]:
            skip = set(shutil.ignore_patterns(*IGNORED)(directory, names))
            if Path(directory).resolve() == (root / "benchmarks").resolve():
                skip.add("results")
            return skip

        shutil.copytree(root, dest, ignore=ignore, symlinks=True)
        return dest
    dest.mkdir(parents=True)
    for rel in files:
        src = root / rel
        if src.is_symlink() or src.is_file():  # deleted-but-tracked files and submodules are left out
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target, follow_symlinks=False)
    return dest


def apply_mutation(copy_root: Path, m: Mutation) -> str | None:
    """Replace the one line of ``m.file`` containing ``m.substring`` by ``pass`` (same indentation).

    Returns None on success (``m.line`` and ``m.original`` filled in), else why it is invalid."""
    path = (copy_root / m.file).resolve()
    if copy_root.resolve() not in path.parents:
        return f"invalid: {m.file} is outside the checkout"
    if not path.is_file():
        return f"invalid: no file {m.file}"
    with open(path, encoding="utf-8", newline="") as f:  # keep the line endings as they are
        text = f.read()
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if m.substring in line]
    if len(hits) != 1:
        where = f" (lines {', '.join(str(i + 1) for i in hits[:10])})" if hits else ""
        return f"invalid: matched {len(hits)} lines{where}"
    i = hits[0]
    line = lines[i]
    body = line.rstrip("\r\n")
    indent = body[: len(body) - len(body.lstrip())]
    m.line, m.original = i + 1, body.strip()
    lines[i] = indent + "pass" + line[len(body):]
    mutated = "".join(lines)
    if path.suffix == ".py":
        try:
            ast.parse(mutated, filename=m.file)
        except SyntaxError as err:
            return f"invalid: the mutated file does not parse (line {err.lineno}: {err.msg})"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(mutated)
    return None


def source_digest(root: Path, dirs: tuple[str, ...] = ("grass_optim", "tests", "benchmarks")) -> str:
    """sha256 over the .py and .sh files under ``dirs`` (paths and contents, sorted): which code ran,
    where a copy has no .git to ask."""
    h = hashlib.sha256()
    for d in dirs:
        for path in sorted((root / d).rglob("*")):
            if path.suffix in (".py", ".sh") and path.is_file() and "__pycache__" not in path.parts:
                h.update(path.relative_to(root).as_posix().encode() + b"\0")
                h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- running pytest
@dataclass
class Run:
    rc: int | None  # None: stopped by the timeout
    outcomes: dict[str, str]  # junit testcase name -> passed / failed / error / skipped
    tail: str
    seconds: float


def _child_env(copy_root: Path, original_root: Path) -> dict[str, str]:
    """PYTHONPATH = the copy, then the caller's entries minus the original checkout (which would shadow it)."""
    env = dict(os.environ)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != original_root.resolve()]
    env["PYTHONPATH"] = os.pathsep.join([str(copy_root), *keep])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _junit_outcomes(path: Path) -> dict[str, str]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    out: dict[str, str] = {}
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        outcome = ("failed" if "failure" in tags else "error" if "error" in tags
                   else "skipped" if "skipped" in tags else "passed")
        name = case.get("name", "?")
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        key = f"{cls}::{name}" if cls[:1].isupper() else name  # methods of test classes: "TestX::test_y"
        if out.get(key) not in ("failed", "error"):  # a teardown error after a pass counts
            out[key] = outcome
    return out


def run_pytest(python: str, copy_root: Path, original_root: Path, test_file: str, nodes: list[str],
               timeout: float, stop_first: bool) -> Run:
    with tempfile.TemporaryDirectory(prefix="cuda_mutations_junit_") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *(["-x"] if stop_first else []), *[f"{test_file}::{n}" for n in nodes]]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=copy_root, env=_child_env(copy_root, original_root), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and whatever it started
            output, _ = proc.communicate()
            rc = None
        except BaseException:  # stopped from outside (SIGTERM from `timeout`, Ctrl-C): leave no test running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return Run(rc, _junit_outcomes(junit), (output or "")[-TAIL:], time.perf_counter() - t0)


def node_outcome(run: Run, node: str) -> str:
    """passes / fails / skipped / not run, over the junit cases of one node (all its parametrisations)."""
    found = [o for name, o in run.outcomes.items() if name == node or name.startswith(node + "[")]
    if not found:
        return "not run"
    if any(o in ("failed", "error") for o in found):
        return "fails"
    if all(o == "skipped" for o in found):
        return "skipped"
    return "passes"


def package_origins(python: str, copy_root: Path, original_root: Path, packages: list[str]) -> dict[str, str]:
    """Where each top-level package is imported from with the copy's environment (find_spec: nothing runs)."""
    code = ("import importlib.util, json, sys\n"
            "out = {}\n"
            "for name in sys.argv[1:]:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    out[name] = None if spec is None else spec.origin\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([python, "-c", code, *packages], cwd=copy_root, env=_child_env(copy_root, original_root),
                          capture_output=True, text=True, timeout=60, check=False)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {p: f"(could not check: {proc.stderr.strip()[-300:]})" for p in packages}


def cuda_available(python: str) -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return False
    return proc.stdout.strip().endswith("True")


# ----------------------------------------------------------------------------- the check
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT), help="the checkout to copy (default: this repository)")
    p.add_argument("--test-file", default=DEFAULT_TEST_FILE,
                   help=f"the test file declaring {CONSTANT}, relative to --root (default {DEFAULT_TEST_FILE})")
    p.add_argument("--out", default=None, help="JSON output (default: <root>/benchmarks/results/cuda_mutations.json)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per pytest run (default 60)")
    p.add_argument("--budget", type=float, default=110.0,
                   help="seconds for everything; later mutations are reported 'not run: budget' (default 110)")
    p.add_argument("--jobs", type=int, default=1, help="mutations run at once, each in its own process (default 1)")
    p.add_argument("--expect-cuda", choices=("auto", "yes", "no"), default="auto",
                   help="whether a skipped test is a failure: yes (it is), no (it is not), auto (ask torch, "
                        "in a subprocess, when a test was skipped)")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable, help="the Python running pytest")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--digest", action="store_true",
                   help="print the sha256 of the checkout's grass_optim/, tests/ and benchmarks/ sources and exit")
    args = p.parse_args(argv)
    args.root = Path(args.root).resolve()
    if args.out is None:
        args.out = str(args.root / "benchmarks" / "results" / "cuda_mutations.json")
    return args


def table(mutations: list[Mutation]) -> str:
    header = ["test", "file:line", "line removed", "baseline", "result", "s"]
    rows = []
    for m in mutations:
        where = f"{m.file}:{m.line}" if m.line else m.file
        line = m.original if m.original is not None else m.substring
        rows.append([m.test, where, f"`{line}`", m.baseline or "—", m.status,
                     "—" if m.seconds is None else f"{m.seconds:.1f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    result: dict[str, Any] = {"root": str(args.root), "test_file": args.test_file, "python": args.python,
                              "started": now(), "finished": None, "seconds": None, "budget_s": args.budget,
                              "timeout_s": args.timeout, "expect_cuda": args.expect_cuda,
                              "cuda": None if args.expect_cuda == "auto" else args.expect_cuda == "yes",
                              "problem": None, "ok": False, "counts": {}, "mutations": []}
    out = Path(args.out)

    def save(final: bool = False) -> None:
        result["mutations"] = [asdict(m) for m in declared.mutations]
        counts: dict[str, int] = {}
        for m in declared.mutations:
            key = m.status.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        result["counts"] = counts
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        if final:
            result["finished"] = now()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    def left() -> float:
        return deadline - time.perf_counter()

    declared = read_mutations(args.root / args.test_file)
    result["problem"] = declared.problem
    if declared.problem:
        print(declared.problem, flush=True)
        result["ok"] = not declared.fatal
        save(final=True)
        return result
    mutations = declared.mutations
    for m in mutations:
        base = m.test.split("::")[0].split("[")[0]
        if m.status == "pending" and base not in declared.test_names:
            m.status = f"invalid: no test {base} in {args.test_file}"

    with tempfile.TemporaryDirectory(prefix="cuda_mutations_") as tmp_dir:
        tmp = Path(tmp_dir)
        pristine = copy_checkout(args.root, tmp / "baseline")
        print(f"{len(mutations)} mutations of {args.test_file}; checkout copied to {tmp} "
              f"(budget {args.budget:.0f} s, {args.timeout:.0f} s per run)", flush=True)

        # Mutations that cannot apply are known before anything runs.
        for m in mutations:
            if m.status == "pending":
                probe = tmp / "probe"
                target = probe / m.file
                if (pristine / m.file).is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(pristine / m.file, target)
                problem = apply_mutation(probe, m)
                if problem:
                    m.status = problem
                shutil.rmtree(probe, ignore_errors=True)

        # The copy must be what the tests import: an installed package of the same name would hide the mutation.
        packages = sorted({Path(m.file).parts[0] for m in mutations
                           if m.status == "pending" and len(Path(m.file).parts) > 1
                           and (pristine / Path(m.file).parts[0] / "__init__.py").is_file()})
        if packages:
            origins = package_origins(args.python, pristine, args.root, packages)
            for pkg, origin in origins.items():
                if origin is None or not Path(origin).resolve().is_relative_to(pristine.resolve()):
                    for m in mutations:
                        if m.status == "pending" and Path(m.file).parts[0] == pkg:
                            m.status = f"error: {pkg} is imported from {origin}, not from the copy"

        # Baseline: every named test, unmutated, in one run (then one by one if that run broke down).
        nodes = list(dict.fromkeys(m.test for m in mutations if m.status == "pending"))
        baseline: dict[str, str] = {}
        if nodes and left() > 5:
            run = run_pytest(args.python, pristine, args.root, args.test_file, nodes,
                             min(left(), args.timeout * len(nodes)), stop_first=False)
            print(f"baseline: pytest exit {run.rc} in {run.seconds:.1f} s", flush=True)
            if run.rc in (0, 1):
                baseline = {n: node_outcome(run, n) for n in nodes}
                for m in mutations:
                    if m.status == "pending" and baseline[m.test] != "passes":
                        m.output_tail = run.tail
            else:
                print(run.tail, flush=True)
                for n in nodes:
                    if len(nodes) == 1:
                        one = run  # nothing to learn from running it again
                    elif left() <= 5:
                        break
                    else:
                        one = run_pytest(args.python, pristine, args.root, args.test_file, [n],
                                         min(left(), args.timeout), stop_first=False)
                    baseline[n] = node_outcome(one, n) if one.rc in (0, 1) else (
                        "timed out" if one.rc is None else f"error (pytest exit {one.rc})")
                    if baseline[n] != "passes":
                        for m in mutations:
                            if m.test == n and m.status == "pending":
                                m.output_tail = one.tail
        for m in mutations:
            if m.status == "pending" and m.test in baseline:
                m.baseline = baseline[m.test]

        skipped_any = any(m.baseline == "skipped" for m in mutations)
        if args.expect_cuda == "auto":
            result["cuda"] = cuda_available(args.python) if skipped_any else None
        else:
            result["cuda"] = args.expect_cuda == "yes"
        save()

        lock = threading.Lock()

        def run_one(k: int, m: Mutation) -> None:
            copy = copy_checkout(args.root, tmp / f"m{k}")
            problem = apply_mutation(copy, m)
            if problem:  # cannot happen after the probe above, unless the checkout changed meanwhile
                m.status = problem
            else:
                limit = min(left(), args.timeout)
                run = run_pytest(args.python, copy, args.root, args.test_file, [m.test], limit, stop_first=True)
                m.seconds, m.pytest_rc, m.output_tail = round(run.seconds, 1), run.rc, run.tail
                outcome = node_outcome(run, m.test)
                if run.rc is None:
                    m.status = ("not run: budget (stopped)" if limit < args.timeout
                                else f"error: timed out after {args.timeout:.0f} s")
                elif run.rc == 1:
                    m.status = "caught"
                elif run.rc == 0 and outcome == "passes":
                    m.status = "NOT caught"
                elif run.rc == 0 and outcome == "skipped":
                    m.status = "skipped"
                else:
                    m.status = f"error: pytest exit {run.rc}, test {outcome}"
            shutil.rmtree(copy, ignore_errors=True)
            finish(k, m)

        def finish(k: int, m: Mutation) -> None:
            with lock:
                m.ok = m.status == "caught" or (m.status == "skipped" and not result["cuda"])
                print(f"[{k}/{len(mutations)}] {m.label}: {m.status}", flush=True)
                save()

        to_run = []
        for k, m in enumerate(mutations, 1):
            if m.status != "pending":
                pass
            elif m.baseline is None:
                m.status = "not run: budget"
            elif m.baseline == "skipped":
                m.status = "skipped"
            elif m.baseline != "passes":
                m.status = "baseline fails"
            elif left() <= 5:
                m.status = "not run: budget"
            else:
                to_run.append((k, m))
                continue
            finish(k, m)
        # Mutations run side by side (--jobs): each in its own copy and process, so one's stalls and
        # allocations cannot hide another's missing wait; the device has room for several.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for future in [pool.submit(run_one, k, m) for k, m in to_run]:
                future.result()

    result["ok"] = all(m.ok for m in mutations)
    save(final=True)
    return result


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_pytest, which kills the running test


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.digest:
        print(source_digest(args.root))
        return 0
    if args.list:
        declared = read_mutations(args.root / args.test_file)
        if declared.problem:
            print(declared.problem)
        for m in declared.mutations:
            print(f"{m.test}\t{m.file}\t{m.substring}")
        return 1 if declared.fatal else 0
    result = check(args)
    mutations = [Mutation(**m) for m in result["mutations"]]
    print()
    print(table(mutations))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(result["counts"].items())) or "no mutations"
    print(f"\n{summary}; CUDA: {result['cuda']}; {result['seconds']} s; "
          f"{'OK' if result['ok'] else 'FAILED'}\nJSON: {args.out}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())

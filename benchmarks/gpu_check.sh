#!/usr/bin/env bash
# GPU check for grass_optim, offline: the CUDA tests, the mutation check of those tests, then the offload
# benchmark, in one go.
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh      # from the repository root, on the GPU machine
#
# Needs no network and installs nothing: python3 (or $PYTHON) with torch, pytest and hypothesis; this
# checkout goes first on PYTHONPATH. Writes into ${OUT:-benchmarks/results}:
#   gpu_check.log        everything printed here
#   gpu_check.json       summary: each stage's outcome, versions, GPU, git commit, start and end times
#   cuda_mutations.json  benchmarks/cuda_mutations.py: is each MUTATIONS entry of tests/test_cuda.py caught?
#   offload.json         benchmarks/offload.py (rewritten after each method: a run cut short keeps its rows)
# Every stage has a time limit; together (printed as the budget) they stay under 540 s.
# BENCH_ARGS adds arguments to the benchmark: BENCH_ARGS="--device cpu --quick" is a dry run without a
# GPU, where the CUDA tests are skipped, which is a failure only where there is CUDA.
# GIT_COMMIT names the commit when the checkout has no .git.
# Exit status: 0 when all is well, else the sum of 1 (CUDA tests failed; with CUDA, also: all skipped
# or none found), 2 (a mutation not caught, invalid or not run; with CUDA, also: skipped), 4 (the
# benchmark failed); 8 when the script cannot start at all.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR" || exit 8
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
cd "$ROOT" || exit 8

PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

# Stage limits in seconds; each stage gets KILL_AFTER more to stop after SIGTERM.
ENV_TIMEOUT=30        # versions and devices (imports torch)
SMI_TIMEOUT=10        # nvidia-smi
TESTS_TIMEOUT=140     # pytest -m cuda tests/test_cuda.py
MUTATIONS_TIMEOUT=110 # benchmarks/cuda_mutations.py (4 at once), which stops itself after --budget 100
BENCH_TIMEOUT=220     # benchmarks/offload.py
SUMMARY_TIMEOUT=10    # gpu_check.json
KILL_AFTER=3
BUDGET=$((ENV_TIMEOUT + SMI_TIMEOUT + TESTS_TIMEOUT + MUTATIONS_TIMEOUT + BENCH_TIMEOUT + SUMMARY_TIMEOUT + 6 * KILL_AFTER))

with_timeout() {  # with_timeout SECONDS CMD...: run CMD, stopped after SECONDS where `timeout` exists
    local secs="$1"; shift
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after="$KILL_AFTER" "$secs" "$@"
    else
        "$@"
    fi
}

section() { printf '\n== %s  [%s, %ss in]\n' "$1" "$(date -u +%H:%M:%S)" "$SECONDS"; }

main() {
    local work expect_cuda test_rc mut_rc bench_rc status=0 t
    work="$(mktemp -d)" || return 8
    trap 'rm -rf "$work"' EXIT
    export GC_STARTED GC_ROOT="$ROOT" GC_OUT="$OUT_DIR" GC_WORK="$work" GC_BUDGET="$BUDGET"
    GC_STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    export GC_GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    export GC_GIT_DIRTY
    GC_GIT_DIRTY="$(git status --porcelain 2>/dev/null | wc -l | tr -d ' ')" || GC_GIT_DIRTY=unknown
    [ -d .git ] || [ -f .git ] || GC_GIT_DIRTY=unknown

    section "gpu_check in $ROOT, output in $OUT_DIR ($GC_STARTED)"
    echo "git commit: $GC_GIT_COMMIT (changed files: $GC_GIT_DIRTY)"
    echo "budget: ${BUDGET}s at most = env ${ENV_TIMEOUT} + nvidia-smi ${SMI_TIMEOUT} + CUDA tests ${TESTS_TIMEOUT}" \
         "+ mutations ${MUTATIONS_TIMEOUT} + benchmark ${BENCH_TIMEOUT} + summary ${SUMMARY_TIMEOUT}" \
         "+ 6 x ${KILL_AFTER} to stop"
    echo "PYTHONPATH=$PYTHONPATH"
    echo "BENCH_ARGS=${BENCH_ARGS:-}"
    if ! command -v "$PY" >/dev/null 2>&1; then
        echo "no Python: '$PY' is not a command (set PYTHON)"
        return 8
    fi

    section "devices: nvidia-smi (limit ${SMI_TIMEOUT}s)"
    if command -v nvidia-smi >/dev/null 2>&1 && with_timeout "$SMI_TIMEOUT" nvidia-smi \
            --query-gpu=name,memory.total,memory.used,driver_version --format=csv >"$work/nvidia_smi.txt"; then
        cat "$work/nvidia_smi.txt"
    else
        : >"$work/nvidia_smi.txt"
        echo "nvidia-smi is not installed or failed: no GPU listed"
    fi

    section "versions (limit ${ENV_TIMEOUT}s)"
    with_timeout "$ENV_TIMEOUT" "$PY" - "$work/env.json" <<'EOF' || echo "the environment probe failed"
import importlib, importlib.metadata, json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_total_bytes=props.total_memory)
except Exception as err:
    info["torch_error"] = f"{type(err).__name__}: {err}"
for name in ("pytest", "hypothesis", "transformers", "peft"):
    try:
        info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        info[name] = None
try:
    import grass_optim
    info["grass_optim"] = getattr(grass_optim, "__version__", None)
    info["grass_optim_file"] = grass_optim.__file__
    here = os.path.realpath(os.path.join(os.environ["GC_ROOT"], "grass_optim"))
    info["grass_optim_from_checkout"] = os.path.realpath(os.path.dirname(grass_optim.__file__)) == here
except Exception as err:
    info["grass_optim_error"] = f"{type(err).__name__}: {err}"
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
for k, v in info.items():
    print(f"{k}: {v}")
if info.get("grass_optim_from_checkout") is False:
    print("WARNING: grass_optim is imported from another installation, not from this checkout")
EOF

    expect_cuda=no
    if grep -q '"cuda_available": true' "$work/env.json" 2>/dev/null; then expect_cuda=yes; fi
    if [ "$(wc -l <"$work/nvidia_smi.txt")" -gt 1 ]; then  # a header and a line per GPU
        expect_cuda=yes  # a GPU torch cannot see (a CPU-only torch, say) must not turn the tests into skips
    fi
    export GC_EXPECT_CUDA="$expect_cuda"
    echo "CUDA expected: $expect_cuda"

    section "CUDA tests: pytest -m cuda tests/test_cuda.py (limit ${TESTS_TIMEOUT}s)"
    t=$SECONDS
    with_timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider \
        --junitxml="$work/cuda_tests.xml" tests/test_cuda.py
    test_rc=$?
    export GC_TESTS_RC="$test_rc" GC_TESTS_S=$((SECONDS - t))
    with_timeout "$SUMMARY_TIMEOUT" "$PY" - "$work/cuda_tests.xml" "$work/cuda_tests.json" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
rc, cuda = int(os.environ["GC_TESTS_RC"]), os.environ["GC_EXPECT_CUDA"] == "yes"
counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
try:
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
        tags = {c.tag for c in case}
        key = "failed" if "failure" in tags else "errors" if "error" in tags else "skipped" if "skipped" in tags \
            else "passed"
        counts[key] += 1
except (OSError, ET.ParseError):
    pass
ok = False
if rc in (124, 137):
    status = "timed out"
elif rc == 0 and counts["passed"]:
    status, ok = "passed", True
elif rc == 0 and counts["skipped"]:
    status, ok = ("all skipped although CUDA is present", False) if cuda else ("skipped: no CUDA", True)
elif rc == 5 or (rc == 0 and not any(counts.values())):
    status = "no tests collected"
else:
    status = f"failed (pytest exit {rc})"
result = {"status": status, "ok": ok, "rc": rc, **counts, "seconds": int(os.environ["GC_TESTS_S"])}
json.dump(result, open(sys.argv[2], "w"), indent=2)
print(f"CUDA tests: {status}; " + ", ".join(f"{v} {k}" for k, v in counts.items()))
sys.exit(0 if ok else 1)
EOF
    [ $? -eq 0 ] || status=$((status | 1))

    section "mutations: benchmarks/cuda_mutations.py (limit ${MUTATIONS_TIMEOUT}s)"
    t=$SECONDS
    with_timeout "$MUTATIONS_TIMEOUT" "$PY" benchmarks/cuda_mutations.py --budget 100 --timeout 60 --jobs 4 \
        --expect-cuda "$expect_cuda" --python "$PY" --out "$OUT_DIR/cuda_mutations.json"
    mut_rc=$?
    export GC_MUT_RC="$mut_rc" GC_MUT_S=$((SECONDS - t))
    case "$mut_rc" in
        0) echo "mutations: OK" ;;
        124|137) echo "the mutation check ran past ${MUTATIONS_TIMEOUT}s and was stopped" ;;
        *) echo "mutations: FAILED (exit $mut_rc)" ;;
    esac
    [ "$mut_rc" -eq 0 ] || status=$((status | 2))

    section "benchmark: benchmarks/offload.py ${BENCH_ARGS:-} (limit ${BENCH_TIMEOUT}s)"
    t=$SECONDS
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    with_timeout "$BENCH_TIMEOUT" "$PY" benchmarks/offload.py --out "$OUT_DIR/offload.json" ${BENCH_ARGS:-}
    bench_rc=$?
    export GC_BENCH_RC="$bench_rc" GC_BENCH_S=$((SECONDS - t))
    case "$bench_rc" in
        0) ;;
        124|137) echo "the benchmark ran past ${BENCH_TIMEOUT}s and was stopped (finished rows are in offload.json)" ;;
        *) echo "the benchmark exited with $bench_rc (a method failed: see its row, or the traceback above)" ;;
    esac
    [ "$bench_rc" -eq 0 ] || status=$((status | 4))

    section "summary"
    export GC_STATUS="$status" GC_SECONDS="$SECONDS" GC_FINISHED
    GC_FINISHED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    with_timeout "$SUMMARY_TIMEOUT" "$PY" - <<'EOF' || echo "writing gpu_check.json failed"
import json, os, subprocess, sys
e = os.environ
work, out = e["GC_WORK"], e["GC_OUT"]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

env = load(os.path.join(work, "env.json")) or {}
try:
    smi = open(os.path.join(work, "nvidia_smi.txt")).read().strip().splitlines()
except OSError:
    smi = []
tests = load(os.path.join(work, "cuda_tests.json")) or {"status": "did not run", "ok": False,
                                                        "rc": int(e["GC_TESTS_RC"])}
mut = load(os.path.join(out, "cuda_mutations.json"))
mut_rc = int(e["GC_MUT_RC"])
mutations = {"rc": mut_rc, "ok": mut_rc == 0, "seconds": int(e["GC_MUT_S"])}
if mut:
    mutations.update(counts=mut.get("counts"), problem=mut.get("problem"),
                     results=[{k: m.get(k) for k in ("test", "file", "line", "status", "ok")}
                              for m in mut.get("mutations", [])])
bench_rc = int(e["GC_BENCH_RC"])
bench = load(os.path.join(out, "offload.json"))
benchmark = {"status": "ok" if bench_rc == 0 else "timed out" if bench_rc in (124, 137) else f"failed (exit {bench_rc})",
             "rc": bench_rc, "seconds": int(e["GC_BENCH_S"]), "args": e.get("BENCH_ARGS", "")}
if bench:
    keys = ("method", "error", "tokens_per_s", "peak_bytes", "peak_reserved_bytes")
    benchmark.update(complete=bench.get("complete"), rows=[{k: r.get(k) for k in keys} for r in bench.get("rows", [])])
digest = subprocess.run([sys.executable, "benchmarks/cuda_mutations.py", "--digest"], capture_output=True,
                        text=True, cwd=e["GC_ROOT"]).stdout.strip() or None
status = int(e["GC_STATUS"])
summary = {
    "ok": status == 0, "exit_status": status,
    "started": e["GC_STARTED"], "finished": e["GC_FINISHED"], "seconds": int(e["GC_SECONDS"]),
    "budget_s": int(e["GC_BUDGET"]),
    "git_commit": e["GC_GIT_COMMIT"], "git_changed_files": e["GC_GIT_DIRTY"], "source_sha256": digest,
    "cuda_available": env.get("cuda_available"), "cuda_expected": e["GC_EXPECT_CUDA"] == "yes",
    "gpu": env.get("gpu") or (smi[1].split(",")[0].strip() if len(smi) > 1 else None), "nvidia_smi": smi,
    "versions": {k: env.get(k) for k in ("python", "torch", "torch_cuda", "pytest", "hypothesis", "transformers",
                                         "peft", "grass_optim")},
    "grass_optim_file": env.get("grass_optim_file"), "environment_errors": {
        k: env[k] for k in ("torch_error", "grass_optim_error") if k in env},
    "cuda_tests": tests, "mutations": mutations, "benchmark": benchmark,
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"CUDA tests: {tests['status']}")
print(f"mutations:  {'OK' if mutations['ok'] else 'FAILED'} {mutations.get('counts') or ''}")
print(f"benchmark:  {benchmark['status']}")
print(f"{summary['seconds']}s of the {summary['budget_s']}s budget; exit status {status}")
EOF
    echo "files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
    return "$status"
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"

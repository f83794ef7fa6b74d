#!/usr/bin/env bash
# GPU check for grass_optim: the CUDA tests, then the offload benchmark, in one go.
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh      # from the repository root, on the GPU machine
#
# Writes ${OUT:-benchmarks/results}/gpu_check.log (everything printed here) and
# ${OUT:-benchmarks/results}/offload.json (the benchmark; rewritten after each method, so a run cut
# short still leaves the finished rows). Every stage has a timeout: about 8 minutes at most.
# BENCH_ARGS adds arguments to the benchmark (e.g. BENCH_ARGS="--device cpu --quick" for a dry run
# without a GPU). Exit status: non-zero when the CUDA tests failed (or could not run) or the benchmark failed; the
# benchmark runs either way.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
cd "$ROOT" || exit 2

PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

# Stage limits in seconds (tests + benchmark + installs stay under ~8 minutes).
TESTS_TIMEOUT=180
BENCH_TIMEOUT=300
PIP_TIMEOUT=60

with_timeout() {  # with_timeout SECONDS CMD...: run CMD, killed after SECONDS where `timeout` exists
    local secs="$1"; shift
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=10 "$secs" "$@"
    else
        "$@"
    fi
}

section() { printf '\n== %s  [%s]\n' "$1" "$(date -u +%H:%M:%S)"; }

# grass_optim importable from a neutral directory, and from this checkout (not some other install)?
grass_from_here() {
    local where
    where="$(cd / && "$PY" -c 'import os, grass_optim; print(os.path.realpath(os.path.dirname(grass_optim.__file__)))' 2>/dev/null)" || return 1
    [ "$where" = "$(realpath "$ROOT/grass_optim")" ]
}

online() { with_timeout 8 "$PY" -c 'import socket; socket.create_connection(("pypi.org", 443), 5).close()' >/dev/null 2>&1; }

pip_quiet() { with_timeout "$PIP_TIMEOUT" "$PY" -m pip install -q --disable-pip-version-check --timeout 10 --retries 1 "$@"; }

main() {
    local test_rc bench_rc net
    section "gpu_check in $ROOT, output in $OUT_DIR ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -20

    section "devices"
    nvidia-smi -L || echo "nvidia-smi -L failed"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null || true

    section "versions"
    echo "python: $PY ($("$PY" --version 2>&1))"
    "$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")' \
        || echo "importing torch failed"

    section "grass_optim"
    net=no
    if online; then net=yes; fi
    echo "package index reachable: $net"
    if ! grass_from_here; then
        echo "grass_optim is not importable from this checkout: pip install -q -e . --no-deps"
        if [ "$net" = yes ]; then
            pip_quiet -e . --no-deps || echo "pip install -e . failed"
        fi
        if ! grass_from_here; then  # offline: build with the installed setuptools
            pip_quiet -e . --no-deps --no-build-isolation || echo "pip install -e . --no-build-isolation failed"
        fi
        if ! grass_from_here; then
            export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
            echo "falling back to PYTHONPATH=$PYTHONPATH"
        fi
    fi
    (cd / && "$PY" -c 'import grass_optim; print("grass_optim", grass_optim.__version__, "from", grass_optim.__file__)') \
        || echo "grass_optim is still not importable"

    section "test dependencies"
    if ! "$PY" -c 'import pytest, hypothesis' >/dev/null 2>&1; then
        if [ "$net" = yes ]; then
            pip_quiet pytest hypothesis || echo "pip install pytest hypothesis failed"
        else
            echo "pytest/hypothesis missing and no package index reachable"
        fi
    fi
    "$PY" -c 'import pytest; print("pytest", pytest.__version__)' 2>/dev/null || echo "pytest: not installed"
    "$PY" -c 'import hypothesis; print("hypothesis", hypothesis.__version__)' 2>/dev/null || echo "hypothesis: not installed"

    section "CUDA tests: pytest -q -m cuda tests/test_cuda.py (limit ${TESTS_TIMEOUT}s)"
    if [ ! -f tests/test_cuda.py ]; then
        echo "tests/test_cuda.py does not exist"
        test_rc=4
    elif ! "$PY" -c 'import pytest' >/dev/null 2>&1; then
        echo "pytest is not installed: the CUDA tests cannot run"
        test_rc=3
    else
        with_timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
        test_rc=$?
        case "$test_rc" in
            0) ;;
            5) echo "pytest collected no cuda-marked tests (exit 5): counted as a failure" ;;
            124|137) echo "pytest ran past ${TESTS_TIMEOUT}s and was stopped" ;;
            *) echo "pytest failed (exit $test_rc)" ;;
        esac
    fi

    section "benchmark: benchmarks/offload.py (limit ${BENCH_TIMEOUT}s)"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    with_timeout "$BENCH_TIMEOUT" "$PY" benchmarks/offload.py --out "$OUT_DIR/offload.json" ${BENCH_ARGS:-}
    bench_rc=$?
    case "$bench_rc" in
        0) ;;
        124|137) echo "the benchmark ran past ${BENCH_TIMEOUT}s and was stopped (finished rows are in offload.json)" ;;
        *) echo "the benchmark exited with $bench_rc (a method failed: see its row, or the traceback above)" ;;
    esac

    section "summary"
    echo "CUDA tests: $([ "$test_rc" -eq 0 ] && echo PASS || echo "FAIL (exit $test_rc)")"
    echo "benchmark:  $([ "$bench_rc" -eq 0 ] && echo OK || echo "FAIL (exit $bench_rc)")"
    echo "log: $LOG"
    echo "json: $OUT_DIR/offload.json"
    if [ "$test_rc" -ne 0 ]; then return 1; fi
    if [ "$bench_rc" -ne 0 ]; then return 2; fi
    return 0
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"

"""Importing a benchmark script in-process, for tests of its helpers.

The scripts under ``benchmarks/`` import their siblings (``harness``, ``llama``, ``tasks``) by plain
name, so the directory goes on ``sys.path`` (through pytest's ``monkeypatch``, which restores it) and
the siblings leave ``sys.modules`` afterwards, so that each test file gets fresh ones.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def benchmark_module(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Yield ``benchmarks/<name>.py`` as a module (use with ``yield from`` in a fixture)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for sibling in ("harness", "llama", "tasks"):
        sys.modules.pop(sibling, None)

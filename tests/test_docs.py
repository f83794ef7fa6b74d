"""The documentation's code runs: every ``python`` block of docs/api.md, in order, in one namespace
(as the page says), on the CPU."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_api_reference_snippets_run_in_order():
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S)
    assert len(blocks) >= 10
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/api.md block {i}", "exec"), namespace)  # noqa: S102
    printed = out.getvalue()
    assert "('layers.0', 'layers.1', 'layers.2', 'layers.3') True (0, 1, 2, 3)" in printed
    assert "[(0, 1), (0, 1), (2, 3), (2, 3), (0, 1), (0, 1)]" in printed
    assert "10 20 inactive" in printed
    assert "4 4 True 4" in printed  # the DCP checkpoint round trip
    assert "{'active_layers': 2, 'switch_every': 20, 'probe_steps': 5}" in printed  # grass_settings

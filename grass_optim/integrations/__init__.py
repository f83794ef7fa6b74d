"""Integrations with training frameworks.

Nothing here imports a framework until it is used: ``import grass_optim.integrations`` stays cheap
and works without ``transformers`` installed. ``GrassCallback`` and ``add_grass_callback`` load
``grass_optim.integrations.hf`` (and so ``transformers``) on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only: never executed
    from .hf import GrassCallback, add_grass_callback, find_grass_optimizer, grass_metrics

__all__ = ["GrassCallback", "add_grass_callback", "find_grass_optimizer", "grass_metrics"]

_HF = {"GrassCallback", "add_grass_callback", "find_grass_optimizer", "grass_metrics"}


def __getattr__(name: str) -> Any:
    if name in _HF:
        value = getattr(importlib.import_module(".hf", __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

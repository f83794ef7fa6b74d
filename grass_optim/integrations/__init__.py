"""Integrations with training frameworks.

Nothing here imports a framework until it is used: ``import grass_optim.integrations`` stays cheap
and works without ``transformers`` installed. ``GrassCallback``, ``add_grass_callback``, ``GrassTrainer`` and
``GrassTrainerMixin`` load ``transformers`` on first access; ``grass_settings`` and ``grass_enabled``
never do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only: never executed
    from .hf import GrassCallback, add_grass_callback, find_grass_optimizer, grass_metrics
    from .settings import grass_enabled, grass_settings
    from .trainer import GrassTrainer, GrassTrainerMixin

__all__ = ["GrassCallback", "GrassTrainer", "GrassTrainerMixin", "add_grass_callback", "find_grass_optimizer",
           "grass_enabled", "grass_metrics", "grass_settings"]

# name -> the submodule that defines it (imported on first access)
_LAZY = {"GrassCallback": ".hf", "add_grass_callback": ".hf", "find_grass_optimizer": ".hf", "grass_metrics": ".hf",
         "GrassTrainer": ".trainer", "GrassTrainerMixin": ".trainer", "grass_settings": ".settings",
         "grass_enabled": ".settings"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""GRASS's settings from a config: a dict, or a YAML/JSON file, as config-driven stacks write them.

:func:`grass_settings` turns what a user wrote (GrassAdamW's own keyword names, or the names LISA
and BAdam use in LMFlow, Axolotl and LLaMA-Factory) into GrassAdamW's keyword arguments, checked
before any model exists. The optimizer's hyperparameters (learning rate, betas, eps, weight decay)
are not GRASS settings: under the Trainer they come from its ``TrainingArguments``.

Imports neither ``transformers`` nor ``yaml`` until asked to (PyYAML only to read a ``.yaml`` file).
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..optimizer import GRASS_DEFAULTS, GRASS_KWARGS, check_grass_settings

__all__ = ["ALIASES", "SETTINGS", "SWITCHES", "grass_enabled", "grass_settings"]

# Other tools' names for the same settings (LMFlow and Axolotl's LISA, LLaMA-Factory's BAdam). They
# name the schedule only: the sampler stays GRASS's unless `sampler` says otherwise ("uniform" is LISA).
ALIASES = {
    "lisa_activated_layers": "active_layers",  # LMFlow
    "lisa_n_layers": "active_layers",  # Axolotl
    "lisa_interval_steps": "switch_every",  # LMFlow
    "lisa_step_interval": "switch_every",  # Axolotl
    "lisa_layers_attribute": "layers",  # Axolotl
    "switch_block_every": "switch_every",  # LLaMA-Factory (BAdam)
}

# On/off switches, as the config-driven stacks write them (LMFlow's --use_lisa, LLaMA-Factory's
# --use_badam): they turn layer-wise training on or off (grass_enabled), and set nothing else.
SWITCHES = ("use_grass", "use_lisa", "use_badam")

# Set by the Trainer's arguments (or by the base optimizer), not by GRASS.
_OPTIMIZER_OWNED = {"lr": "learning_rate", "learning_rate": "learning_rate", "betas": "adam_beta1, adam_beta2",
                    "eps": "adam_epsilon", "weight_decay": "weight_decay", "base_optimizer": "optim",
                    "grad_scaler": "fp16 (the Trainer's own GradScaler)"}

# GrassAdamW's keyword arguments that a config can set: everything but the model and what
# _OPTIMIZER_OWNED names. Read from the signature, so a new GrassAdamW setting is accepted here at once.
SETTINGS = tuple(name for name in GRASS_KWARGS if name not in _OPTIMIZER_OWNED)


def grass_settings(source: Mapping[str, Any] | str | os.PathLike[str] | None = None, *,
                   key: str | None = None) -> dict[str, Any]:
    """GrassAdamW's keyword arguments from a config, validated.

    Args:
        source: a mapping, or the path of a ``.yaml``/``.yml`` (needs PyYAML) or ``.json`` file
            holding one; ``None`` for GrassAdamW's defaults (``{}``).
        key (str, optional): take the settings from this entry of the mapping (e.g. ``"grass"`` in a
            larger training config) instead of the whole mapping.

    Returns:
        A new dict with GrassAdamW's own names (``active_layers``, ``switch_every``, ``layers``, ...):
        ``GrassAdamW(model, lr=..., **grass_settings(...))``.

    Raises:
        ValueError: an unknown key (with the closest known names), two names for one setting with
            different values (``lisa_n_layers: 2`` and ``active_layers: 4``), an optimizer
            hyperparameter (set ``learning_rate`` etc. in the ``TrainingArguments``), or a value
            GrassAdamW would refuse.
        TypeError: ``source`` or a value of the wrong type.
        ImportError: a YAML file without PyYAML installed.
    """
    raw = _entry(source, key)
    grass_enabled(raw)  # the switches are checked too, though they set nothing here
    settings: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise TypeError(f"Invalid GRASS setting name: {name!r} (expected a string)")
        if name in SWITCHES:
            continue
        if name in _OPTIMIZER_OWNED:
            raise ValueError(
                f"Invalid GRASS setting: {name!r} is the optimizer's, not GRASS's: set it in the TrainingArguments "
                f"({_OPTIMIZER_OWNED[name]}), or pass it to GrassAdamW directly when not using the Trainer")
        canonical = ALIASES.get(name, name)
        if canonical not in SETTINGS:
            close = difflib.get_close_matches(name, list(SETTINGS) + list(ALIASES), n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(f"Invalid GRASS setting: {name!r} is unknown ({hint}known: {', '.join(SETTINGS)}; "
                             f"aliases: {', '.join(f'{a} -> {c}' for a, c in ALIASES.items())})")
        if canonical in settings and settings[canonical] != value:
            raise ValueError(f"Invalid GRASS settings: {given_as[canonical]!r}={settings[canonical]!r} and "
                             f"{name!r}={value!r} both set {canonical}; keep one")
        settings[canonical] = value
        given_as.setdefault(canonical, name)
    check_settings(settings)
    return settings


def grass_enabled(source: Mapping[str, Any] | str | os.PathLike[str] | None = None, *,
                  key: str | None = None) -> bool:
    """Whether a config turns GRASS on: ``False`` when it sets ``use_grass`` (or ``use_lisa``,
    ``use_badam``) to ``false``, ``True`` otherwise (no switch means on). ``source`` and ``key`` as
    for :func:`grass_settings`.

    Raises:
        TypeError: a switch that is not a bool.
        ValueError: two switches that disagree.
    """
    raw = _entry(source, key)
    given = {name: raw[name] for name in SWITCHES if name in raw}
    for name, value in given.items():
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {name}: {value!r} (expected true or false)")
    if len(set(given.values())) > 1:
        raise ValueError(f"Invalid GRASS settings: the switches disagree ({given}); keep one")
    return all(given.values())


def _entry(source: Any, key: str | None) -> Mapping[str, Any]:
    """The mapping of settings: ``source`` read (:func:`_load`), or its ``key`` entry."""
    raw = _load(source)
    if key is None:
        return raw
    if key not in raw:
        raise ValueError(f"Invalid key: {key!r} is not in the config (it has {sorted(map(str, raw))})")
    entry = raw[key]
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise TypeError(f"Invalid config: the {key!r} entry is a {type(entry).__name__} (expected a mapping)")
    return entry


def check_settings(settings: Mapping[str, Any]) -> None:
    """The checks GrassAdamW makes of these values that need no model (``active_layers`` against
    the number of blocks and ``layers`` against the model wait for it)."""
    checked = inspect.signature(check_grass_settings).parameters
    check_grass_settings(**{name: settings.get(name, GRASS_DEFAULTS[name]) for name in checked})
    layers = settings.get("layers")
    if layers is not None and not isinstance(layers, (str, list, tuple)):
        raise TypeError(f"Invalid layers: {layers!r} (expected a dotted path such as 'model.layers', or a list "
                        "of them)")


def _load(source: Any) -> Mapping[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Invalid source: {type(source).__name__} (expected a mapping, or the path of a YAML or "
                        "JSON file)")
    path = Path(source)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ImportError("grass_settings: reading a YAML file needs PyYAML (pip install pyyaml, or "
                              "grass_optim[integrations]); or pass the settings as a dict") from err
        data = yaml.safe_load(text)
    else:
        raise ValueError(f"Invalid source: {str(path)!r} (expected a .yaml, .yml or .json file)")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TypeError(f"Invalid config: {str(path)!r} holds a {type(data).__name__} (expected a mapping)")
    return data

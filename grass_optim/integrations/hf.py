"""Hugging Face ``transformers.Trainer`` integration: GRASS's schedule as ordinary Trainer metrics.

``GrassAdamW`` needs nothing from this module to train under the Trainer: pass it as
``Trainer(..., optimizers=(GrassAdamW(model, ...), None))``, or let ``GrassTrainer``
(``trainer.py``) build it. This module adds :class:`GrassCallback`,
which writes the active blocks, the sampling probabilities, the importance scores and the optimizer
state memory into every training log, so that TensorBoard, W&B and the other ``report_to``
integrations record them like the loss. See ``docs/guides/hf_trainer.md``.

With ``trainer.py``, the only modules of ``grass_optim`` that import ``transformers``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

from ..optimizer import GrassAdamW

logger = logging.getLogger(__name__)

__all__ = ["GrassCallback", "add_grass_callback", "find_grass_optimizer", "grass_metrics"]

PREFIX = "grass/"


def find_grass_optimizer(optimizer: Any) -> GrassAdamW | None:
    """The ``GrassAdamW`` inside ``optimizer``, or ``None``.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, and wrappers built like it) until
    a ``GrassAdamW`` is found.
    """
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, GrassAdamW):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def grass_metrics(optimizer: GrassAdamW, *, per_block: bool = True, prefix: str = PREFIX) -> dict[str, float]:
    """Scalar metrics describing ``optimizer``'s state now (after its last ``step()``).

    Keys (``<i>`` is the block index, as in ``optimizer.layer_names``):

    * ``grass/probing``: 1.0 while probing, else 0.0;
    * ``grass/num_steps``: ``optimizer.num_steps`` (probing steps included);
    * ``grass/state_device_bytes``, ``grass/state_host_bytes``: optimizer state on the device and
      parked on the host (``MemoryReport.device_state_bytes`` / ``host_state_bytes``);
    * with ``per_block``: ``grass/active/<i>`` (1.0 for the blocks the next steps train, all
      trainable blocks while probing), ``grass/p/<i>`` (sampling probability) and
      ``grass/importance/<i>`` (score; absent while the block has none yet, i.e. while it is NaN).

    Reads only small CPU tensors and tensor sizes: no device synchronisation.
    """
    report = optimizer.memory_report()
    out = {
        f"{prefix}probing": float(optimizer.is_probing),
        f"{prefix}num_steps": float(optimizer.num_steps),
        f"{prefix}state_device_bytes": float(report.device_state_bytes),
        f"{prefix}state_host_bytes": float(report.host_state_bytes),
    }
    if per_block:
        active = set(optimizer.active_layer_indices)
        probabilities = optimizer.probabilities.tolist()
        importance = optimizer.importance.tolist()
        for i in range(optimizer.num_layers):
            out[f"{prefix}active/{i}"] = 1.0 if i in active else 0.0
            out[f"{prefix}p/{i}"] = float(probabilities[i])
            if math.isfinite(importance[i]):
                out[f"{prefix}importance/{i}"] = float(importance[i])
    return out


class GrassCallback(TrainerCallback):
    """Adds :func:`grass_metrics` of the Trainer's ``GrassAdamW`` to each training log.

    The optimizer is the one the Trainer passes to its callbacks (accelerate's wrapper is unwrapped);
    if it is not a ``GrassAdamW``, the callback warns once and does nothing. Evaluation logs (those
    with a key starting with ``eval_``) are left alone. The metrics also go into the log's entry of
    ``trainer.state.log_history`` (and so ``trainer_state.json``).

    Callbacks see a log in order and the Trainer puts those passed as ``callbacks=`` *after* its
    reporting integrations: use :func:`add_grass_callback` so that TensorBoard, W&B, ... see the
    metrics too.

    Args:
        per_block (bool, optional): also log ``grass/active/<i>``, ``grass/p/<i>`` and
            ``grass/importance/<i>`` for every block (3 metrics per block) (default: True).
        optimizer (GrassAdamW, optional): the optimizer to report on, instead of the Trainer's
            (default: None).
    """

    def __init__(self, per_block: bool = True, optimizer: GrassAdamW | None = None) -> None:
        self.per_block = per_block
        self.optimizer = optimizer
        self._warned = False
        self._first = False  # set by add_grass_callback

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reporters = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        reporters = [r for r in reporters if r not in ("none", None)]
        if reporters and not self._first:
            logger.warning("GrassCallback: the Trainer calls the callbacks given as callbacks=[...] after its "
                           "reporting integrations (%s), which then do not record the grass/ metrics; call "
                           "grass_optim.integrations.add_grass_callback(trainer) instead", ", ".join(reporters))
        checkpointing = any(getattr(args, a, False) for a in ("activation_checkpointing", "gradient_checkpointing"))
        if getattr(args, "world_size", 1) > 1 and checkpointing and args.ddp_find_unused_parameters is not True:
            logger.warning("GrassCallback: with activation checkpointing the Trainer builds DDP with "
                           "find_unused_parameters=False, and the blocks GrassAdamW freezes then make DDP fail "
                           "(\"Expected to have finished reduction in the prior iteration\"); set "
                           "ddp_find_unused_parameters=True in the TrainingArguments")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is None or any(k.startswith("eval_") for k in logs):
            return
        opt = self.optimizer if self.optimizer is not None else find_grass_optimizer(kwargs.get("optimizer"))
        if opt is None:
            if not self._warned:
                logger.warning("GrassCallback: the Trainer's optimizer (%s) is not a GrassAdamW; no GRASS "
                               "metrics are logged. Pass optimizers=(GrassAdamW(model, ...), None) to the "
                               "Trainer, or use grass_optim.integrations.GrassTrainer",
                               type(kwargs.get("optimizer")).__name__)
                self._warned = True
            return
        metrics = grass_metrics(opt, per_block=self.per_block)
        # Trainer.log appended {**logs, "step": ...} to log_history just before calling on_log.
        history = getattr(state, "log_history", None)
        entry = history[-1] if history else None
        if isinstance(entry, dict) and entry.get("step") == getattr(state, "global_step", None) \
                and all(k in entry for k in logs):
            entry.update(metrics)
        logs.update(metrics)


def add_grass_callback(trainer: Any, callback: GrassCallback | None = None, **kwargs: Any) -> GrassCallback:
    """Put a :class:`GrassCallback` first among ``trainer``'s callbacks, and return it.

    First, so that every other callback, the reporting integrations (TensorBoard, W&B, ...) and the
    progress printer included, sees its metrics. Any ``GrassCallback`` already there (passed as
    ``callbacks=``) is moved rather than duplicated; ``callback`` or a new ``GrassCallback(**kwargs)``
    is used when there is none.
    """
    handler = trainer.callback_handler
    existing = [cb for cb in handler.callbacks if isinstance(cb, GrassCallback)]
    if callback is None:
        callback = existing[0] if existing and not kwargs else GrassCallback(**kwargs)
    elif kwargs:
        raise TypeError("add_grass_callback: pass either callback or GrassCallback keyword arguments, not both")
    handler.callbacks[:] = [cb for cb in handler.callbacks if not isinstance(cb, GrassCallback)]
    handler.callbacks.insert(0, callback)
    callback._first = True
    return callback

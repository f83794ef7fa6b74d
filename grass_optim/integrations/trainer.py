"""GrassAdamW built by the Hugging Face Trainer itself, from plain settings: :class:`GrassTrainerMixin`.

Passing ``optimizers=(GrassAdamW(model, ...), None)`` builds the optimizer before the Trainer (or
TRL's ``SFTTrainer``, with ``peft_config=``) has turned the model into what it trains. The mixin
builds it in ``create_optimizer`` instead, on the model as the Trainer left it (a ``PeftModel``, an
FSDP-wrapped model when the Trainer delays the optimizer for FSDP), with the Trainer's own optimizer:
its ``optim``, learning rate, betas, eps, and its decay / no-decay groups, wrapped by GrassAdamW.

Imports ``transformers`` (``GrassTrainer`` subclasses its ``Trainer``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..optimizer import GrassAdamW
from .hf import add_grass_callback
from .settings import grass_enabled, grass_settings

__all__ = ["GrassTrainer", "GrassTrainerMixin"]


class GrassTrainerMixin:
    """Makes a ``transformers.Trainer`` subclass train with GrassAdamW, from settings.

    Put it first: ``class GrassSFTTrainer(GrassTrainerMixin, SFTTrainer): pass``. The Trainer is then
    built as usual, plus:

    Args:
        grass: GRASS's settings: a mapping or the path of a YAML/JSON file, read by
            :func:`~grass_optim.integrations.grass_settings` (GrassAdamW's keyword names, or LISA's
            and BAdam's); ``None`` for GrassAdamW's defaults. Checked here, before training.
            ``use_grass: false`` in them (or ``use_lisa``/``use_badam``, as LMFlow and
            LLaMA-Factory write it), or ``grass=False``, turns GRASS off: the Trainer then trains
            with its own optimizer, as a plain ``Trainer`` would, and no callback is added.
        grass_callback (bool): add a :class:`~grass_optim.integrations.GrassCallback` (first among the
            callbacks) so GRASS's state is logged (default: True).

    ``create_optimizer`` builds the optimizer the Trainer would (``optim``/``optim_args`` or
    ``optimizer_cls_and_kwargs``, ``learning_rate``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon``,
    ``weight_decay`` for all but biases and norms, only the parameters that require grad) and wraps it:
    ``GrassAdamW(model, base_optimizer=that, **settings)``, once, and gives it the Trainer's
    ``GradScaler`` (fp16) for the probing hooks. An optimizer given with ``optimizers=(opt, None)``
    is used as it is. Not reproduced from the Trainer's own ``create_optimizer``: the 32-bit override
    of the embeddings with bitsandbytes' 8-bit optimizers, and one group per device mesh for models
    mixing DTensor meshes.
    """

    def __init__(self, *args: Any, grass: Mapping[str, Any] | str | os.PathLike[str] | bool | None = None,
                 grass_callback: bool = True, **kwargs: Any) -> None:
        if grass is True:
            grass = None
        self.use_grass = grass is not False and grass_enabled(grass)
        self.grass_settings = {} if grass is False else grass_settings(grass)  # a bad setting fails here
        super().__init__(*args, **kwargs)
        if grass_callback and self.use_grass:
            add_grass_callback(self)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        trainer: Any = self
        if trainer.optimizer is None and self.use_grass:
            # `model` is the wrapped model when the Trainer delays the optimizer (FSDP); else self.model,
            # which TRL/PEFT have already turned into the PeftModel.
            trainer.optimizer = build_grass_optimizer(trainer, trainer.model if model is None else model,
                                                      self.grass_settings)
        # Returns self.optimizer. Older Trainers' create_optimizer takes no model argument.
        if model is None:
            return super().create_optimizer()  # type: ignore[misc]
        return super().create_optimizer(model)  # type: ignore[misc]


class GrassTrainer(GrassTrainerMixin, Trainer):
    """``transformers.Trainer`` training with GrassAdamW built from ``grass=`` settings
    (:class:`GrassTrainerMixin`)."""


def build_grass_optimizer(trainer: Any, model: nn.Module, settings: Mapping[str, Any]) -> GrassAdamW:
    """The Trainer's own optimizer over its decay / no-decay groups, wrapped by GrassAdamW."""
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    given = getattr(trainer, "optimizer_cls_and_kwargs", None)  # Trainer(optimizer_cls_and_kwargs=), 4.43+
    if given is not None:
        cls, kwargs = given
        source = "optimizer_cls_and_kwargs"
    else:
        cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
        source = f"optim={str(getattr(trainer.args.optim, 'value', trainer.args.optim))!r}"
    kwargs = dict(kwargs)
    special = sorted({"params", "model", "optimizer_dict"} & set(kwargs))
    if special or not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        what = f"builds over its own {'/'.join(special)}" if special else "is not a torch.optim.Optimizer"
        raise ValueError(f"Invalid {source}: {getattr(cls, '__name__', cls)} {what}; GrassAdamW wraps a "
                         "torch.optim.Optimizer built over the Trainer's parameter groups (optim='adamw_torch', "
                         "'adamw_torch_fused', 'sgd', 'adafactor', ...)")
    layers = settings.get("layers")
    if isinstance(layers, str):
        settings = {**settings, "layers": _peft_path(model, layers)}
    elif isinstance(layers, (list, tuple)) and all(isinstance(x, str) for x in layers):
        settings = {**settings, "layers": [_peft_path(model, x) for x in layers]}
    opt = GrassAdamW(model, base_optimizer=cls(groups, **kwargs), **settings)
    # fp16: the probing hooks see scaled gradients; the Trainer's scaler (made with its Accelerator,
    # before the optimizer) divides the scale out.
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None:
        opt.grad_scaler = scaler
    return opt


def _peft_path(model: nn.Module, path: str) -> str:
    """``layers="model.layers"`` names the blocks of the model a PEFT model wraps: its full path in
    ``model`` (configs name the blocks of the base model, which PEFT moves under ``base_model.model``)."""
    get_base = getattr(model, "get_base_model", None)
    try:
        model.get_submodule(path)
        return path
    except AttributeError:
        if not callable(get_base):
            return path  # GrassAdamW names the problem
    base = get_base()
    prefix = next((n for n, m in model.named_modules() if m is base), None)
    return f"{prefix}.{path}" if prefix else path

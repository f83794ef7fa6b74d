"""GrassAdamW: the optimizer contract, and the bookkeeping of the GRASS schedule.

The math is elsewhere (``importance.py``, ``sampling.py``); this file decides *when* it runs:
measure every step, refresh every ``update_every`` steps, redraw every ``switch_every`` steps, and
freeze/unfreeze blocks so that only the active ones get gradients and updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import config as C
from . import distributed as D
from .importance import accumulate_window, block_grad_rms, block_sq_norms, foreach_norms, window_mean
from .layers import LayerPartition, find_layers, is_trainable, set_frozen_by_grass
from .memory import MemoryReport
from .offload import StateOffloader, resolve_timings
from .sampling import Sampler, resolve_sampler

logger = logging.getLogger(__name__)

__all__ = ["GrassAdamW"]

# Param-group keys (live in the base optimizer's groups, so they are checkpointed with them).
GROUP_BLOCK = "grass_block"  # block index of the group, or None for parameters outside the blocks

# Checkpointed GRASS state, under STATE_GRASS in state_dict().
STATE_GRASS = "grass"
STATE_VERSION = "version"
STATE_NUM_LAYERS = "num_layers"
STATE_LAYER_NUMEL = "layer_numel"
STATE_STEP = "step"
STATE_SEED = "seed"
STATE_ACTIVE = "active"
STATE_IMPORTANCE = "importance"
STATE_PROBABILITIES = "probabilities"
STATE_WINDOW_SUM = "window_sum"
STATE_WINDOW_COUNT = "window_count"
STATE_PROBE_SQ = "probe_sq"
STATE_PROBE_HITS = "probe_hits"
STATE_GENERATOR = "generator"
STATE_SAMPLER = "sampler"
STATE_CONFIG = "config"
STATE_HISTORY = "history"  # for plots only: it changes nothing in the future
STATE_HISTORY_STEPS = "history_steps"  # the per-step records of history="steps" (likewise)
_VERSION = 1
_REQUIRED_KEYS = (STATE_VERSION, STATE_NUM_LAYERS, STATE_LAYER_NUMEL, STATE_STEP, STATE_SEED, STATE_ACTIVE,
                  STATE_IMPORTANCE, STATE_PROBABILITIES, STATE_WINDOW_SUM, STATE_WINDOW_COUNT, STATE_PROBE_SQ,
                  STATE_PROBE_HITS, STATE_GENERATOR)

# Settings that change the schedule: a resume with other values does not continue the same run.
_SCHEDULE_FIELDS = ("active_layers", "switch_every", "probe_steps", "update_every")

_ADAMW_KWARGS = ("lr", "betas", "eps", "weight_decay")


def _split_groups(groups: Sequence[dict[str, Any]], partition: LayerPartition) -> list[dict[str, Any]]:
    """One group per (user group, part of the model): outside first, then block 0, 1, ...

    Each new group keeps the user group's hyperparameters and records its block in GROUP_BLOCK.
    """
    out = []
    for group in groups:
        params = list(group["params"])
        names = group.get("param_names")
        parts: dict[int | None, list[int]] = {}
        for i, p in enumerate(params):
            if not partition.contains(p):
                raise ValueError(f"Invalid base_optimizer: it holds a parameter of shape {tuple(p.shape)} "
                                 "that is not a parameter of the model given to GrassAdamW")
            parts.setdefault(partition.owner(p), []).append(i)
        order = [None, *range(partition.num_layers)]
        for part in order:
            if part not in parts:
                continue
            new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            new["params"] = [params[i] for i in parts[part]]
            if names is not None:
                new["param_names"] = [names[i] for i in parts[part]]
            new[GROUP_BLOCK] = part
            out.append(new)
    return out


class GrassAdamW(Optimizer):
    r"""GRASS: train a few blocks at a time, drawn by their measured gradient importance.

    Drop-in for ``torch.optim.AdamW`` (``base_optimizer=None``), or a wrapper around any
    per-parameter optimizer (SGD, Adam, AdamW, Adagrad, ...). The parameter groups are split per
    block, every parameter stays in :attr:`param_groups` (LR schedulers see all of them), and only
    the active blocks have ``requires_grad=True``; the others get no gradient and no update, and
    keep their optimizer state for when they are drawn again.

    .. math::
        r_t^{(l)} = \sqrt{\lVert g_t^{(l)} \rVert^2 / N_l}, \quad
        m_l = \tfrac{1}{T}\textstyle\sum_t r_t^{(l)}, \quad
        p = (1-\epsilon)\,\mathrm{softmax}\!\big(\tfrac{m}{\bar{m}\,\tau}\big) + \tfrac{\epsilon}{L}

    The first ``probe_steps`` steps measure every block and update nothing; then ``active_layers``
    blocks are drawn from ``p`` without replacement every ``switch_every`` steps, and the scores of
    the blocks measured in the last window are refreshed every ``update_every`` steps by
    ``m_l <- ema * m_l(window) + (1 - ema) * m_l``. Paper: Tian et al., "GRASS: Gradient-based
    Adaptive Layer-wise Importance Sampling for Memory-efficient LLM Fine-tuning", arXiv 2604.07808.
    See ``docs/algorithm.md`` for the details and the reasons behind each default.

    Args:
        model (nn.Module): the model to train (DDP and ``torch.compile`` wrappers are accepted).
        base_optimizer (Optimizer, Optimizer class or None, optional): ``None`` builds
            ``torch.optim.AdamW``; a class is built with ``lr``/``betas``/``eps``/``weight_decay``
            (those given) and ``**optimizer_kwargs``; an instance over the model's parameters is
            wrapped, keeping its param groups and hyperparameters (default: None).
        lr (float, optional): learning rate (default: 1e-3 for the built AdamW).
        betas (tuple of float, optional): AdamW's betas (default: (0.9, 0.999)).
        eps (float, optional): AdamW's eps (default: 1e-8).
        weight_decay (float, optional): AdamW's decoupled weight decay (default: 1e-2).
        active_layers (int, optional): blocks trained at a time, gamma (default: 2).
        switch_every (int, optional): optimizer steps between redraws of the active set (default: 50).
        sampler (str or Sampler, optional): ``"grass"`` (adaptive), ``"static"`` (probing scores
            only), ``"uniform"`` (LISA), or an object implementing :class:`~grass_optim.Sampler`
            (default: "grass").
        probe_steps (int, optional): first steps that measure all blocks and update nothing
            (default: 10, or 0 for a sampler that does not use the scores).
        update_every (int, optional): steps between refreshes of the scores
            (default: ``switch_every``).
        temperature (float, optional): softmax temperature on mean-normalised scores (default: 1.0).
        ema (float, optional): weight of the newest window in the refresh, in (0, 1] (default: 0.5).
        exploration (float, optional): share of the uniform distribution mixed into ``p``, so no
            block becomes impossible to draw (default: 0.0).
        outside_blocks (str, optional): ``"train"`` trains the parameters outside the blocks
            (embeddings, final norm, head) at every step after probing; ``"freeze"`` never
            (default: "train").
        probe_low_memory (bool, optional): while probing, reduce each gradient to its squared norm
            as soon as backward produces it and free it, so probing never holds all gradients at
            once (default: True). See ``docs/algorithm.md`` for when to turn it off. Not used in
            multi-process runs, where DDP/FSDP2 own the gradients.
        offload (bool or str, optional): where the blocks' optimizer state lives. ``None``/``False``:
            where the base optimizer puts it. ``"inactive"`` (or ``True``): states of blocks not
            being trained are parked in pinned host memory; a redraw writes the leaving blocks back
            and prefetches the new ones, overlapped with the next forward/backward. ``"stream"``:
            between steps every block's state is on the host except the first block of the next
            update (prefetched during forward/backward); ``step()`` updates the active blocks one
            by one, prefetching the next and writing back the previous. Parameters outside the
            blocks keep their state on the device. See ``docs/offload.md`` (default: None).
        offload_overlap (bool, optional): ``False`` waits for each copy as soon as it is issued
            (a baseline that shows what the overlap buys; results are identical) (default: True).
        layers (str or list of nn.Module, optional): the blocks; ``None`` auto-detects them, a
            dotted path names their container, a list gives them (default: None).
        seed (int, optional): seed of the optimizer's own ``torch.Generator``; ``None`` derives it
            from ``torch.initial_seed()`` without consuming the global RNG, and in a multi-process
            run takes rank 0's (default: None).
        distributed_checks (bool, optional): in a multi-process run, check at every redraw that all
            ranks drew the same blocks, and at every refresh that the active blocks' gradient norms
            agree (they do when DDP or FSDP2 synchronises the gradients); a mismatch raises
            ``RuntimeError`` instead of letting the ranks diverge silently. Turn off only when the
            ranks do not train one data-parallel model (default: True).
        grad_scaler (torch.amp.GradScaler, optional): the scaler used with this optimizer, if any.
            Only needed with ``probe_low_memory=True``: the probing hooks see gradients before the
            scaler unscales them, and divide their squared norms by its scale (default: None).
        history (bool or str, optional): record, at the start, at the end of probing and at every
            refresh or redraw, the step, the active set, the scores and the probabilities, as plain
            numbers (:attr:`history`; a few hundred bytes per entry, no synchronisation). ``"steps"``
            also records, after every step, the optimizer-state bytes on the device and on the host,
            the bytes copied each way and the time the copies took (offload on; timed with events
            on an accelerator, read only when the history is read); ``False`` records nothing
            (default: True).
        **optimizer_kwargs: further arguments for the built optimizer (e.g. ``amsgrad=True``).
    """

    def __init__(self, model: nn.Module, base_optimizer: Optimizer | type[Optimizer] | None = None, *,
                 lr: float | None = None, betas: tuple[float, float] | None = None,
                 eps: float | None = None, weight_decay: float | None = None,
                 active_layers: int = C.DEFAULT_ACTIVE_LAYERS, switch_every: int = C.DEFAULT_SWITCH_EVERY,
                 sampler: str | Sampler = "grass", probe_steps: int | None = None,
                 update_every: int | None = None, temperature: float = C.DEFAULT_TEMPERATURE,
                 ema: float = C.DEFAULT_EMA, exploration: float = C.DEFAULT_EXPLORATION,
                 outside_blocks: str = C.DEFAULT_OUTSIDE_BLOCKS,
                 probe_low_memory: bool = C.DEFAULT_PROBE_LOW_MEMORY,
                 offload: bool | str | None = C.DEFAULT_OFFLOAD,
                 offload_overlap: bool = C.DEFAULT_OFFLOAD_OVERLAP,
                 layers: str | Sequence[nn.Module] | None = None, seed: int | None = None,
                 distributed_checks: bool = True, grad_scaler: Any = None, history: bool | str = True,
                 **optimizer_kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"GrassAdamW needs the model (an nn.Module) to find its layers, got "
                f"{type(model).__name__}; pass the module itself: GrassAdamW(model, ...), not "
                "GrassAdamW(model.parameters()). To keep your own param groups, build an optimizer "
                "and wrap it: GrassAdamW(model, base_optimizer=torch.optim.AdamW(groups, ...))")
        self._sampler = resolve_sampler(sampler, temperature=temperature, ema=ema, exploration=exploration)
        self.config = C.GrassConfig.build(
            active_layers=active_layers, switch_every=switch_every, probe_steps=probe_steps,
            update_every=update_every, temperature=temperature, ema=ema, exploration=exploration,
            outside_blocks=outside_blocks, probe_low_memory=probe_low_memory, offload=offload,
            offload_overlap=offload_overlap, uses_importance=getattr(self._sampler, "uses_importance", True))
        self._warn_unused(sampler, temperature=temperature, ema=ema, exploration=exploration,
                          update_every=update_every)
        if seed is not None:
            C.check_int("seed", seed, 0)
        C.check_bool("distributed_checks", distributed_checks)
        C.check_history(history)
        _check_grad_scaler(grad_scaler)
        self._grad_scaler = grad_scaler
        self.partition = find_layers(model, layers)
        D.check_ddp(model, [p for ps in self.partition.block_params for p in ps if is_trainable(p)])
        adamw_kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.base_optimizer = self._build_base(model, base_optimizer, adamw_kwargs, optimizer_kwargs)

        self._ready = False
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        # Share, not copy: schedulers, GradScaler and clip_grad_norm_ see the base's groups/state.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults
        self._ready = True

        self._init_bookkeeping()
        # history="steps": one record per step; copy timings stay raw (events) until the history is read.
        self._steps_log: list[dict[str, Any]] | None = [] if history == "steps" else None
        self._moved_so_far = (0, 0)
        self._offloader = self._new_offloader() if self.config.offload else None
        self._check_ranks = distributed_checks and D.is_distributed()
        # Multi-process: DDP's buckets already hold every registered gradient and write the averaged
        # ones back after backward (hooks would see local, un-averaged values), and FSDP2 sets the
        # sharded gradients outside autograd. Probing then measures in step(), like training.
        self._probe_hooks = self.config.probe_low_memory and not D.is_distributed()
        # Multi-process: DDP registers the parameters that require grad when it is built, and may be
        # built after this optimizer. Freezing waits until the first step() so that it registers
        # every block (its buckets hold every registered gradient anyway); that step's gradients of
        # inactive blocks are dropped before the update.
        self._defer_freeze = D.is_distributed()
        self._seed = int(seed) if seed is not None else torch.initial_seed() % (2**63)
        if D.is_distributed():
            if seed is None:
                self._seed = D.broadcast_seed(self._seed)
            elif self._check_ranks:
                D.same_on_all_ranks(torch.tensor([self._seed]), "seed", hint="Pass the same seed on every rank.")
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self._seed)
        self._step = 0
        self._history: list[dict[str, Any]] | None = [] if history else None
        if self.config.probe_steps == 0:
            self._probabilities = self._compute_probabilities()
            self._active = self._draw()
        self._record("start")
        self._sync_model()
        # A wrapped optimizer may arrive with state: park what should not be on the device.
        self._move_states(set(range(self.num_layers)), self._resident())

    # ------------------------------------------------------------------ construction helpers
    def _warn_unused(self, sampler: Any, **given: Any) -> None:
        defaults = {"temperature": C.DEFAULT_TEMPERATURE, "ema": C.DEFAULT_EMA,
                    "exploration": C.DEFAULT_EXPLORATION, "update_every": None}
        if sampler == "uniform":
            used: set[str] = set()
        elif sampler == "static":
            used = {"temperature", "exploration"}
        elif sampler == "grass":
            used = set(defaults)
        else:  # a sampler object carries its own hyperparameters
            used = {"update_every"}
        for name, value in given.items():
            if name not in used and value != defaults[name]:
                logger.warning("GrassAdamW: %s=%r has no effect with sampler=%r", name, value, sampler)

    def _build_base(self, model: nn.Module, base: Any, adamw_kwargs: dict[str, Any],
                    optimizer_kwargs: dict[str, Any]) -> Optimizer:
        given = {k: v for k, v in adamw_kwargs.items() if v is not None}
        if base is None or (isinstance(base, type) and issubclass(base, Optimizer)):
            cls = torch.optim.AdamW if base is None else base
            self._check_base_class(cls)
            if base is None:
                given = {"lr": C.DEFAULT_LR, "betas": C.DEFAULT_BETAS, "eps": C.DEFAULT_EPS,
                         "weight_decay": C.DEFAULT_WEIGHT_DECAY, **given}
            groups = _split_groups([{"params": list(model.parameters())}], self.partition)
            self._check_active_layers(groups)
            try:
                return cls(groups, **given, **optimizer_kwargs)
            except TypeError as err:
                raise TypeError(f"Invalid arguments for base_optimizer={cls.__name__}: {err}") from None
        if isinstance(base, Optimizer):
            self._check_base_class(type(base))
            extra = sorted(given) + sorted(optimizer_kwargs)
            if extra:
                raise ValueError(
                    f"Invalid arguments {', '.join(extra)} together with a base_optimizer instance: "
                    f"the wrapped {type(base).__name__} keeps its own hyperparameters; set them when "
                    "you build it, or pass the class instead of an instance")
            groups = _split_groups(base.param_groups, self.partition)
            self._check_active_layers(groups)  # before the user's optimizer is touched
            # Rewrite in place: the user's references (and its state, keyed by parameter) stay valid.
            base.param_groups[:] = groups
            return base
        raise TypeError(f"Invalid base_optimizer: {base!r} (expected None, a torch.optim.Optimizer "
                        "subclass, or an instance of one built over the model's parameters)")

    def _check_active_layers(self, groups: list[dict[str, Any]]) -> None:
        trainable = {g[GROUP_BLOCK] for g in groups if g[GROUP_BLOCK] is not None
                     and any(is_trainable(p) for p in g["params"])}
        if self.config.active_layers > len(trainable):
            raise ValueError(f"Invalid active_layers: {self.config.active_layers} (expected an int in "
                             f"[1, {len(trainable)}]: the model has {self.partition.num_layers} blocks, "
                             f"{len(trainable)} of them with trainable parameters in the optimizer)")

    @staticmethod
    def _check_base_class(cls: type) -> None:
        if issubclass(cls, GrassAdamW):
            raise TypeError("Invalid base_optimizer: GrassAdamW cannot wrap another GrassAdamW")
        if issubclass(cls, torch.optim.LBFGS):
            raise TypeError("Invalid base_optimizer: LBFGS keeps one flat parameter group and "
                            "re-evaluates the closure, so it cannot train blocks by turns")

    def _init_bookkeeping(self) -> None:
        L = self.num_layers
        in_opt = {id(p) for g in self.param_groups for p in g["params"]}
        # Managed = ours to freeze and unfreeze: in the optimizer and trainable when we were built.
        # Parameters the user froze, or left out of the optimizer, are never unfrozen.
        self._managed = [[p for p in ps if id(p) in in_opt and is_trainable(p)]
                         for ps in self.partition.block_params]
        self._managed_outside = [p for p in self.partition.outside_params if id(p) in in_opt and is_trainable(p)]
        numel = [sum(p.numel() for p in ps) for ps in self._managed]
        self._layer_numel = numel
        self._sampleable = [n > 0 for n in numel]
        self._sampleable_mask = torch.tensor(self._sampleable)  # CPU bool [L], for the sampler's views
        self._sharded = any(D.is_sharded(p) for ps in self._managed for p in ps)
        if self._sharded and self.config.offload is not None:
            raise ValueError(f"Invalid offload: {self.config.offload!r} with sharded (FSDP2/DTensor) parameters: "
                             "offloading sharded optimizer state is not supported yet; use offload=None "
                             "(FSDP2 already divides the state across ranks)")
        first = next((p for ps in self._managed for p in ps), None)
        self._device = first.device if first is not None else torch.device("cpu")
        dev = self._device
        self._numel = torch.tensor(numel, dtype=torch.float32, device=dev)
        self._window_sum = torch.zeros(L, dtype=torch.float32, device=dev)
        self._window_count = torch.zeros(L, dtype=torch.int64, device=dev)
        self._probe_sq = torch.zeros(L, dtype=torch.float32, device=dev)
        self._probe_hits = torch.zeros(L, dtype=torch.int64, device=dev)
        # NaN: no score yet (measured neither while probing nor in any window); 0: never drawn.
        self._importance = torch.tensor([math.nan if s else 0.0 for s in self._sampleable], dtype=torch.float64)
        self._probabilities = torch.zeros(L, dtype=torch.float64)
        self._active: tuple[int, ...] = ()
        self._hooks: list[Any] = []
        self._measure_cache: tuple[tuple[int, ...], list[Tensor], Tensor, Tensor] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_ready", False):  # Optimizer.__init__ registering the initial groups
            super().add_param_group(param_group)
            return
        raise RuntimeError(
            "GrassAdamW does not support add_param_group after construction: its per-block groups "
            "and scores are fixed when it is built. Build it with all parameters instead (wrap an "
            "optimizer that already holds every group: GrassAdamW(model, base_optimizer=opt))")

    # ------------------------------------------------------------------ public read-only view
    @property
    def num_layers(self) -> int:
        """Number of blocks, L."""
        return self.partition.num_layers

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Qualified module names of the blocks, in block order."""
        return self.partition.names

    @property
    def active_layer_indices(self) -> tuple[int, ...]:
        """Sorted indices of the blocks being trained now (all trainable blocks while probing)."""
        if self.is_probing:
            return tuple(i for i, s in enumerate(self._sampleable) if s)
        return self._active

    @property
    def importance(self) -> Tensor:
        """Current mean-gradient-norm score of each block (float64, CPU, a copy).

        NaN for a block not measured yet; 0 for a block with no trainable parameter (never drawn).
        """
        return self._importance.clone()

    @property
    def probabilities(self) -> Tensor:
        """Current sampling distribution over the blocks (float64, CPU, sums to 1; a copy).

        Uniform over the trainable blocks until probing ends.
        """
        if self.is_probing:
            return self._uniform()
        return self._probabilities.clone()

    @property
    def is_probing(self) -> bool:
        """True during the first ``probe_steps`` steps (measure only, no update)."""
        return self._step < self.config.probe_steps

    @property
    def history(self) -> dict[str, Any]:
        """What the sampler did, as plain data: ``{"layer_names": [...], "num_steps": int, "config":
        {...}, "events": [{"step", "event", "active", "importance", "probabilities"}, ...]}``.

        ``event`` is ``"start"``, ``"probe_end"``, ``"refresh"``, ``"redraw"`` or ``"refresh+redraw"``;
        ``step`` counts optimizer steps (probing included); NaN importance = not measured yet (write
        it with ``grass_optim.plot.save_history`` for strict JSON, NaN as null); while probing,
        ``active`` lists every block measured (none is updated).
        Empty ``events`` when built with ``history=False``. ``grass_optim.plot`` draws it.

        With ``history="steps"`` it also has ``"steps": [{"step", "device_state_bytes",
        "host_state_bytes", "bytes_to_host", "bytes_to_device", "copy_ms_to_host",
        "copy_ms_to_device"}, ...]``, one per optimizer step (``step`` = steps done; bytes copied
        and copy time during that step; on an accelerator the copy times come from events, and
        reading them waits for those copies to finish).
        """
        config = {f: getattr(self.config, f) for f in _SCHEDULE_FIELDS}
        config["sampler"] = type(self._sampler).__name__
        out = {"layer_names": list(self.layer_names), "num_steps": self._step, "config": config,
               "events": [dict(e) for e in (self._history or [])]}
        if self._steps_log is not None:
            out["steps"] = self._resolved_steps()
        return out

    @property
    def grad_scaler(self) -> Any:
        """The GradScaler whose scale the probing hooks divide out (settable, e.g. once a trainer
        has created its scaler)."""
        return self._grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        _check_grad_scaler(scaler)
        self._grad_scaler = scaler

    @property
    def sampler(self) -> Sampler:
        return self._sampler

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken, probing steps included."""
        return self._step

    def __repr__(self) -> str:
        c = self.config
        return (f"GrassAdamW(base={type(self.base_optimizer).__name__}, layers={self.num_layers}, "
                f"active_layers={c.active_layers}, switch_every={c.switch_every}, "
                f"probe_steps={c.probe_steps}, update_every={c.update_every}, sampler={self._sampler!r}, "
                f"outside_blocks={c.outside_blocks!r}, active={list(self.active_layer_indices)})")

    # ------------------------------------------------------------------ the training step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Measure the gradients, update the active blocks (nothing while probing), then refresh
        the scores and redraw the active set when due. Returns ``closure()``'s loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._step == 0:
            self._check_same_parameters()
        self._follow_device()
        self._measure()
        if self._defer_freeze:
            self._drop_inactive_grads()
        resident = self._resident()
        if self.config.offload == "stream" and not self.is_probing:
            self._stream_update()
            resident = set()  # _stream_update wrote every block back
        elif not self.is_probing:
            if self._offloader is not None:
                for i in sorted(resident):
                    self._offloader.wait(i)  # the update reads states a prefetch may still be writing
            self.base_optimizer.step()
        self._step += 1
        if self._defer_freeze:
            self._defer_freeze = False
            self._sync_model()
        self._advance_schedule()
        self._move_states(resident, self._resident())
        if self._steps_log is not None:
            self._record_step()
        return loss

    def _check_same_parameters(self) -> None:
        """The blocks still hold the parameters this optimizer updates (FSDP2's ``fully_shard`` and
        some wrappers replace them: built before those, the optimizer would silently train nothing)."""
        for name, block, params in zip(self.partition.names, self.partition.blocks, self.partition.block_params,
                                       strict=True):
            now = {id(p) for p in block.parameters()}
            if any(id(p) not in now for p in params):
                raise RuntimeError(f"GrassAdamW: the parameters of block {name!r} were replaced after the optimizer "
                                   "was built (e.g. by fully_shard), so it would train nothing. Build GrassAdamW "
                                   "after fully_shard and any other wrapper that replaces parameters")

    def _follow_device(self) -> None:
        """Move the bookkeeping to the blocks' device if the model moved after construction (e.g.
        a trainer calling ``model.to(device)`` after the optimizer was built)."""
        first = next((p for ps in self._managed for p in ps), None)
        if first is None or first.device == self._device:
            return
        if self._offloader is not None and self._offloader.host_buffer_bytes:
            raise RuntimeError(f"GrassAdamW: the model moved from {self._device} to {first.device} after "
                               "optimizer state was offloaded; build the optimizer after moving the model")
        self._device = first.device
        for name in ("_numel", "_window_sum", "_window_count", "_probe_sq", "_probe_hits"):
            setattr(self, name, getattr(self, name).to(self._device))
        if self._offloader is not None:
            self._offloader = self._new_offloader()
            self._moved_so_far = (0, 0)
        if self._hooks:  # they hold views of the old buffers
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._install_probe_hooks()
        self._measure_cache = None

    def _drop_inactive_grads(self) -> None:
        """Gradients of blocks computed while they were inactive never reach the update."""
        active = set(self.active_layer_indices)
        for i, params in enumerate(self._managed):
            if i not in active:
                for p in params:
                    p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        # The probing sums belong to the gradients just cleared: a step that a GradScaler skipped
        # (it never called step()) must not leave them to the next one.
        self._probe_sq.zero_()
        self._probe_hits.zero_()

    def _stream_update(self) -> None:
        """The layer-wise pipeline: update block i while i+1 is prefetched and i-1 written back."""
        assert self._offloader is not None
        off = self._offloader
        self._step_groups(None)  # outside the blocks: state stays on the device
        order = list(self._active)
        for j, i in enumerate(order):
            if j + 1 < len(order):
                off.prefetch(order[j + 1], self._block_states(order[j + 1]))
            off.wait(i)
            self._step_groups(i)
            off.offload(i, self._block_states(i))

    def _step_groups(self, block: int | None) -> None:
        """Run the base optimizer's step on the groups of one block (or of the outside) only."""
        base = self.base_optimizer
        groups = base.param_groups
        subset = [g for g in groups if g[GROUP_BLOCK] == block]
        if not subset:
            return
        base.param_groups = subset
        try:
            base.step()
        finally:
            base.param_groups = groups

    # ------------------------------------------------------------------ where states live
    def _new_offloader(self) -> StateOffloader:
        off = StateOffloader(self._device, overlap=self.config.offload_overlap)
        off.timing = self._steps_log is not None
        return off

    def _resident(self, step: int | None = None, active: Sequence[int] | None = None) -> set[int]:
        """Blocks whose state belongs on the device between steps, under the offload mode."""
        step = self._step if step is None else step
        active = self._active if active is None else active
        if self.config.offload is None or step < self.config.probe_steps:
            return set()  # off: nothing is moved; probing: nothing is updated, all stay parked
        if self.config.offload == "inactive":
            return set(active)
        return {min(active)}  # "stream": prefetch the first block the next step will update

    def _block_states(self, i: int) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(p, self.state[p]) for p in self._managed[i] if p in self.state]

    def _move_states(self, before: set[int], after: set[int]) -> None:
        if self._offloader is None:
            return
        for i in sorted(before - after):
            self._offloader.offload(i, self._block_states(i))
        for i in sorted(after - before):  # overlaps the next forward/backward
            self._offloader.prefetch(i, self._block_states(i))

    def memory_report(self) -> MemoryReport:
        """Bytes of optimizer state on the device and on the host, and bytes copied so far.

        Reads only tensor sizes: no synchronisation.
        """
        off = self._offloader
        per_block = [0] * self.num_layers
        outside = host = scalars = 0
        for p, st in self.state.items():
            block = self.partition.owner(p) if self.partition.contains(p) else None
            for k, v in st.items():
                if not isinstance(v, Tensor):
                    continue
                nbytes = v.numel() * v.element_size()
                if v.dim() == 0:
                    scalars += nbytes  # step counters: never moved, a few bytes each
                elif (off is not None and off.is_parked(p, k, v)) or v.device != p.device:
                    host += nbytes
                elif block is None:
                    outside += nbytes
                else:
                    per_block[block] += nbytes
        buffers = off.host_buffer_bytes if off is not None else 0
        return MemoryReport(
            device_state_bytes=sum(per_block) + outside, host_state_bytes=host, scalar_state_bytes=scalars,
            pinned_bytes=buffers if off is not None and off.asynchronous else 0, host_buffer_bytes=buffers,
            bytes_to_host=off.bytes_to_host if off is not None else 0,
            bytes_to_device=off.bytes_to_device if off is not None else 0,
            device_state_bytes_per_block=tuple(per_block), device_state_bytes_outside=outside)

    # ------------------------------------------------------------------ measuring
    def _measure(self) -> None:
        """Add this step's per-block gradient RMS to the window; no host synchronisation."""
        L = self.num_layers
        if self.is_probing and self._probe_hooks:
            # The hooks already reduced each gradient to its squared norm during backward.
            sq, hits = self._probe_sq.clone(), self._probe_hits.clone()
            self._probe_sq.zero_()
            self._probe_hits.zero_()
            if self._grad_scaler is not None:
                sq = sq / self._loss_scale(sq.device).square()
            if self._sharded:
                D.sum_over_ranks(hits)
        else:
            grads, index = self._gathered_grads()
            sq = block_sq_norms([D.local(g) for g in grads], index, L)
            hits = torch.zeros(L, dtype=torch.int64, device=self._device).index_fill_(0, index, 1)
        if self._sharded:
            D.sum_over_ranks(sq)  # each rank holds a shard: a block's norm is global, not per-shard
        measured = hits > 0
        accumulate_window(self._window_sum, self._window_count, block_grad_rms(sq, self._numel), measured)

    def _loss_scale(self, device: torch.device) -> Tensor:
        """The GradScaler's current scale as a tensor; its own tensor when it has one (no sync)."""
        scale = getattr(self._grad_scaler, "_scale", None)
        if isinstance(scale, Tensor):
            return scale.to(device, torch.float32)
        return torch.tensor(float(self._grad_scaler.get_scale()), device=device)

    def _gathered_grads(self) -> tuple[list[Tensor], Tensor]:
        _, params, index, owners_cpu = self._measure_plan()
        grads = [p.grad for p in params]
        if all(g is not None for g in grads):
            return grads, index  # type: ignore[return-value]
        keep = [i for i, g in enumerate(grads) if g is not None]  # unused parameters: rare path
        return [grads[i] for i in keep], owners_cpu[keep].to(self._device)  # type: ignore[misc]

    def _measure_plan(self) -> tuple[tuple[int, ...], list[Tensor], Tensor, Tensor]:
        """Parameters of the active blocks and their block indices, built once per active set."""
        active = self.active_layer_indices
        if self._measure_cache is None or self._measure_cache[0] != active:
            params = [p for i in active for p in self._managed[i]]
            owners = torch.tensor([i for i in active for _ in self._managed[i]], dtype=torch.int64)
            # A host-to-device copy: done when the active set changes (a step that already
            # synchronises), so that the steps in between never wait for the device.
            self._measure_cache = (active, params, owners.to(self._device), owners)
        return self._measure_cache

    def _advance_schedule(self) -> None:
        c = self.config
        n = self._step - c.probe_steps  # steps since probing ended
        if n < 0:
            return
        if n == 0 and c.probe_steps > 0:
            self._finish_probing()
            self._record("probe_end")
            return
        refreshed, redrawn = n % c.update_every == 0, n % c.switch_every == 0
        if refreshed:
            self._refresh()
        if redrawn:
            self._active = self._draw()
            self._sync_model()
        if refreshed or redrawn:
            self._record("refresh+redraw" if refreshed and redrawn else "refresh" if refreshed else "redraw")

    def _record(self, event: str) -> None:
        """One history entry: plain numbers, taken only on steps that already synchronise."""
        if self._history is None:
            return
        self._history.append({"step": self._step, "event": event, "active": list(self.active_layer_indices),
                              "importance": self._importance.tolist(),
                              "probabilities": self.probabilities.tolist()})

    def _record_step(self) -> None:
        """One per-step entry (history="steps"): sizes only, and the copies' raw timings."""
        rep = self.memory_report()
        to_host, to_device = self._moved_so_far
        self._moved_so_far = (rep.bytes_to_host, rep.bytes_to_device)
        self._steps_log.append({"step": self._step, "device_state_bytes": rep.device_state_bytes,
                                "host_state_bytes": rep.host_state_bytes,
                                "bytes_to_host": rep.bytes_to_host - to_host,
                                "bytes_to_device": rep.bytes_to_device - to_device,
                                "copies": self._offloader.drain_timings() if self._offloader is not None else []})

    def _resolved_steps(self) -> list[dict[str, Any]]:
        """The per-step records as plain numbers (waits for the timed copies on an accelerator)."""
        out = []
        for entry in self._steps_log or []:
            if "copies" in entry:  # resolve once, in place: later reads need no wait
                copies = resolve_timings(entry.pop("copies"))
                for direction in ("to_host", "to_device"):
                    entry[f"copy_ms_{direction}"] = sum((c["ms"] for c in copies if c["direction"] == direction), 0.0)
            out.append(dict(entry))
        return out

    def _finish_probing(self) -> None:
        self._refresh()  # every block measured while probing takes its probing mean as its score
        self._active = self._draw()
        self._sync_model()

    def _refresh(self) -> None:
        mean, measured = self._take_window()
        s = self._sampleable_mask
        new = self._sampler.refresh(self._importance[s], mean[s], measured[s])
        new = torch.as_tensor(new, dtype=torch.float64).flatten()
        if new.numel() != int(s.sum()) or bool(torch.isinf(new).any()):
            raise RuntimeError(f"sampler.refresh returned {new.tolist()} (expected {int(s.sum())} scores, "
                               "finite or NaN for blocks without a score yet)")
        self._importance = self._importance.clone()
        self._importance[s] = new
        self._probabilities = self._compute_probabilities()

    def _take_window(self) -> tuple[Tensor, Tensor]:
        """Mean RMS and measured mask of the window (read back to the host), then reset it."""
        mean = window_mean(self._window_sum, self._window_count).to("cpu", torch.float64)
        measured = (self._window_count > 0).cpu()
        if self._check_ranks:
            # Data-parallel ranks see the same averaged gradients, so the same norms.
            D.same_on_all_ranks(torch.where(measured, mean, 0.0), "the gradient norms of the trained blocks",
                                rtol=1e-5, hint=D.DDP_HINT)
        self._window_sum.zero_()
        self._window_count.zero_()
        return mean, measured

    def _uniform(self) -> Tensor:
        s = self._sampleable_mask.to(torch.float64)
        return s / s.sum()

    def _compute_probabilities(self) -> Tensor:
        s = self._sampleable_mask
        scores = self._importance[s]
        known = ~torch.isnan(scores)
        # A block without a score yet counts as average: neither favoured nor starved.
        fill = scores[known].mean() if bool(known.any()) else torch.tensor(1.0, dtype=torch.float64)
        scores = torch.where(known, scores, fill)
        p = torch.as_tensor(self._sampler.probabilities(scores), dtype=torch.float64).flatten()
        if p.numel() != int(s.sum()) or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or p.sum() <= 0:
            raise RuntimeError(f"sampler.probabilities returned {p.tolist()} (expected {int(s.sum())} "
                               "finite non-negative numbers with a positive sum)")
        full = torch.zeros(self.num_layers, dtype=torch.float64)
        full[s] = p / p.sum()
        return full

    def _draw(self) -> tuple[int, ...]:
        sampleable = [i for i, s in enumerate(self._sampleable) if s]
        k = self.config.active_layers
        drawn = self._sampler.draw(self._probabilities[sampleable], k, self._generator)
        picked = [int(i) for i in torch.as_tensor(drawn).flatten().tolist()]
        if len(picked) != k or len(set(picked)) != k or not all(0 <= i < len(sampleable) for i in picked):
            raise RuntimeError(f"sampler.draw returned {picked} (expected {k} distinct indices in "
                               f"[0, {len(sampleable)}))")
        active = tuple(sorted(sampleable[i] for i in picked))
        if self._check_ranks:
            D.same_on_all_ranks(torch.tensor(active), "the active set",
                                hint="Give GrassAdamW the same seed and settings on every rank.")
        return active

    # ------------------------------------------------------------------ freezing
    def _sync_model(self) -> None:
        """Make the model's requires_grad (and the probing hooks) match the current phase."""
        self._measure_plan()
        if self._defer_freeze:
            return
        probing = self.is_probing
        active = set(self.active_layer_indices)
        for i, params in enumerate(self._managed):
            on = i in active
            for p in params:
                set_frozen_by_grass(p, not on)
                if not on:
                    p.grad = None  # a frozen block holds no gradient memory
        # Outside parameters keep their gradients while probing (they are not updated then): a
        # GradScaler needs some gradient to check for infs, and the low-memory hooks free the rest.
        outside_on = self.config.outside_blocks == "train"
        for p in self._managed_outside:
            set_frozen_by_grass(p, not outside_on)
            if not outside_on:
                p.grad = None
        want_hooks = probing and self._probe_hooks
        if want_hooks and not self._hooks:
            self._install_probe_hooks()
        elif not want_hooks and self._hooks:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _install_probe_hooks(self) -> None:
        sq_views, hit_views = self._probe_sq.unbind(0), self._probe_hits.unbind(0)
        for i, params in enumerate(self._managed):
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    _probe_hook(sq_views[i], hit_views[i])))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus everything GRASS needs to continue exactly.

        Plain tensors, ints, lists and dicts: round-trips through ``torch.load(weights_only=True)``.
        """
        if self._offloader is not None:
            self._offloader.synchronize()  # the host reads buffers that copies may still be writing
        sd = self.base_optimizer.state_dict()
        if self._offloader is not None:  # one place for every state: the host, whatever its home
            sd["state"] = {i: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
                           for i, st in sd["state"].items()}
        sd[STATE_GRASS] = {
            STATE_VERSION: _VERSION,
            STATE_NUM_LAYERS: self.num_layers,
            STATE_LAYER_NUMEL: list(self._layer_numel),
            STATE_STEP: self._step,
            STATE_SEED: self._seed,
            STATE_ACTIVE: list(self._active),
            STATE_IMPORTANCE: self._importance.clone(),
            STATE_PROBABILITIES: self._probabilities.clone(),
            STATE_WINDOW_SUM: self._window_sum.to("cpu", copy=True),
            STATE_WINDOW_COUNT: self._window_count.to("cpu", copy=True),
            STATE_PROBE_SQ: self._probe_sq.to("cpu", copy=True),
            STATE_PROBE_HITS: self._probe_hits.to("cpu", copy=True),
            STATE_GENERATOR: self._generator.get_state(),
            STATE_SAMPLER: self._sampler.state_dict() if hasattr(self._sampler, "state_dict") else None,
            STATE_CONFIG: {f: getattr(self.config, f) for f in _SCHEDULE_FIELDS},
            STATE_HISTORY: [dict(e) for e in self._history] if self._history is not None else None,
            STATE_HISTORY_STEPS: self._resolved_steps() if self._steps_log is not None else None,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, and re-apply the freezing it implies to the model.

        Everything is checked before anything is changed: a checkpoint of another model (other
        block count or block sizes) raises ``ValueError`` and leaves this optimizer as it was.
        """
        if not isinstance(state_dict, dict) or STATE_GRASS not in state_dict:
            raise ValueError("Invalid state_dict: it has no 'grass' entry, so it was not saved by "
                             "GrassAdamW.state_dict(); to start GRASS from a plain optimizer's state, "
                             "load that into the base optimizer before wrapping it")
        g = state_dict[STATE_GRASS]
        missing = [k for k in _REQUIRED_KEYS if k not in g]
        if missing:
            raise ValueError(f"Invalid state_dict: the 'grass' entry lacks {', '.join(missing)}")
        if g.get(STATE_VERSION) != _VERSION:
            raise ValueError(f"Invalid state_dict: GRASS state version {g.get(STATE_VERSION)!r} "
                             f"(this grass_optim reads version {_VERSION})")
        if g[STATE_NUM_LAYERS] != self.num_layers or list(g[STATE_LAYER_NUMEL]) != self._layer_numel:
            raise ValueError(
                f"Invalid state_dict: saved for a model with {g[STATE_NUM_LAYERS]} blocks of sizes "
                f"{list(g[STATE_LAYER_NUMEL])}, but this optimizer has {self.num_layers} blocks of sizes "
                f"{self._layer_numel}")
        active = [int(i) for i in g[STATE_ACTIVE]]
        if any(not (0 <= i < self.num_layers and self._sampleable[i]) for i in active):
            raise ValueError(f"Invalid state_dict: active blocks {active} are not trainable blocks of this model")
        saved_cfg = g.get(STATE_CONFIG, {})
        changed = [f"{f}: {saved_cfg[f]} -> {getattr(self.config, f)}" for f in _SCHEDULE_FIELDS
                   if f in saved_cfg and saved_cfg[f] != getattr(self.config, f)]
        if changed:
            logger.warning("GrassAdamW.load_state_dict: schedule settings differ from the checkpoint "
                           "(%s); the run continues with the new ones", "; ".join(changed))
        base_sd = {k: v for k, v in state_dict.items() if k != STATE_GRASS}
        parked: dict[int, dict[str, Tensor]] = {}
        if self._offloader is not None:
            self._offloader.synchronize()  # buffers are about to be overwritten from the host
            resident = self._resident(int(g[STATE_STEP]), active)
            base_sd["state"], parked = self._split_parked(state_dict, resident)
        self.base_optimizer.load_state_dict(base_sd)
        # Optimizer.load_state_dict replaces the base's state and group containers: share them again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        dev = self._device
        self._step = int(g[STATE_STEP])
        self._seed = int(g[STATE_SEED])
        self._active = tuple(active)
        self._importance = g[STATE_IMPORTANCE].to("cpu", torch.float64).clone()
        self._probabilities = g[STATE_PROBABILITIES].to("cpu", torch.float64).clone()
        self._window_sum.copy_(g[STATE_WINDOW_SUM].to(dev))
        self._window_count.copy_(g[STATE_WINDOW_COUNT].to(dev))
        self._probe_sq.copy_(g[STATE_PROBE_SQ].to(dev))
        self._probe_hits.copy_(g[STATE_PROBE_HITS].to(dev))
        self._generator.set_state(g[STATE_GENERATOR].cpu())
        if self._history is not None and g.get(STATE_HISTORY) is not None:
            self._history = [dict(e) for e in g[STATE_HISTORY]]
        if self._steps_log is not None and g.get(STATE_HISTORY_STEPS) is not None:
            self._steps_log = [dict(e) for e in g[STATE_HISTORY_STEPS]]
        if g.get(STATE_SAMPLER) is not None and hasattr(self._sampler, "load_state_dict"):
            self._sampler.load_state_dict(g[STATE_SAMPLER])
        self._measure_cache = None
        if self._offloader is not None:
            by_id = {id(p): p for grp in self.param_groups for p in grp["params"]}
            self._offloader.load_parked((by_id[pid], self.state[by_id[pid]], k, v)
                                        for pid, entry in parked.items() for k, v in entry.items())
        self._sync_model()

    def _split_parked(self, state_dict: dict[str, Any], resident: set[int]
                      ) -> tuple[dict[Any, Any], dict[int, dict[str, Tensor]]]:
        """Take the movable state of non-resident blocks out of a checkpoint's state.

        ``Optimizer.load_state_dict`` would put every state tensor on its parameter's device, all
        at once: the very peak offloading avoids. Those tensors go to host buffers instead.
        """
        saved_ids = [i for grp in state_dict["param_groups"] for i in grp["params"]]
        params = [p for grp in self.param_groups for p in grp["params"]]
        saved = dict(state_dict["state"])
        parked: dict[int, dict[str, Tensor]] = {}
        if len(saved_ids) != len(params):
            return saved, parked  # the base optimizer's own check reports the mismatch
        key_of = {id(p): k for p, k in zip(params, saved_ids, strict=True)}
        for i, ps in enumerate(self._managed):
            if i in resident:
                continue
            for p in ps:
                key = key_of[id(p)]
                if key not in saved:
                    continue
                entry = dict(saved[key])
                moved = {k: entry.pop(k) for k in list(entry) if isinstance(entry[k], Tensor) and entry[k].dim() > 0}
                saved[key] = entry
                parked[id(p)] = moved
        return saved, parked


def _check_grad_scaler(scaler: Any) -> None:
    if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
        raise TypeError(f"Invalid grad_scaler: {type(scaler).__name__} (expected None or a torch.amp.GradScaler)")


def _probe_hook(sq_view: Tensor, hit_view: Tensor) -> Callable[[Tensor], None]:
    """Post-accumulate-grad hook for probing: keep ``||grad||^2`` of the block, free the gradient.

    Closes over two 0-d views into the optimizer's per-block buffers (not over the optimizer), so a
    forgotten hook cannot keep the optimizer alive.
    """
    def hook(param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        g = grad.coalesce().values() if grad.is_sparse else grad
        sq_view.add_(foreach_norms([D.local(g)])[0].to(sq_view.device, torch.float32).square())
        hit_view.add_(1)
        param.grad = None
    return hook

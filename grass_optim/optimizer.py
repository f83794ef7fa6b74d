"""GrassAdamW: the ``torch.optim.Optimizer`` facade over the GRASS schedule.

This file keeps the optimizer contract (param groups, state, ``step``, ``zero_grad``, state-dict
hooks) and calls, in order, the modules that own each concern; ``docs/architecture.md`` follows one
``step()`` through them:

* ``groups.py``: the base optimizer and its per-block param groups;
* ``schedule.py``: probing, windows, refreshes, redraws (and their checkpoint);
* ``measuring.py``: per-block gradient norms; ``freezing.py``: ``requires_grad`` of the blocks;
* ``placement.py``: which blocks' state is on the device; ``offload.py``: moving it;
* ``history.py``, ``memory.py``, ``checkpoint.py``: what is recorded, counted and saved.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import checkpoint as ckpt
from . import config as C
from . import distributed as D
from .freezing import BlockFreezer, is_trainable
from .groups import build_base_optimizer, check_optimizer_kwargs, step_groups_of, step_hooks_once
from .history import History
from .layers import find_layers, warn_if_mostly_outside
from .measuring import BlockMeasurer, check_grad_scaler
from .memory import MemoryReport, memory_report
from .offload import StateOffloader
from .placement import OffloadPolicy, Progress, StepPart
from .sampling import Sampler, default_probe_steps, resolve_sampler, unused_settings
from .schedule import Schedule

logger = logging.getLogger(__name__)

__all__ = ["GrassAdamW"]

_ADAMW_KWARGS = ("lr", "betas", "eps", "weight_decay")


class GrassAdamW(Optimizer):
    r"""GRASS: train a few blocks at a time, drawn by their measured gradient importance.

    Drop-in for ``torch.optim.AdamW`` (``base_optimizer=None``), or a wrapper around any
    per-parameter optimizer (SGD, Adam, AdamW, Adagrad, ...). The parameter groups are split per
    block, every parameter stays in :attr:`param_groups` (LR schedulers see all of them), and only
    the active blocks have ``requires_grad=True``; the others get no gradient and no update, and
    keep their optimizer state for when they are drawn again. A *block* is one of the model's
    repeated layers; the public names say "layer" (``active_layers``, ``layer_names``).

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
        sampler (str or Sampler, optional): ``"grass"`` (adaptive, mean gradient RMS: the published
            method), ``"static"`` (probing scores only), ``"uniform"`` (LISA), ``"l1"`` (scores from
            ``||g||_1``, the loss decrease an Adam step would give), ``"gain"`` (a bandit on the loss
            decrease each block's updates gave), or an object implementing
            :class:`~grass_optim.Sampler` (default: "grass").
        probe_steps (int, optional): first steps that measure all blocks and update nothing
            (default: 10, or 0 for a sampler that does not use the scores).
        update_every (int, optional): T_u, optimizer steps between refreshes of the scores
            (default: ``switch_every``).
        refresh_all (bool, optional): the step before each refresh gives every block gradients (the
            inactive ones reduced to their signal by hooks and freed, as while probing) and updates
            only the active ones, so that every score is refreshed at the same moment instead of
            only those of the blocks just trained (default: False).
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
            blocks keep their state on the device. Under FSDP2 each rank parks the local shards of
            its state (still DTensors, sharded like their parameters). See ``docs/offload.md``
            (default: None).
        offload_overlap (bool, optional): ``False`` waits for each copy as soon as it is issued
            (a baseline that shows what the overlap buys; results are identical) (default: True).
        layers (str, list of str or list of nn.Module, optional): the blocks; ``None`` finds every
            stack of repeated blocks (T5's encoder and decoder, a vision tower and a language
            model, ...), a dotted path names their container, a list of paths names several, a
            list of modules gives them (default: None).
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
        history_limit (int, optional): the most events, and the most per-step records, the history
            keeps (the most recent; older ones are counted in ``history["dropped"]``), so that memory
            and checkpoints do not grow with the length of the run (default: 1000).
        **optimizer_kwargs: further arguments for the built optimizer (e.g. ``amsgrad=True``).
    """


    _grass_facade = True  # groups.py refuses to wrap a GrassAdamW (without importing this module)

    def __init__(self, model: nn.Module, base_optimizer: Optimizer | type[Optimizer] | None = None, *,
                 lr: float | None = None, betas: tuple[float, float] | None = None,
                 eps: float | None = None, weight_decay: float | None = None,
                 active_layers: int = C.DEFAULT_ACTIVE_LAYERS, switch_every: int = C.DEFAULT_SWITCH_EVERY,
                 sampler: str | Sampler = "grass", probe_steps: int | None = None,
                 update_every: int | None = None, refresh_all: bool = C.DEFAULT_REFRESH_ALL,
                 temperature: float = C.DEFAULT_TEMPERATURE,
                 ema: float = C.DEFAULT_EMA, exploration: float = C.DEFAULT_EXPLORATION,
                 outside_blocks: str = C.DEFAULT_OUTSIDE_BLOCKS,
                 probe_low_memory: bool = C.DEFAULT_PROBE_LOW_MEMORY,
                 offload: bool | str | None = C.DEFAULT_OFFLOAD,
                 offload_overlap: bool = C.DEFAULT_OFFLOAD_OVERLAP,
                 layers: str | Sequence[str] | Sequence[nn.Module] | None = None, seed: int | None = None,
                 distributed_checks: bool = True, grad_scaler: Any = None, history: bool | str = True,
                 history_limit: int = 1000, **optimizer_kwargs: Any) -> None:
        # 1. Validate everything before touching the model or a wrapped optimizer.
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"GrassAdamW needs the model (an nn.Module) to find its blocks (repeated layers), got "
                f"{type(model).__name__}; pass the module itself: GrassAdamW(model, ...), not "
                "GrassAdamW(model.parameters()). To keep your own param groups, build an optimizer "
                "and wrap it: GrassAdamW(model, base_optimizer=torch.optim.AdamW(groups, ...))")
        check_optimizer_kwargs(base_optimizer, optimizer_kwargs, GRASS_KWARGS)
        resolved, self.config = check_grass_settings(
            sampler=sampler, temperature=temperature, ema=ema, exploration=exploration,
            active_layers=active_layers, switch_every=switch_every, probe_steps=probe_steps,
            update_every=update_every, refresh_all=refresh_all, outside_blocks=outside_blocks,
            probe_low_memory=probe_low_memory, offload=offload, offload_overlap=offload_overlap, seed=seed,
            distributed_checks=distributed_checks, history=history, history_limit=history_limit)
        given = {"temperature": temperature, "ema": ema, "exploration": exploration, "update_every": update_every,
                 "refresh_all": refresh_all}
        defaults = {"temperature": C.DEFAULT_TEMPERATURE, "ema": C.DEFAULT_EMA,
                    "exploration": C.DEFAULT_EXPLORATION, "update_every": None, "refresh_all": C.DEFAULT_REFRESH_ALL}
        for name in unused_settings(sampler, resolved, {k: v for k, v in given.items() if v != defaults[k]}):
            logger.warning("GrassAdamW: %s=%r has no effect with sampler=%r", name, given[name], sampler)
        check_grad_scaler(grad_scaler)
        self.partition = find_layers(model, layers)
        trainable = [p for ps in self.partition.block_params for p in ps if is_trainable(p)]
        D.check_ddp(model)
        sharded = any(D.is_sharded(p) for p in trainable)

        # 2. The base optimizer (built, or wrapped: its groups are split per block in place).
        adamw_kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.base_optimizer = build_base_optimizer(model, base_optimizer, self.partition, self.config.active_layers,
                                                   adamw_kwargs, optimizer_kwargs)
        self._ready = False
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        # Share, not copy: schedulers, GradScaler and clip_grad_norm_ see the base's groups/state.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults
        self._ready = True

        # 3. One owner per concern.
        in_optimizer = {id(p) for g in self.param_groups for p in g["params"]}
        self._freezer = BlockFreezer(self.partition, in_optimizer, train_outside=self.config.outside_blocks == "train")
        if self.config.outside_blocks == "train":
            warn_if_mostly_outside(self.partition, {id(p) for ps in self._freezer.blocks for p in ps}
                                   | {id(p) for p in self._freezer.outside})
        ranks = D.RankChecks() if distributed_checks and D.is_distributed() else None
        self.schedule = Schedule(self.config, resolved, self._freezer.numel,
                                 D.resolve_seed(seed, check=distributed_checks), self._freezer.device, ranks)
        self._measurer = BlockMeasurer(self._freezer.blocks, signal=getattr(resolved, "signal", "rms"),
                                       sharded=sharded, grad_scaler=grad_scaler,
                                       hooks=self.config.probe_low_memory and not D.is_distributed())
        self._policy = OffloadPolicy(self.config.offload)
        self._history = History(history, history_limit)
        self._offloader = self._new_offloader() if self.config.offload else None
        # Multi-process: DDP registers the parameters that require grad when it is built, and may be
        # built after this optimizer. Freezing waits until the first step() so that it registers
        # every block (its buckets hold every registered gradient anyway); that step's gradients of
        # inactive blocks are dropped before the update.
        self._defer_freeze = D.is_distributed()
        self._pending_load: tuple[Any, ...] | None = None
        # A step that raised part-way: what its update applied (skipped when it is tried again), and
        # whether state may be left between host and device (placement.py, _restore_placement).
        self._progress: Progress | None = None
        self._placement_dirty = False
        # (blocks with gradients, blocks updated) the model and the gradient hooks were last synced to
        self._synced: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        # Weak: a hook holding the optimizer would make a reference cycle, and the model would be given
        # back (freezing.py) only when the garbage collector finds it, not when the optimizer is dropped.
        self._own_hooks = {
            "sd_pre": self.register_state_dict_pre_hook(_weak(self._state_dict_pre_hook)),
            "sd_post": self.register_state_dict_post_hook(_weak(self._state_dict_post_hook)),
            "load_pre": self.register_load_state_dict_pre_hook(_weak(self._load_state_dict_pre_hook)),
            "load_post": self.register_load_state_dict_post_hook(_weak(self._load_state_dict_post_hook)),
        }
        self._names = {id(p): n for n, p in self.partition.root.named_parameters()} if self.partition.root else {}
        self._history.record_event("start", self.schedule)
        self._sync_model()
        # A wrapped optimizer may arrive with state: park what should not be on the device.
        self._policy.move(set(range(self.num_layers)), self._resident(), self._offloader, self._block_states)

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
        return self.schedule.active_blocks

    @property
    def importance(self) -> Tensor:
        """Current mean-gradient-norm score of each block (float64, CPU, a copy).

        NaN for a block not measured yet; 0 for a block with no trainable parameter (never drawn).
        """
        return self.schedule.importance.clone()

    @property
    def probabilities(self) -> Tensor:
        """Current sampling distribution over the blocks (float64, CPU, sums to 1; a copy).

        Uniform over the trainable blocks until probing ends.
        """
        return self.schedule.current_probabilities

    @property
    def is_probing(self) -> bool:
        """True during the first ``probe_steps`` steps (measure only, no update)."""
        return self.schedule.is_probing

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken, probing steps included."""
        return self.schedule.step

    @property
    def sampler(self) -> Sampler:
        return self.schedule.sampler

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
        return self._history.as_dict(self.layer_names, self.schedule)

    @property
    def grad_scaler(self) -> Any:
        """The GradScaler whose scale the probing hooks divide out (settable, e.g. once a trainer
        has created its scaler)."""
        return self._measurer.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        check_grad_scaler(scaler)
        self._measurer.grad_scaler = scaler

    def memory_report(self) -> MemoryReport:
        """Bytes of optimizer state on the device and on the host, and bytes copied so far.

        Reads only tensor sizes: no synchronisation.
        """
        return memory_report(self.state, self.partition, self._offloader)

    def __repr__(self) -> str:
        c = self.config
        return (f"GrassAdamW(base={type(self.base_optimizer).__name__}, layers={self.num_layers}, "
                f"active_layers={c.active_layers}, switch_every={c.switch_every}, "
                f"probe_steps={c.probe_steps}, update_every={c.update_every}, sampler={self.sampler!r}, "
                f"outside_blocks={c.outside_blocks!r}, active={list(self.active_layer_indices)})")

    # ------------------------------------------------------------------ the training step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Measure the gradients, update the active blocks (nothing while probing), then refresh
        the scores and redraw the active set when due. Returns ``closure()``'s loss, if given.

        The base optimizer steps once (its step hooks fire once) in every offload mode, and not at
        all while probing. Inside ``torch.compile`` the step is a graph break: it runs eagerly, as
        it would without compiling (``docs/guides/training_loop.md``)."""
        return self._step(closure)

    # Under torch.compile (of opt.step, or of a function doing forward, backward and step) the step
    # always runs eagerly, behind a graph break: traced, GRASS's bookkeeping (Python ints and lists,
    # the generator, hook sums written by backward, requires_grad) would be specialised into guards
    # or constants, and the traced step silently trains something else than the eager one. (Not on
    # step() itself: torch.optim's hook wrapper copies the "disabled" mark, which torch 2.7 then
    # resolves to the unbound function.)
    @torch.compiler.disable
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        s = self.schedule
        if s.step == 0:
            self.partition.check_unchanged()
        self.partition.check_no_new_parameters()
        if self._defer_freeze and self.partition.root is not None:
            # A DDP built after this optimizer (accelerator.prepare, the Trainer) was never checked;
            # now, before the first freeze, rather than at DDP's error a step too late.
            D.check_ddp_wrappers(self.partition.root)
        self._follow_device()
        if self._synced is None and not self._defer_freeze:
            self._sync_model()  # after restore_model(): GRASS takes the model back
        self._check_trainability()
        self._restore_placement()  # after a step that raised part-way
        record = self._measurer.measure(s)
        if self._defer_freeze or s.gradient_blocks != s.active_blocks:
            # Gradients of blocks that are not updated (measured on a refresh_all step without hooks,
            # or computed before deferred freezing) never reach the update.
            self._freezer.drop_grads(s.active_blocks)
        # From here until the moves at the end, an exception leaves state between host and device:
        # the next step() (or state_dict()) puts it back where the schedule expects it first.
        self._placement_dirty = self._offloader is not None
        resident: set[int] = set()
        if not s.is_probing:
            if self._progress is None or self._progress.step != s.step:
                self._progress = Progress(s.step)
            skipped = {i for i in self._progress.parts if i is not None}
            self._measurer.before_update(s)
            resident = self._policy.update(s.active, self.base_optimizer.step, self._step_parts, self._offloader,
                                           self._block_states, self._progress)
            record = self._measurer.after_update(s, skipped) or record
        event = s.advance(record)  # all or nothing: a step tried again records its signal once
        self._progress = None
        self._defer_freeze = False
        if (s.gradient_blocks, s.active_blocks) != self._synced:
            self._sync_model()
        if event is not None:
            self._history.record_event(event, s)
        self._policy.move(resident, self._resident(), self._offloader, self._block_states)
        self._placement_dirty = False
        if self._history.records_steps:
            timings = self._offloader.drain_timings() if self._offloader is not None else []
            self._history.record_step(s.step, self.memory_report(), timings)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._zero_grad(set_to_none)

    @torch.compiler.disable  # eager, as _step() and for the same reasons
    def _zero_grad(self, set_to_none: bool) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        # The probing sums belong to the gradients just cleared: a step that a GradScaler skipped
        # (it never called step()) must not leave them to the next one.
        self.schedule.drop_hook_sums()

    @contextmanager
    def _step_parts(self) -> Iterator[StepPart]:
        with step_hooks_once(self.base_optimizer):
            yield lambda block: step_groups_of(self.base_optimizer, block)

    def _check_trainability(self) -> None:
        """Someone else changed requires_grad since GRASS last set it (freezing.py has the rule)."""
        blocks_before = [len(ps) for ps in self._freezer.blocks] + [len(self._freezer.outside)]
        unfrozen = self._freezer.check(self._names)
        if unfrozen:  # their gradients were computed in this backward: they never reach the update
            self._freezer.drop_grads(self.schedule.gradient_blocks)
        if blocks_before != [len(ps) for ps in self._freezer.blocks] + [len(self._freezer.outside)]:
            self.schedule.set_sampleable([n > 0 for n in self._freezer.numel])  # a freeze was adopted
            self._measurer.moved(self.schedule)

    def restore_model(self) -> None:
        """Give the model back as the user left it: ``requires_grad=True`` again on every parameter GRASS
        froze (the user's own freezes stay), no GRASS hooks. A later ``step()`` takes it back.

        Also done on leaving ``with GrassAdamW(...) as opt:``, and when the optimizer is garbage-collected.
        """
        self._freezer.restore()
        self._measurer.remove_hooks()
        self._synced = None

    def __enter__(self) -> GrassAdamW:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore_model()

    def __deepcopy__(self, memo: dict[int, Any]) -> GrassAdamW:
        raise TypeError("GrassAdamW cannot be copied: it holds the model's parameters, hooks on them and "
                        "device buffers. Copy its state instead: copy.deepcopy(opt.state_dict()), then "
                        "GrassAdamW(model, ...).load_state_dict(...)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("GrassAdamW cannot be pickled: it holds the model's parameters, hooks on them and "
                        "device buffers. Save its state instead: torch.save(opt.state_dict(), path)")

    def _sync_model(self) -> None:
        """Make the model's requires_grad (and the gradient hooks) match the blocks that get gradients
        this step: at construction, after a step that changed them, after a load."""
        if not self._defer_freeze:
            self._freezer.apply(self.schedule.gradient_blocks)
            self._synced = (self.schedule.gradient_blocks, self.schedule.active_blocks)
        self._measurer.prepare(self.schedule)

    def _follow_device(self) -> None:
        """Move the bookkeeping to the blocks' device if the model moved after construction (e.g.
        a trainer calling ``model.to(device)`` after the optimizer was built)."""
        device = self._freezer.device
        if device == self.schedule.device and (self._offloader is None or self._offloader.device == device):
            return
        if self._offloader is not None and self._offloader.host_buffer_bytes:
            raise RuntimeError(f"GrassAdamW: the model moved from {self.schedule.device} to {device} after "
                               "optimizer state was offloaded; build the optimizer after moving the model")
        self._move_schedule()
        self._renew_offloader()

    def _move_schedule(self) -> None:
        """The schedule's per-step buffers (and what points at them) to the blocks' device."""
        if self._freezer.device != self.schedule.device:
            self.schedule.to(self._freezer.device)
            self._measurer.moved(self.schedule)

    def _renew_offloader(self) -> None:
        """A new offloader for the schedule's device, once no state lives in the old one's buffers."""
        if self._offloader is not None and self._offloader.device != self.schedule.device:
            self._offloader = self._new_offloader()
            self._history.restart_copy_counts()

    # ------------------------------------------------------------------ where states live
    def synchronize(self) -> None:
        """Wait until every copy of optimizer state between host and device has finished.

        Between steps, with ``offload=`` on an accelerator, a write-back or a prefetch may still be
        running: :attr:`state` may be read or written from the host only after this (``state_dict()``
        and ``load_state_dict()`` call it themselves). A no-op without offloading or on a CPU.
        """
        if self._offloader is not None:
            self._offloader.synchronize()

    def _restore_placement(self) -> None:
        """After a step that raised part-way (out of memory in the base optimizer, or while moving
        state), put every block's state where the schedule expects it before anything reads it:
        resident blocks on the device, the others in their host buffers. A no-op otherwise."""
        if not self._placement_dirty or self._offloader is None:
            return
        resident = self._resident()
        for i in range(self.num_layers):
            if i in resident:
                self._offloader.prefetch(i, self._block_states(i))  # the update waits for it, as usual
            else:
                self._offloader.offload(i, self._block_states(i))
        self._placement_dirty = False

    def _new_offloader(self) -> StateOffloader:
        off = StateOffloader(self.schedule.device, overlap=self.config.offload_overlap)
        off.timing = self._history.records_steps
        return off

    def _resident(self, step: int | None = None, active: Sequence[int] | None = None) -> set[int]:
        s = self.schedule
        step = s.step if step is None else step
        return self._policy.resident(s.active if active is None else active, step < self.config.probe_steps)

    def _block_states(self, i: int) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(p, self.state[p]) for p in self._freezer.blocks[i] if p in self.state]

    # ------------------------------------------------------------------ checkpointing (checkpoint.py)
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict of the base optimizer's groups and state, plus ``"grass"``:
        everything GRASS needs to continue exactly (``checkpoint.py``).

        Plain tensors, ints, lists and dicts: round-trips through ``torch.load(weights_only=True)``.
        Hooks registered with ``register_state_dict_pre_hook``/``post_hook`` run once per call; a
        post-hook sees the ``"grass"`` entry.
        """
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, and re-apply the freezing it implies to the model.

        The ``"grass"`` entry is checked before anything is changed: a checkpoint of another model
        (other block count or block sizes) raises ``ValueError`` and leaves this optimizer as it was.
        Users' ``load_state_dict`` pre-hooks run before that check and see the whole checkpoint;
        post-hooks run after the schedule is restored.
        """
        super().load_state_dict(state_dict)

    def _state_dict_pre_hook(self, _opt: Optimizer) -> None:
        self._restore_placement()
        self.synchronize()  # the host reads buffers that copies may still be writing

    def _state_dict_post_hook(self, _opt: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        if self._offloader is not None:
            sd["state"] = ckpt.host_copies(sd["state"])
        events, steps = self._history.state()
        sd[ckpt.GRASS] = {**self.schedule.state_dict(), ckpt.HISTORY: events, ckpt.HISTORY_STEPS: steps,
                          ckpt.HISTORY_DROPPED: dict(self._history.dropped)}
        if self._progress is not None and self._progress.step == self.schedule.step:
            sd[ckpt.GRASS][ckpt.PROGRESS] = ckpt.progress_entry(self._progress)
        return sd

    def _load_state_dict_pre_hook(self, _opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        self._pending_load = None
        entry = ckpt.grass_entry(state_dict)
        # The model may have moved since this optimizer was built (Accelerate's prepare(), then
        # load_state()): the checked values go to where the blocks are now.
        self._move_schedule()
        values = self.schedule.check_state_dict(entry)  # raises before anything changes
        progress = ckpt.check_progress(entry, values["step"], self.num_layers)
        changed = self.schedule.changed_settings(entry)
        if changed:
            logger.warning("GrassAdamW.load_state_dict: schedule settings differ from the checkpoint "
                           "(%s); the run continues with the new ones", "; ".join(changed))
        base_sd = {k: v for k, v in state_dict.items() if k != ckpt.GRASS}
        parked: dict[int, dict[str, Tensor]] = {}
        if self._offloader is not None:
            self._offloader.synchronize()  # host buffers are about to be overwritten from the checkpoint
            params = [p for g in self.param_groups for p in g["params"]]
            base_sd["state"], parked = ckpt.split_parked(state_dict, params, self._freezer.blocks,
                                                         self._resident(values["step"], values["active"]))
        self._pending_load = (values, entry.get(ckpt.HISTORY), entry.get(ckpt.HISTORY_STEPS),
                              entry.get(ckpt.HISTORY_DROPPED), parked, progress)
        return base_sd

    def _load_state_dict_post_hook(self, _opt: Optimizer) -> None:
        assert self._pending_load is not None
        (values, events, steps, dropped, parked, progress), self._pending_load = self._pending_load, None
        self._renew_offloader()  # every state was just replaced: the old device's buffers are unused
        self._progress, self._placement_dirty = progress, False
        # Optimizer.load_state_dict gave this optimizer new state and groups: hand them to the base
        # through its own __setstate__ (which fills in its defaults for older checkpoints), share again.
        self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        self.state, self.param_groups = self.base_optimizer.state, self.base_optimizer.param_groups
        self.schedule.apply_checked(values)
        self._history.load(events, steps, dropped)
        event = self.schedule.reconcile()  # settings changed since the checkpoint: never an empty active set
        if event is not None:
            self._history.record_event(event, self.schedule)
        if self._offloader is not None:
            by_id = {id(p): p for g in self.param_groups for p in g["params"]}
            self._offloader.load_parked((by_id[pid], self.state[by_id[pid]], k, v)
                                        for pid, entry in parked.items() for k, v in entry.items())
        self._sync_model()

    # GRASS's own hooks keep their place among the users': its state-dict post-hook and load
    # post-hook run first (users see the "grass" entry and the restored schedule), its load pre-hook
    # last (users' pre-hooks see, and may change, the whole checkpoint before GRASS checks it).
    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self._keep_own_hooks(super().register_state_dict_post_hook(hook, prepend))

    def register_load_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self._keep_own_hooks(super().register_load_state_dict_pre_hook(hook, prepend))

    def register_load_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self._keep_own_hooks(super().register_load_state_dict_post_hook(hook, prepend))

    def _keep_own_hooks(self, handle: Any) -> Any:
        own = getattr(self, "_own_hooks", None)
        if own is not None:  # None while the constructor registers them
            self._optimizer_state_dict_post_hooks.move_to_end(own["sd_post"].id, last=False)
            self._optimizer_load_state_dict_pre_hooks.move_to_end(own["load_pre"].id)
            self._optimizer_load_state_dict_post_hooks.move_to_end(own["load_post"].id, last=False)
        return handle


def check_grass_settings(*, sampler: str | Sampler, temperature: float, ema: float, exploration: float,
                         active_layers: int, switch_every: int, probe_steps: int | None, update_every: int | None,
                         refresh_all: bool, outside_blocks: str, probe_low_memory: bool, offload: bool | str | None,
                         offload_overlap: bool, seed: int | None, distributed_checks: bool, history: bool | str,
                         history_limit: int) -> tuple[Sampler, C.GrassConfig]:
    """GrassAdamW's checks of its settings that need no model; returns the resolved sampler and the
    config. ``grass_optim.integrations.grass_settings`` runs them on a config, before any model exists."""
    resolved = resolve_sampler(sampler, temperature=temperature, ema=ema, exploration=exploration)
    config = C.GrassConfig.build(
        active_layers=active_layers, switch_every=switch_every, probe_steps=probe_steps,
        update_every=update_every, refresh_all=refresh_all, outside_blocks=outside_blocks,
        probe_low_memory=probe_low_memory, offload=offload, offload_overlap=offload_overlap,
        default_probe_steps=default_probe_steps(resolved))
    if seed is not None:
        C.check_int("seed", seed, 0, 2**63 - 1)
    C.check_bool("distributed_checks", distributed_checks)
    C.check_history(history)
    C.check_int("history_limit", history_limit, 1)
    return resolved, config


# GrassAdamW's keyword-only arguments (the GRASS settings, and the built AdamW's lr/betas/eps/weight_decay)
# and their defaults, for "did you mean" and grass_optim.integrations.grass_settings.
GRASS_DEFAULTS = {n: p.default for n, p in inspect.signature(GrassAdamW.__init__).parameters.items()
                  if p.kind is p.KEYWORD_ONLY}
GRASS_KWARGS = tuple(GRASS_DEFAULTS)


def _weak(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (bound) through a weak reference to its object: a hook that does not keep it alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)
    return call

"""The benchmark harness: what every script under ``benchmarks/`` shares, written once.

* **Methods** (:data:`METHODS`, :func:`make_optimizer`): one name, one optimizer setup, and the row of
  ``estimate_memory`` that predicts it, for every script.
* **State bytes** (:func:`state_bytes`): optimizer state "on the device" is what the library's
  ``memory_report`` says, for GrassAdamW and plain optimizers alike.
* **Output**: :func:`log`, :func:`progress`, :func:`markdown_table`, :func:`write_json` (atomic, strict
  JSON), :func:`environment`.
* **The timed step** (:func:`train_step`, :func:`synchronize`).
* **Statistics** (:func:`mean_ci`, :func:`paired_differences`): means with 95 % t-intervals, and
  differences paired by seed.
* **Processes** (:class:`Worker`, :func:`serve`, :func:`map_unordered`): the script itself as a child
  process that answers one JSON line with one JSON line.

The scripts keep only what is theirs (models, tasks, tables); methodology and results are in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 1024**3, 1024**2
UNITS = {"GiB": GIB, "MiB": MIB}


def import_grass_optim() -> Any:
    """``import grass_optim``, from the installed package or, failing that, from this checkout."""
    try:
        import grass_optim
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO_ROOT))
        import grass_optim
    return grass_optim


grass_optim = import_grass_optim()


# ----------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """``grass``: GrassAdamW settings over the script's own (``None``: ``torch.optim.AdamW``);
    ``estimate``: the ``estimate_memory`` row that predicts its device memory."""

    grass: dict[str, Any] | None
    estimate: str
    about: str


METHODS: dict[str, Method] = {
    "adamw": Method(None, "adamw", "torch.optim.AdamW over every trainable parameter"),
    "full": Method(None, "adamw", "full fine-tuning: torch.optim.AdamW over every trainable parameter"),
    "grass-all": Method({"sampler": "grass", "active_layers": "all"}, "adamw",
                        "GrassAdamW training every block: AdamW's updates plus GRASS's bookkeeping"),
    "lisa": Method({"sampler": "uniform", "probe_steps": 0}, "lisa", "LISA: uniform draws, no probing"),
    "grass-static": Method({"sampler": "static"}, "grass", "static GRASS: the probing scores, never refreshed"),
    "grass": Method({"sampler": "grass"}, "grass", "GRASS: importance sampling, the published method"),
    "grass-refresh": Method({"sampler": "grass", "refresh_all": True}, "grass",
                            "GRASS with refresh_all: every block measured on the step before each refresh"),
    "l1": Method({"sampler": "l1", "refresh_all": True}, "grass",
                 "scores from ||g||_1 (the loss decrease a sign-like Adam step would give), refresh_all"),
    "gain": Method({"sampler": "gain"}, "grass", "a bandit on the first-order loss decrease of each block's updates"),
    "grass-probe": Method({"sampler": "grass"}, "grass", "GRASS with the script's probing steps"),
    "lisa-probe": Method({"sampler": "uniform"}, "lisa", "LISA given the same probing steps as grass-probe"),
    "grass-inactive": Method({"sampler": "grass", "offload": "inactive"}, "grass-inactive",
                             "GRASS, inactive blocks' state parked on the host"),
    "grass-stream": Method({"sampler": "grass", "offload": "stream"}, "grass-stream",
                           "GRASS, every block's state on the host between steps, updated block by block"),
    "grass-stream-blocking": Method({"sampler": "grass", "offload": "stream", "offload_overlap": False},
                                    "grass-stream", "grass-stream waiting for each copy as soon as it is issued"),
}


def make_optimizer(method: str, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                   variants: dict[str, dict[str, Any]] | None = None, **grass_kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer of ``method`` (or of a settings variant of ``grass``, by name, from ``variants``).

    ``grass_kwargs`` are the script's GrassAdamW settings; the method's own override them.
    ``active_layers="all"`` means every block.
    """
    spec = METHODS[method].grass if method in METHODS else (variants or {})[method]
    if spec is None:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    kwargs = {**grass_kwargs, **spec}
    if kwargs.get("active_layers") == "all":
        kwargs["active_layers"] = grass_optim.find_layers(model).num_layers
    return grass_optim.GrassAdamW(model, lr=lr, weight_decay=weight_decay, **kwargs)


def state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Optimizer-state bytes (tensors of >= 1 dimension) on the device and on the host, as
    ``memory_report`` counts them: for a plain optimizer nothing is parked, so "host" is state kept on
    another device than its parameter."""
    if isinstance(opt, grass_optim.GrassAdamW):
        rep = opt.memory_report()
    else:
        rep = grass_optim.memory.memory_report(opt.state)
    return {"device": rep.device_state_bytes, "host": rep.host_state_bytes}


# -------------------------------------------------------------------------------------- statistics
# Two-sided 95 % quantiles of Student's t, by degrees of freedom (beyond 30: the normal's, corrected).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_ci(xs: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the half-width of its 95 % t-interval (None below 2 values)."""
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return {"n": n, "mean": mean, "sd": sd, "ci95": t975(n - 1) * sd / math.sqrt(n)}


def paired_differences(a: dict[Any, float], b: dict[Any, float]) -> list[float]:
    """``a[k] - b[k]`` for every key (seed) both have, in key order."""
    return [a[k] - b[k] for k in sorted(set(a) & set(b))]


# ------------------------------------------------------------------------------------------ output
def token_batches(vocab_size: int, rows: int, seq: int, steps: int) -> list[Tensor]:
    """``steps`` global batches of ``rows`` random token rows of ``seq + 1`` (inputs and targets), the
    same for every rank and every method (multi-process benchmarks: rank r takes its chunk)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab_size, (rows, seq + 1), generator=g) for _ in range(steps)]


def grad_storages(model: nn.Module) -> dict[int, int]:
    """Distinct storages behind this rank's ``.grad`` (local shards under FSDP2): data pointer -> bytes."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            seen[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
    return seen


def log(msg: str) -> None:
    """A line on stderr, above any progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(msg, file=sys.stderr, flush=True)
        return
    tqdm.write(msg, file=sys.stderr)


class _NoBar:
    """Stands in for a tqdm bar where tqdm is not installed (the GPU machine may lack it)."""

    def __init__(self, iterable: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Any, desc: str, **kwargs: Any) -> Any:
    """A progress bar on stderr (tqdm, at most one refresh a second), or a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(iterable)
    kwargs = {"mininterval": 1.0, "ncols": 110, "leave": False, **kwargs}
    return tqdm(iterable, desc=desc, file=sys.stderr, **kwargs)


def fmt_bytes(nbytes: float | None, unit: str = "GiB", digits: int = 2) -> str:
    return "n/a" if nbytes is None else f"{nbytes / UNITS[unit]:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def json_safe(x: Any) -> Any:
    """Strict JSON: NaN and infinities become ``None``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: str | Path, result: Any) -> None:
    """Write ``result`` atomically (a run cut short leaves the last complete file), directories included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(result), indent=1, default=str) + "\n")
    tmp.replace(path)


def git_revision() -> str | None:
    """Short commit of the checkout, with ``+dirty`` when it has local changes; None outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def environment(device: str | torch.device) -> dict[str, Any]:
    """What ran the benchmark: date, versions, commit, device."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "grass_optim": getattr(grass_optim, "__version__", None),
        "git": git_revision(),
        "device": str(device),
        "device_name": None,
        "cpu_count": os.cpu_count(),
    }
    if is_cuda(device):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["device_name"] = props.name
        env["device_total_bytes"] = props.total_memory
    return env


# -------------------------------------------------------------------------------------- the step
PHASES = ("forward", "backward", "step", "zero_grad", "total")


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def train_step(loss_of: Callable[[], Tensor], opt: torch.optim.Optimizer,
               after_step: Callable[[], Any] | None = None,
               before_step: Callable[[], Any] | None = None) -> tuple[Tensor, tuple[float, ...]]:
    """One training step: ``loss_of()`` (forward and loss), backward, ``before_step()`` (e.g. a
    diagnostic that reads the gradients), ``opt.step()``, ``after_step()`` (e.g. the LR scheduler),
    ``opt.zero_grad(set_to_none=True)``.

    Returns the loss, unread (reading it would synchronise with the device), and the host seconds of
    each of :data:`PHASES` (meaningful per phase on CPU, where nothing runs asynchronously).
    """
    t0 = time.perf_counter()
    loss = loss_of()
    t1 = time.perf_counter()
    loss.backward()
    if before_step is not None:
        before_step()
    t2 = time.perf_counter()
    opt.step()
    if after_step is not None:
        after_step()
    t3 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return loss, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)


# ------------------------------------------------------------------------------------- processes
WORKER_FLAG = "--_worker"


class Worker:
    """The script ``script`` run again as a child process (``script --_worker ROLE``): each JSON
    object written to it gets one JSON object back (:func:`serve` is the child's side).

    A separate process per run gives each its own allocator and peak RSS, and lets runs go in
    parallel. ``env`` adds (or, with ``None``, removes) environment variables; the repository root
    is put on ``PYTHONPATH`` so an uninstalled checkout works. The child's stderr is kept for the
    error message unless ``stderr="inherit"`` (progress bars).
    """

    def __init__(self, script: str | Path, role: str, *, args: Iterable[str] = (),
                 env: dict[str, str | None] | None = None, stderr: str = "capture") -> None:
        self.role = role
        child_env = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                child_env.pop(k, None)
            else:
                child_env[k] = v
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        self._err = tempfile.TemporaryFile(mode="w+") if stderr == "capture" else None  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, str(script), WORKER_FLAG, role, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=child_env)

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The child's next reply; lines that are not JSON objects (a library's print) are skipped."""
        assert self.proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    self.proc.kill()
                    raise TimeoutError(f"{self.role} worker gave no answer in {timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                raise RuntimeError(f"{self.role} worker exited with {self.proc.returncode}: {self._stderr_tail()}")
            if line.startswith("{"):
                return json.loads(line)

    def call(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self.send(msg)
        return self.receive(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]  # the child's serve() loop ends
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self._err is not None:
            self._err.close()

    def _stderr_tail(self) -> str:
        if self._err is None:
            return "(its stderr is above)"
        self._err.seek(0)
        return self._err.read()[-3000:]


def worker_role(argv: list[str]) -> str | None:
    """The ROLE of ``--_worker ROLE`` in ``argv``, when this process is a :class:`Worker`."""
    return argv[argv.index(WORKER_FLAG) + 1] if WORKER_FLAG in argv else None


def serve(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The child's side of :class:`Worker`: answer every JSON line on stdin, until stdin closes.

    Replies go to the real stdout; anything else the handler prints goes to stderr, so it cannot be
    taken for a reply.
    """
    out = sys.stdout
    sys.stdout = sys.stderr
    try:
        for line in sys.stdin:
            out.write(json.dumps(handler(json.loads(line))) + "\n")
            out.flush()
    finally:
        sys.stdout = out


def map_unordered(workers: list[Worker], messages: Iterable[dict[str, Any]],
                  timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Send each message to whichever worker is free; yield the replies as they come."""
    todo: queue.Queue[dict[str, Any] | None] = queue.Queue()
    done: queue.Queue[tuple[str, Any]] = queue.Queue()
    count = 0
    for msg in messages:
        todo.put(msg)
        count += 1
    for _ in workers:
        todo.put(None)

    def drive(worker: Worker) -> None:
        while (msg := todo.get()) is not None:
            try:
                done.put(("ok", worker.call(msg, timeout)))
            except Exception as err:  # reported to the caller, in its thread
                done.put(("error", err))
                return

    threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for _ in range(count):
        kind, value = done.get()
        if kind == "error":
            raise value
        yield value
    for t in threads:
        t.join()

"""Draw what the GRASS sampler did: :attr:`GrassAdamW.history` as a picture.

>>> from grass_optim.plot import plot_history, save_history
>>> save_history(opt, "history.json")                 # doctest: +SKIP
>>> plot_history("history.json", "history.png")       # doctest: +SKIP

or, from a shell: ``python -m grass_optim.plot history.json -o history.png``.

matplotlib is optional (``pip install matplotlib``): it is imported only when a figure is drawn,
never by ``import grass_optim`` nor by ``import grass_optim.plot``. Figures are drawn on a private
Agg canvas (no pyplot, no change to the global backend or rcParams), so plotting from a notebook
or a training job leaves the caller's matplotlib setup alone. See ``docs/guides/visualise.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is optional and imported lazily
    from matplotlib.figure import Figure

__all__ = ["load_history", "plot_history", "save_history", "main"]

DPI = 120
_EVENT_KEYS = ("step", "event", "active", "importance", "probabilities")
_MAX_NAMED_TICKS = 24  # more blocks than this: integer ticks instead of names
_MAX_LEGEND = 10  # more blocks than this: importance curves coloured by index, with a colorbar


# ---------------------------------------------------------------------------------------- data
def _unwrap(source: Any) -> tuple[Any, int | None]:
    """The raw history of an optimizer (with its step count) or of a ``{"history": ...}`` dict."""
    if hasattr(source, "history") and not isinstance(source, dict):  # a GrassAdamW
        steps = getattr(source, "num_steps", None)
        return source.history, steps if isinstance(steps, int) else None
    if isinstance(source, dict) and "events" not in source and isinstance(source.get("history"), dict):
        return source["history"], None
    return source, None


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory, not a history JSON file") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected the JSON written by save_history)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _number(value: Any) -> float:
    """A float; ``None`` (how :func:`save_history` writes NaN) becomes NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return float(value)


def load_history(source: Any) -> dict[str, Any]:
    """Read and check a history; return it normalised (NaN for missing scores, events by step).

    ``source`` is the dict of :attr:`GrassAdamW.history`, a dict ``{"history": ...}`` holding it,
    a ``GrassAdamW`` itself, or the path (``str``/``PathLike``) of a JSON file holding either dict.
    The result has ``layer_names``, ``config``, ``events`` and ``num_steps`` (the optimizer's step
    count when known: from an optimizer, or from a file written by :func:`save_history`; else None).

    Raises ``FileNotFoundError``/``OSError`` for an unreadable file and ``ValueError`` for content
    that is not a history; the messages name the file.
    """
    where = ""
    num_steps = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = f"{path}: "
        source = _read_json(path)
    raw, num_steps = _unwrap(source)
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
        got = type(raw).__name__ if not isinstance(raw, dict) else f"a dict with keys {sorted(raw)[:8]}"
        raise ValueError(f"{where}not a GrassAdamW history (expected a dict with an 'events' list, as in "
                         f"opt.history, or {{'history': opt.history}}; got {got})")
    if num_steps is None and raw.get("num_steps") is not None:
        num_steps = raw["num_steps"]
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"{where}invalid history: num_steps is {num_steps!r} (expected an int >= 0)")
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{where}invalid history: config is a {type(config).__name__}, expected a dict")

    events: list[dict[str, Any]] = []
    width = None
    for k, e in enumerate(raw["events"]):
        if not isinstance(e, dict) or any(key not in e for key in _EVENT_KEYS):
            missing = [key for key in _EVENT_KEYS if not isinstance(e, dict) or key not in e]
            raise ValueError(f"{where}invalid history: event {k} lacks {', '.join(missing)}")
        try:
            step = e["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise TypeError(step)
            imp = [_number(v) for v in e["importance"]]
            prob = [_number(v) for v in e["probabilities"]]
            active = [int(i) for i in e["active"]]
        except (TypeError, ValueError):
            raise ValueError(f"{where}invalid history: event {k} ({e.get('event')!r} at step {e.get('step')!r}) "
                             "holds a value that is not a number (step: int >= 0; importance, probabilities: "
                             "numbers or null; active: ints)") from None
        width = len(prob) if width is None else width
        if len(prob) != width or len(imp) != width:
            raise ValueError(f"{where}invalid history: event {k} has {len(imp)} scores and {len(prob)} "
                             f"probabilities (expected {width} of each, one per block)")
        if any(not 0 <= i < width for i in active):
            raise ValueError(f"{where}invalid history: event {k} has active blocks {active} outside [0, {width})")
        events.append({"step": step, "event": str(e["event"]), "active": sorted(set(active)),
                       "importance": imp, "probabilities": prob})
    events.sort(key=lambda ev: ev["step"])  # stable: events of one step keep their order

    names = raw.get("layer_names")
    if names is None:
        names = [f"block {i}" for i in range(width or 0)]
    if not isinstance(names, list) or (width is not None and len(names) != width):
        raise ValueError(f"{where}invalid history: {len(names) if isinstance(names, list) else names!r} layer "
                         f"names for {width} blocks")
    return {"layer_names": [str(n) for n in names], "config": dict(config), "events": events,
            "num_steps": num_steps}


def save_history(opt_or_history: Any, path: str | os.PathLike[str]) -> Path:
    """Write a history to ``path`` as standard JSON, one event per line; return the path.

    ``opt_or_history`` is a ``GrassAdamW`` (its :attr:`~GrassAdamW.history`, plus ``"num_steps"``,
    the steps taken so far, so that the plot knows where the last interval ends), or a history dict
    (or ``{"history": ...}``). NaN scores (blocks not measured yet) are written as ``null``: the
    file is strict JSON, readable by any JSON parser (``json.load`` gives ``None`` for them, which
    :func:`load_history` and :func:`plot_history` turn back into NaN). The file's parent folder
    must exist.
    """
    raw, num_steps = _unwrap(opt_or_history)
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
        raise ValueError(f"save_history needs a GrassAdamW or its history dict, got {type(raw).__name__}")
    head = {k: _jsonable(v) for k, v in raw.items() if k != "events"}
    if num_steps is not None:
        head["num_steps"] = num_steps
    lines = [json.dumps(_jsonable(e), allow_nan=False) for e in raw["events"]]
    text = json.dumps(head, allow_nan=False)[:-1]
    text += (", " if head else "") + '"events": [' + ("\n" + ",\n".join(lines) + "\n" if lines else "") + "]}\n"
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN -> None, tensors/arrays/tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or scalar
        return _jsonable(value.tolist())
    return value


# ---------------------------------------------------------------------------------------- timeline
def _next_event_step(step: int, config: dict[str, Any]) -> int:
    """The step of the event the optimizer would record after one at ``step`` (same schedule)."""
    probe = int(config.get("probe_steps") or 0)
    if step < probe:
        return probe
    every = [int(config[k]) for k in ("update_every", "switch_every") if int(config.get(k) or 0) > 0]
    if not every:
        return step + 1
    n = step - probe
    return probe + min((n // e + 1) * e for e in every)


def _block_axis_labels(names: Sequence[str]) -> tuple[list[str] | None, str]:
    """Tick labels (None: integer ticks) and axis label for the blocks."""
    n = len(names)
    prefix = os.path.commonprefix(list(names)) if n > 1 else ""
    if n > 1 and all(name[len(prefix):] == str(i) for i, name in enumerate(names)):
        return None, f"block ({prefix}<i>)"  # layers.0, layers.1, ...: the index says it all
    if n <= _MAX_NAMED_TICKS:
        return list(names), "block"
    return None, "block index"


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of the consecutive True entries."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


# ---------------------------------------------------------------------------------------- figure
def plot_history(history: Any, path: str | os.PathLike[str] | None = None, *, title: str | None = None) -> Figure:
    """Draw a GRASS history; save it as PNG (dpi 120) when ``path`` is given; return the Figure.

    ``history``: anything :func:`load_history` reads (the ``opt.history`` dict, ``{"history": ...}``,
    a ``GrassAdamW``, or a JSON file path). Top panel: the sampling probability of every block (rows)
    over optimizer steps (x; constant between two events), the blocks trained in each interval
    outlined, the probing phase hatched and its end marked by a dashed line. Bottom panel: each
    block's importance score (log scale; gaps where a block has no score yet).

    The end of the last interval is the history's ``num_steps`` when known (:func:`save_history`
    of an optimizer records it); otherwise the step of the next event the schedule would have
    recorded (an upper bound), drawn faded.

    Raises ``ValueError`` for a history without events (``GrassAdamW(..., history=False)``),
    ``ImportError`` without matplotlib.
    """
    h = load_history(history)
    events = h["events"]
    if not events:
        raise ValueError("The history has no events, so there is nothing to plot: the optimizer was built "
                         "with history=False (build GrassAdamW(..., history=True), the default, to record one)")
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch, Rectangle
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("grass_optim.plot needs matplotlib: pip install matplotlib") from e

    names, config = h["layer_names"], h["config"]
    n_blocks = len(names)
    steps = [e["step"] for e in events]
    last = steps[-1]
    known_end = h["num_steps"] is not None and h["num_steps"] >= last
    end = h["num_steps"] if known_end else _next_event_step(last, config)
    edges = np.array([*steps, end], dtype=float)
    prob = np.array([e["probabilities"] for e in events], dtype=float).T  # (blocks, events)
    imp = np.array([e["importance"] for e in events], dtype=float).T
    imp[imp <= 0] = np.nan  # 0: a block with nothing to train (never drawn); no place on a log axis

    probe_end = next((e["step"] for e in events if e["event"] == "probe_end"), None)
    probe_steps = int(config.get("probe_steps") or 0)
    if probe_end is not None:
        probing = (steps[0], probe_end) if probe_end > steps[0] else None
    elif events[0]["event"] == "start" and probe_steps > steps[0]:
        probing = (steps[0], min(probe_steps, end))  # stopped (or saved) before probing ended
    else:
        probing = None
    in_probing = [probing is not None and probing[0] <= s < probing[1] for s in steps]

    height = 5.2 + min(n_blocks, 48) * 0.12
    fig = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(fig)  # a private Agg canvas: pyplot and the global backend are left alone
    # Colorbars and the block legend sit in the right margins, which constrained layout makes
    # equal: both panels keep the same x extent.
    ax_p, ax_i = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.25, 1]})

    # -- top: probabilities, active blocks, probing
    y_edges = np.arange(n_blocks + 1) - 0.5
    vmax = float(np.nanmax(prob)) if np.isfinite(prob).any() else 1.0
    mesh = ax_p.pcolormesh(edges, y_edges, prob, cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-12),
                           shading="flat", rasterized=True)
    fig.colorbar(mesh, ax=ax_p, label="sampling probability", pad=0.01, fraction=0.04)
    lw = 1.8 if n_blocks <= 16 else 1.0
    handles: list[Any] = []
    for b in range(n_blocks):
        flags = [b in e["active"] and not in_probing[k] for k, e in enumerate(events)]
        for i, j in _runs(flags):
            # Inset a little, so that the outlines of neighbouring blocks stay apart.
            ax_p.add_patch(Rectangle((edges[i], b - 0.44), edges[j] - edges[i], 0.88, fill=False,
                                     edgecolor="#ff3030", linewidth=lw, zorder=3))
    if ax_p.patches:
        handles.append(Patch(facecolor="none", edgecolor="#ff3030", linewidth=lw, label="trained (active) blocks"))
    if probing is not None:
        ax_p.add_patch(Rectangle((probing[0], -0.5), probing[1] - probing[0], n_blocks, facecolor="none",
                                 edgecolor="white", hatch="//", linewidth=0, alpha=0.6, zorder=2))
        handles.append(Patch(facecolor="#bbbbbb", edgecolor="white", hatch="//",
                             label="probing: every block measured, none updated"))
    if probe_end is not None:
        for ax in (ax_p, ax_i):
            ax.axvline(probe_end, color="black", linestyle="--", linewidth=1.2, zorder=4)
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"end of probing (step {probe_end})"))
    if not known_end and end > last:
        for ax in (ax_p, ax_i):
            ax.axvspan(last, end, facecolor="white", alpha=0.45, linewidth=0, zorder=2.5)
        handles.append(Patch(facecolor="#eeeeee", edgecolor="#999999",
                             label="after the last event (run length not recorded)"))
    if handles:
        ax_p.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, fontsize=8,
                    frameon=False, borderaxespad=0.0)
    ticks, ylabel = _block_axis_labels(names)
    if ticks is not None:
        ax_p.set_yticks(range(n_blocks), ticks, fontsize=8 if n_blocks <= 12 else 6)
    else:
        ax_p.yaxis.set_major_locator(MaxNLocator(nbins=min(n_blocks, 12), integer=True))
    ax_p.set_ylim(-0.5, n_blocks - 0.5)
    ax_p.set_ylabel(ylabel)
    ax_p.set_xlim(edges[0], edges[-1] if edges[-1] > edges[0] else edges[0] + 1)
    ax_p.tick_params(labelbottom=False)

    # -- bottom: importance per block
    x = edges
    if np.isfinite(imp).any():
        if n_blocks <= _MAX_LEGEND:
            colors = [f"C{b}" for b in range(n_blocks)]
        else:
            from matplotlib.cm import ScalarMappable
            norm = Normalize(0, n_blocks - 1)
            cmap = _colormap("turbo")
            colors = [cmap(norm(b)) for b in range(n_blocks)]
            fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_i, label="block index", pad=0.01, fraction=0.04)
        block_lines = []
        for b in range(n_blocks):
            y = np.append(imp[b], imp[b, -1])
            block_lines += ax_i.plot(x, y, drawstyle="steps-post", color=colors[b], linewidth=1.4, label=names[b])
            prev = np.append(np.nan, imp[b, :-1])
            changed = np.isfinite(imp[b]) & ~(imp[b] == prev)  # first score, or a refresh moved it
            ax_i.plot(x[:-1][changed], imp[b][changed], "o", color=colors[b], markersize=3)
        ax_i.set_yscale("log")
        ax_i.set_ylabel("importance (mean grad RMS)")
        if n_blocks <= _MAX_LEGEND:
            # Below the figure, not beside the panel: a legend in the right margin would push the
            # probability colorbar away from its heatmap (constrained layout equalises the margins).
            fig.legend(handles=block_lines, loc="outside lower center", ncol=min(n_blocks, 6), fontsize=8,
                       frameon=False, title="importance of block", title_fontsize=8)
    else:
        ax_i.set_yticks([])
        why = ("still probing: the blocks get their first scores when probing ends"
               if probing is not None and probe_end is None else "the sampler does not use them")
        ax_i.text(0.5, 0.5, f"no importance scores recorded\n({why})",
                  transform=ax_i.transAxes, ha="center", va="center", color="#555555")
        ax_i.set_ylabel("importance")
    ax_i.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_i.set_xlabel("optimizer step")
    ax_i.grid(True, which="major", axis="both", alpha=0.3)

    if title is None:
        parts = [f"{n_blocks} blocks"]
        for key, label in (("active_layers", "{} active"), ("switch_every", "redraw every {}"),
                           ("update_every", "refresh every {}"), ("probe_steps", "probe {} steps")):
            if config.get(key) is not None:
                parts.append(label.format(config[key]))
        title = "GRASS sampling history: " + ", ".join(parts)
    fig.suptitle(title, fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


def _colormap(name: str) -> Any:
    import matplotlib
    return matplotlib.colormaps[name]


# ---------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grass_optim.plot HISTORY.json [-o FILE.png] [--title T]``; exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m grass_optim.plot",
        description="Draw a GrassAdamW history (written by grass_optim.plot.save_history, or "
                    "json.dump(opt.history)) as a PNG: sampling probabilities, trained blocks and "
                    "importance scores over the optimizer steps.")
    parser.add_argument("history", help="JSON file holding opt.history (or {'history': opt.history})")
    parser.add_argument("-o", "--output", help="image to write (default: HISTORY with the suffix .png); the "
                                               "suffix picks the format (png, svg, pdf, ...)")
    parser.add_argument("--title", help="figure title (default: a summary of the schedule)")
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output else Path(args.history).with_suffix(".png")
    try:
        h = load_history(args.history)
        if not h["events"]:
            parser.error(f"{args.history}: the history has no events, nothing to plot (was the optimizer "
                         "built with history=False?)")
        fig = plot_history(h, title=args.title)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        fig.savefig(output, dpi=DPI)
    except (OSError, ValueError) as e:
        parser.error(f"cannot write {output}: {e}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

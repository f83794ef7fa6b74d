"""grass_optim.plot: the history of a real run drawn to PNG, from Python and from the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grass_optim import GrassAdamW
from grass_optim.plot import load_history, main, plot_history, save_history
from tests.helpers import batches, make_net, train

matplotlib = pytest.importorskip("matplotlib")

import matplotlib.image as mpimg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _run(num_layers: int = 6, steps: int = 40, **kwargs) -> GrassAdamW:
    model = make_net(num_layers=num_layers)
    settings = {"lr": 1e-2, "active_layers": 2, "switch_every": 10, "update_every": 5, "probe_steps": 4,
                "seed": 0, **kwargs}
    opt = GrassAdamW(model, **settings)
    train(model, opt, batches(steps))
    return opt


@pytest.fixture(scope="module")
def opt() -> GrassAdamW:
    return _run()


def _check_png(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size > 20_000  # two panels, a colorbar and text: not a blank image
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert 900 <= w <= 1400 and 500 <= h <= 1400, img.shape  # 10 in wide at dpi 120
    assert img[..., :3].std() > 0.05  # not a single colour


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grass_optim.plot", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_plot_real_history(opt, tmp_path):
    h = opt.history
    assert [e["event"] for e in h["events"]][:2] == ["start", "probe_end"]
    out = tmp_path / "history.png"
    fig = plot_history(h, out, title="tiny run")
    _check_png(out)
    ax_p, ax_i = fig.axes[:2]
    assert fig.get_suptitle() == "tiny run"
    assert ax_i.get_yscale() == "log"
    assert len(ax_i.get_lines()) >= opt.num_layers  # one importance curve per block (+ markers, lines)
    assert ax_p.patches  # active blocks outlined
    # The end of probing is a vertical line on both panels.
    assert any(list(ln.get_xdata()) == [4, 4] for ln in ax_p.get_lines())
    assert fig.axes[2].get_ylabel() == "sampling probability"


def test_sources_agree(opt, tmp_path):
    """The dict, the optimizer, a saved file and a {"history": ...} file load to the same data."""
    path = save_history(opt, tmp_path / "h.json")
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: NaN scores are written as null
    raw = json.loads(text)
    assert raw["num_steps"] == opt.num_steps == 40
    assert raw["events"][0]["importance"] == [None] * opt.num_layers
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"history": opt.history, "loss": [1.0]}))  # json.dump's NaN, non-strict

    a, b, c, d = (load_history(s) for s in (opt.history, opt, path, wrapped))
    assert a["num_steps"] == b["num_steps"] == c["num_steps"] == d["num_steps"] == 40  # opt.history carries it
    for other in (b, c, d):
        assert other["layer_names"] == a["layer_names"] and other["config"] == a["config"]
        for e, f in zip(a["events"], other["events"], strict=True):
            assert e["step"] == f["step"] and e["active"] == f["active"] and e["probabilities"] == f["probabilities"]
            assert all((math.isnan(x) and math.isnan(y)) or x == y
                       for x, y in zip(e["importance"], f["importance"], strict=True))
    plot_history(str(path), tmp_path / "from_file.png")
    _check_png(tmp_path / "from_file.png")


def test_no_importance_and_many_blocks(tmp_path):
    """The uniform sampler records no scores; 30 blocks get integer ticks and a block colorbar."""
    uniform = _run(sampler="uniform", probe_steps=None, update_every=None, steps=25)
    fig = plot_history(uniform.history, tmp_path / "uniform.png")
    _check_png(tmp_path / "uniform.png")
    assert "no importance scores" in fig.axes[1].texts[0].get_text()

    many = _run(num_layers=30, steps=60, active_layers=4)
    fig = plot_history(many.history, tmp_path / "many.png")
    _check_png(tmp_path / "many.png")
    assert any(ax.get_ylabel() == "block index" for ax in fig.axes)


def test_stopped_while_probing(tmp_path):
    opt = _run(steps=3, probe_steps=10)
    fig = plot_history(opt, tmp_path / "probing.png")
    _check_png(tmp_path / "probing.png")
    assert "still probing" in fig.axes[1].texts[0].get_text()


def test_no_events_is_a_clear_error(tmp_path, capsys):
    opt = _run(steps=12, history=False)
    assert opt.history["events"] == []
    with pytest.raises(ValueError, match="history=False"):
        plot_history(opt.history)
    path = save_history(opt, tmp_path / "empty.json")
    err = _main_error(capsys, path, "-o", tmp_path / "empty.png")
    assert str(path) in err and "no events" in err, err
    assert not (tmp_path / "empty.png").exists()


def test_cli(opt, tmp_path):
    path = save_history(opt, tmp_path / "h.json")
    out = tmp_path / "out.png"
    proc = _cli(path, "-o", out, "--title", "from the CLI")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    _check_png(out)
    assert main([str(path)]) == 0  # default output: the input with .png
    _check_png(tmp_path / "h.png")


def test_cli_missing_file(tmp_path):
    path = tmp_path / "missing.json"
    proc = _cli(path, "-o", tmp_path / "out.png")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{path}: no such file" in proc.stderr and "usage:" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _main_error(capsys, *args: str | Path) -> str:
    """``main`` (what ``python -m grass_optim.plot`` runs), in-process: exit code 2, the message."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ('{"layer_names": []}', "not a GrassAdamW history"),
    ("[1, 2, 3]", "not a GrassAdamW history"),
    ('{"events": [{"step": 0}]}', "event 0 lacks"),
    ('{"events": [{"step": 0, "event": "start", "active": [0], "importance": ["x"], "probabilities": [1.0]}]}',
     "not a number"),
    ('{"events": [{"step": 0, "event": "start", "active": [3], "importance": [1.0], "probabilities": [1.0]}]}',
     "outside"),
    ('{"events": [{"step": 0, "event": "start", "active": [0], "importance": [1.0], "probabilities": [1.0]}], '
     '"layer_names": ["a", "b"]}', "2 layer names for 1 blocks"),
])
def test_cli_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    err = _main_error(capsys, path, "-o", tmp_path / "bad.png")
    assert str(path) in err and message in err, err
    assert not (tmp_path / "bad.png").exists()


def test_cli_directory_and_unwritable_output(opt, tmp_path, capsys):
    assert "is a directory" in _main_error(capsys, tmp_path)
    path = save_history(opt, tmp_path / "h.json")
    err = _main_error(capsys, path, "-o", tmp_path / "no" / "such" / "dir" / "out.png")
    assert "cannot write" in err and "out.png" in err, err


def test_import_does_not_load_matplotlib():
    code = ("import sys, grass_optim, grass_optim.plot; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_plot_leaves_global_matplotlib_state_alone(opt):
    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    plot_history(opt.history)
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()

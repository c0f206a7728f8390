"""Training curves: metrics.jsonl read as the loop writes it, one run's training_curves.png, and
`peftchat plot` overlaying runs (lines of each run's colour really drawn)."""

import json

import numpy as np
import pytest

from peftchat.cli import main
from peftchat.train import curves
from peftchat.train.curves import read_metrics, write_training_curves

C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def _run(path, scale=1.0, evals=True):
    path.mkdir(parents=True)
    rows = []
    for step in range(1, 41):
        rows.append({"step": step, "loss": scale * 8 / step, "lr": 1e-3 * min(1, step / 5), "tokens_per_s": 10})
        if evals and step % 10 == 0:
            rows.append({"step": step, "eval_loss": scale * 9 / step})
    lines = [json.dumps(r) for r in rows] + ['{"step": 41, "loss": 0.1']  # a line cut short by a crash
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _pixels(png, colour):
    import matplotlib.image

    img = (matplotlib.image.imread(str(png))[..., :3] * 255).astype(int)
    return int((np.abs(img - np.array(colour)).sum(axis=-1) < 30).sum())


def test_read_metrics(tmp_path):
    series = read_metrics(_run(tmp_path / "a"))
    assert len(series["loss"]) == 40 and series["loss"][0] == (1, 8.0)
    assert [s for s, _ in series["eval_loss"]] == [10, 20, 30, 40]
    assert series["lr"][-1] == (40, 1e-3)


def test_write_training_curves(tmp_path):
    pytest.importorskip("matplotlib")
    run = _run(tmp_path / "a")
    out = write_training_curves(run)
    assert out == run / "training_curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _pixels(out, C0) > 200  # the curves are drawn
    assert write_training_curves(tmp_path / "empty") is None  # no metrics yet: nothing, no error


def test_plot_overlays_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b", scale=2, evals=False)
    out = tmp_path / "plots" / "both.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert _pixels(out, C0) > 200 and _pixels(out, C1) > 200
    assert main(["plot", str(a), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(curves, "_pyplot", lambda: None)
    monkeypatch.setattr(curves, "_noted", [])
    run = _run(tmp_path / "a")
    assert write_training_curves(run) is None
    assert "pip install 'peftchat[plots]'" in capsys.readouterr().err
    assert write_training_curves(run) is None and capsys.readouterr().err == ""  # the note comes once
    assert main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_preference_runs_get_margin_and_accuracy_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    plain = write_training_curves(_run(tmp_path / "sft"))
    pref = _run(tmp_path / "dpo")
    with (pref / "metrics.jsonl").open("a") as fh:
        for step in range(1, 41):
            fh.write(
                json.dumps({"step": step, "rewards/margin": step / 10, "rewards/accuracy": min(1, step / 20)}) + "\n"
            )
    assert read_metrics(pref)["rewards/margin"][-1] == (40, 4.0)
    drawn = write_training_curves(pref)
    assert Image.open(drawn).size[0] > Image.open(plain).size[0] * 1.5  # five panels instead of three

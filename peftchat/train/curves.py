"""Training curves as a picture: train loss, eval loss and learning rate against step, read from
`metrics.jsonl` — for one run (`training_curves.png` in its output dir) or several overlaid
(`peftchat plot`). matplotlib is the optional `plots` extra; without it the run goes on with a note.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from peftchat.errors import UserError
from peftchat.paths import atomic_output, check_new_file, check_outputs

CURVES_FILE = "training_curves.png"
METRICS_FILE = "metrics.jsonl"
MISSING_EXTRA = "matplotlib is not installed (pip install 'peftchat[plots]')"
PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"))
# drawn when some run logged them (preference objectives: peftchat.train.preference)
OPTIONAL_PANELS = (("rewards/margin", "reward margin"), ("rewards/accuracy", "reward accuracy"))


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} for `loss`, `eval_loss` and `lr` in the run's metrics.jsonl.
    A line cut short by a crash is skipped; a resumed run's rewritten steps keep the last value."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE} (is it a training output dir?)")
    series: dict[str, dict[int, float]] = {key: {} for key, _ in PANELS + OPTIONAL_PANELS}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key in series:
            if isinstance(row.get(key), (int, float)):
                series[key][row["step"]] = float(row[key])
    return {key: sorted(points.items()) for key, points in series.items()}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _label(run_dir: Path, all_dirs: Sequence[Path]) -> str:
    names = [d.name for d in all_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def draw(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = True) -> Optional[Path]:
    """Plot the runs' curves side by side into `out` (an existing file only with `force`; replaced
    atomically, so a reader never sees half a picture); None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    dirs = [Path(d) for d in run_dirs]
    data = [read_metrics(d) for d in dirs]
    panels = PANELS + tuple(p for p in OPTIONAL_PANELS if any(series[p[0]] for series in data))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels):
        for i, (d, series) in enumerate(zip(dirs, data)):
            points = series[key]
            if points:  # colour by run, so a run keeps its colour in panels where another has no data
                steps, values = zip(*points)
                ax.plot(
                    steps,
                    values,
                    color=f"C{i % 10}",
                    marker="o" if len(points) < 12 else None,
                    markersize=3,
                    label=_label(d, dirs),
                )
        if not any(series[key] for series in data):
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        every = [v for s in data for _, v in s[key]]
        if key != "lr" and every and min(every) > 0 and max(every) / min(every) > 20:
            ax.set_yscale("log")  # losses that span orders of magnitude
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[2].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    # Fixed margins, not tight_layout: tight_layout draws the whole figure once more to measure it,
    # ~40% of each picture's time, and the loop draws one at every evaluation (the test suite's
    # ~100 training runs paid for it). Three panels of one layout need no measuring.
    fig.subplots_adjust(left=0.06, right=0.985, top=0.9, bottom=0.23 if handles else 0.14, wspace=0.3)
    out = Path(out)
    try:
        with atomic_output(out, "--out", force) as tmp:
            fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False) -> Path:
    """`peftchat plot`: overlay the runs' curves in `out` (UserError without matplotlib; an
    existing `out` only with `force`)."""
    for d in run_dirs:
        read_metrics(d)  # a wrong dir is a clear error before anything is drawn
    check_outputs([("--out", out)], [(f"the metrics of {d}", Path(d) / METRICS_FILE) for d in run_dirs])
    check_new_file(out, "--out", force)
    path = draw(run_dirs, out, force=force)
    if path is None:
        raise UserError(f"peftchat plot: {MISSING_EXTRA}")
    return path


def write_training_curves(run_dir: str | os.PathLike) -> Optional[Path]:
    """Write `run_dir/training_curves.png` from its metrics.jsonl (the training loop calls this at
    each evaluation and at the end). Without matplotlib: a note on stderr, None — never an error
    that would stop a run."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        return None
    path = draw([run_dir], run_dir / CURVES_FILE)
    if path is None and not _noted:  # once a process, not at every evaluation
        _noted.append(True)
        print(f"note: {CURVES_FILE} skipped: {MISSING_EXTRA}", file=sys.stderr, flush=True)
    return path


_noted: list[bool] = []

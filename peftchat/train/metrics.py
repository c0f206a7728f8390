"""Training metrics: interval metering, rows to `metrics.jsonl` (and TensorBoard when installed),
memory, bar text."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from peftchat.rundir import METRICS_FILE, TENSORBOARD_DIR


class IntervalMeter:
    """Loss, tokens and time since the last log row. Time counts training steps only (not eval
    or saving); the loss stays a device scalar until `take`, so a step costs no host sync."""

    def __init__(self, device: torch.device) -> None:
        self._loss = torch.zeros((), device=device, dtype=torch.float64)
        self.time_s, self.tokens, self.steps = 0.0, 0, 0

    def add(self, window_loss: torch.Tensor, tokens: int, step_time_s: float) -> None:
        self._loss += window_loss
        self.tokens += tokens
        self.time_s += step_time_s
        self.steps += 1

    def sync(self) -> None:
        """Wait for the device, so the time of the step under way is real (call before timing it)."""
        self._loss.item()

    def take(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> tuple[float, float]:
        """(mean loss per step, tokens/s) of the interval, then start a new one. `reduce`: the
        interval's summed loss -> the job's (several processes: the mean over them)."""
        summed = self._loss if reduce is None else reduce(self._loss)
        loss = summed.item() / max(self.steps, 1)
        tokens_per_s = self.tokens / max(self.time_s, 1e-9)
        self._loss.zero_()
        self.time_s, self.tokens, self.steps = 0.0, 0, 0
        return loss, tokens_per_s


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(peak GiB, what was measured): CUDA max allocated on a GPU, peak process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there, kilobytes on Linux
        rss_kb /= 1024
    return rss_kb / 2**20, "peak_rss"


def loss_metrics(loss_fn, split: str, reduce: Optional[Callable[[list[float]], list[float]]] = None) -> dict:
    """What a loss tracks beside itself (preference runs: rewards, margin, accuracy); `reduce` sums
    its totals over processes (a collective: every process calls this)."""
    return loss_fn.take_metrics(split, reduce) if hasattr(loss_fn, "take_metrics") else {}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def format_postfix(loss: float, lr: float, tokens_per_s: float, memory_gb: float, extra: Optional[dict] = None) -> str:
    """Progress-bar text, e.g. `loss 2.314 | lr 1.9e-04 | 5,210 tok/s | mem 3.21 GiB`; a preference
    run adds `| margin 0.42 | acc 0.75` (`extra`: its reward metrics)."""
    text = f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | mem {memory_gb:.2f} GiB"
    if extra and "rewards/margin" in extra:
        text += f" | margin {extra['rewards/margin']:.3f} | acc {extra['rewards/accuracy']:.2f}"
    return text


class MetricsLogger:
    """Appends one JSON object per row to `output_dir/metrics.jsonl`; mirrors the numbers to
    TensorBoard (`output_dir/tensorboard`) when `tensorboard` is true and the package is there."""

    def __init__(self, output_dir: str | os.PathLike, tensorboard: bool = False):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR))
            except ImportError:  # tensorboard is an optional extra
                self._tb = None

    @staticmethod
    def truncate_after(output_dir: str | os.PathLike, step: int) -> None:
        """Drop rows past `step` (written by a run that is being resumed from `step`)."""
        path = Path(output_dir) / METRICS_FILE
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def log(self, row: dict) -> None:
        """Write one row; it must have `step`."""
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, row["step"])

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """A tqdm bar on a terminal; plain `step N/T: ...` lines otherwise (logs, CI)."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.interactive = sys.stderr.isatty()
        self._bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=not self.interactive
        )

    def advance(self) -> None:
        self._bar.update(1)

    def show(self, step: int, total: int, text: str) -> None:
        if self.interactive:
            self._bar.set_postfix_str(text)
        else:
            print(f"step {step}/{total}: {text}", flush=True)

    def say(self, message: str) -> None:
        if self.interactive:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self._bar.close()


def row_with(output_dir: str | os.PathLike, key: str, first: bool = False) -> dict | None:
    """The last (or first) row of `metrics.jsonl` that has `key`: the run's, across resumes."""
    path = Path(output_dir) / METRICS_FILE
    found = None
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if key in row:
            found = row
            if first:
                break
    return found


def last_row_value(output_dir: str | os.PathLike, key: str, first: bool = False) -> float | None:
    """`key` of the last (or first) row of `metrics.jsonl` that has it."""
    row = row_with(output_dir, key, first)
    return None if row is None else row[key]


class Muted:
    """The metrics logger and progress display of a process other than the main one (torchrun):
    every method does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

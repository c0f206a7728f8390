"""Training metrics: rows to `metrics.jsonl` (and TensorBoard when installed), memory, bar text."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(peak GiB, what was measured): CUDA max allocated on a GPU, peak process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there, kilobytes on Linux
        rss_kb /= 1024
    return rss_kb / 2**20, "peak_rss"


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def format_postfix(loss: float, lr: float, tokens_per_s: float, memory_gb: float) -> str:
    """Progress-bar text, e.g. `loss 2.314 | lr 1.9e-04 | 5,210 tok/s | mem 3.21 GiB`."""
    return f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | mem {memory_gb:.2f} GiB"


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

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
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
        self._file.close()
        if self._tb is not None:
            self._tb.close()

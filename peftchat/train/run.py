"""The one state object of a training run (`Run`) and the observation points a caller may hook
into (`TrainHooks`); `peftchat.train.loop.setup` builds a Run, every step and event works on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from peftchat.config import Recipe
from peftchat.data.batching import Batches
from peftchat.train.checkpoint import TrainState
from peftchat.train.distributed import SINGLE, Dist
from peftchat.train.metrics import MetricsLogger, Muted, Progress


@dataclass
class TrainHooks:
    """Public observation points of a run (benchmarks, tests, tools); each is optional.

    `after_model_load(model)`: the base model is loaded, before LoRA (e.g. reset memory peaks).
    `speedups_applied(names)`: what `apply_training_speedups` applied.
    `kernel_options(options) -> options`: the `KernelOptions` the run uses instead of those the
    recipe and device give (a benchmark variant).
    `after_step(run)`: an optimizer step and its logging, eval and saving are done.
    `eval_scores(model, tokenizer) -> dict`: more fields for each evaluation row (the CLI passes
    `peftchat eval`'s generation scores here for `training.eval_generate`; train cannot import infer).
    """

    after_model_load: Optional[Callable[[Any], None]] = None
    speedups_applied: Optional[Callable[[list[str]], None]] = None
    kernel_options: Optional[Callable[[Any], Any]] = None
    after_step: Optional[Callable[[Run], None]] = None
    eval_scores: Optional[Callable[[Any, Any], dict]] = None


@dataclass
class Run:
    """Everything one training run works with; `state` is what a checkpoint saves."""

    recipe: Recipe
    out: Path
    device: torch.device
    tokenizer: Any
    data_report: Any
    train: Batches
    eval: Optional[Batches]
    model: Any
    loss_fn: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler or None
    autocast: Callable[[], Any]
    params_count: tuple[int, int]  # (trainable, total)
    total_steps: int
    steps_per_epoch: int
    resumed_from: Optional[Path]
    hooks: TrainHooks
    state: TrainState = field(default_factory=TrainState)
    scheduler: Any = None
    epoch_progress: float = 0.0
    saved_step: Optional[int] = None
    eval_step: Optional[int] = None
    # set by `loop._train` before the first step (Muted on processes other than the main one)
    metrics: MetricsLogger | Muted = field(default_factory=Muted)
    progress: Progress | Muted = field(default_factory=Muted)
    # (step, window, per-micro-batch losses, window loss) of the steps whose losses
    # `nonfinite.verify_finite` has not looked at yet (training.on_nan=stop)
    unverified: list = field(default_factory=list)
    dist: Dist = SINGLE  # torchrun: this process's place in the job (peftchat.train.distributed)
    wrapped: Any = None  # torchrun: the model's loss under DDP / FSDP2 (distributed.wrap_for_training)
    interrupt: Any = None  # the run's GracefulInterrupt (signals), or None
    interrupt_seen: bool = False  # torchrun: some process was interrupted (agreed on by all)

"""Optimizer (torch AdamW or bitsandbytes 8-bit AdamW), the run's length in optimizer steps, and
the warmup + decay schedule over it."""

from __future__ import annotations

import math
from typing import Any

import torch

from peftchat.config import Recipe, TrainingConfig
from peftchat.data.batching import Batches
from peftchat.errors import UserError


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay, vectors (biases, norms, DoRA
    magnitudes) do not, as decaying a scale or an offset towards zero is not a regularizer."""
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise UserError("the model has no trainable parameters (check adapter.target_modules)")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model, cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    """`training.optimizer`: `adamw` (torch; fused kernel on CUDA), `adamw_8bit` or
    `paged_adamw_8bit` (bitsandbytes; paging only matters on CUDA)."""
    groups = parameter_groups(model, cfg.weight_decay)
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"training.optimizer={cfg.optimizer} needs bitsandbytes (pip install bitsandbytes)") from None
    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_ratio` of the run."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The multiple of `training.lr` used by optimizer step `step + 1` (`step` steps done).

    Warmup rises linearly to the peak *at* step `warmup` (step 1 gets lr/warmup, not 0: an
    optimizer step at lr 0 is wasted); then cosine or linear decay towards 0 at `total`, which
    the last step (`total - 1` done) never reaches, or constant. Written by hand because
    transformers' schedules start warmup at lr 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then decay over a run of `total_steps` (`lr_factor`), positioned after
    `start_step` steps: the optimizer's lr is then the one of step `start_step + 1`.

    The schedule is a pure function of the recipe and the step, so a resumed run rebuilds it
    instead of loading it; a resume that changes the run's length gets the curve of a run
    planned for the new length from the start (README, "Resuming").
    """
    warmup = warmup_steps(cfg, total_steps)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # LambdaLR's base lr; a loaded optimizer state carries the old one
    kind = cfg.lr_scheduler
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(kind, step, warmup, total_steps))
    if start_step:
        scheduler.last_epoch = start_step
        lrs = [base * factor(start_step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return scheduler


def planned_steps(recipe: Recipe, train: Batches, world_size: int = 1) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch); the last window of an epoch may be short. A step
    of `world_size` processes takes `world_size` x accumulation micro-batches."""
    cfg = recipe.training
    per_epoch = math.ceil(train.per_epoch() / (cfg.gradient_accumulation_steps * world_size))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch))
    return total, per_epoch

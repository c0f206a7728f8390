"""Optimizer (torch AdamW or bitsandbytes 8-bit AdamW) and warmup + decay schedule."""

from __future__ import annotations

import math

import torch

from peftchat.config import TrainingConfig
from peftchat.errors import UserError

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay, vectors (biases, norms, DoRA
    magnitudes) do not, as decaying a scale or an offset towards zero is not a regularizer."""
    decay, no_decay = [], []
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
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    """Linear warmup, then cosine / linear decay to 0 at `total_steps`, or constant."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[cfg.lr_scheduler],
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
    )

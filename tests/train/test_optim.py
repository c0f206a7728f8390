"""Optimizer choice, weight-decay groups, warmup and schedules."""

import pytest
import torch

from peftchat.config import TrainingConfig
from peftchat.errors import UserError
from peftchat.train.optim import build_optimizer, build_scheduler, parameter_groups, warmup_steps


def _model():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    m[1].weight.requires_grad_(False)  # a frozen tensor is left out
    return m


def test_matrices_decay_vectors_do_not():
    groups = parameter_groups(_model(), 0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.1), (2, 0.0)]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        parameter_groups(frozen, 0.0)


@pytest.mark.parametrize(
    "name, cls", [("adamw", "AdamW"), ("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")]
)
def test_optimizer_choice(name, cls):
    cfg = TrainingConfig(optimizer=name, lr=1e-3, adam_beta2=0.95)
    opt = build_optimizer(_model(), cfg, torch.device("cpu"))
    assert type(opt).__name__ == cls
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.9, 0.95)


def _lrs(cfg, total):
    opt = build_optimizer(_model(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_steps_or_ratio_then_decay():
    assert warmup_steps(TrainingConfig(warmup_steps=3, warmup_ratio=0.5), 100) == 3
    assert warmup_steps(TrainingConfig(warmup_ratio=0.05), 100) == 5
    # warmup reaches the peak at step `warmup` and never starts at 0; decay never reaches 0 either
    cosine = _lrs(TrainingConfig(lr=1.0, warmup_steps=2, lr_scheduler="cosine"), 10)
    assert cosine[:3] == [0.5, 1.0, 1.0] and 0 < cosine[-1] < 0.05
    assert cosine == sorted(cosine[:2]) + sorted(cosine[2:], reverse=True)
    linear = _lrs(TrainingConfig(lr=1.0, warmup_ratio=0.2, lr_scheduler="linear"), 10)
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[6] == pytest.approx(0.5) and linear[-1] == pytest.approx(0.125)
    constant = _lrs(TrainingConfig(lr=1.0, warmup_steps=2, lr_scheduler="constant"), 10)
    assert constant == [0.5] + [1.0] * 9


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_no_step_at_lr_zero(kind, warmup):
    lrs = _lrs(TrainingConfig(lr=1e-3, warmup_steps=warmup, lr_scheduler=kind), 7)
    assert all(lr > 0 for lr in lrs), lrs


def test_a_schedule_built_at_a_step_continues_the_same_curve():
    cfg = TrainingConfig(lr=1.0, warmup_steps=2, lr_scheduler="cosine")
    full = _lrs(cfg, 10)
    opt = build_optimizer(_model(), cfg, torch.device("cpu"))
    build_scheduler(opt, cfg, 10, start_step=4)
    assert opt.param_groups[0]["lr"] == full[4]

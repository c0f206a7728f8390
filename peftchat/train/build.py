"""What a run is built from, before its first step: the data (tokenizer, report, batches) and the
model (base -> LoRA -> memory budget -> speed-ups and the loss they choose). `peftchat.train.loop`'s
`setup` puts them into the run's one state object."""

from __future__ import annotations

import dataclasses

import torch

from peftchat.config import Recipe
from peftchat.data.batching import Batches
from peftchat.data.preference import is_preference
from peftchat.errors import DataError
from peftchat.train.loss import make_loss
from peftchat.train.preference import make_preference_loss
from peftchat.train.run import TrainHooks


def setup_data(recipe: Recipe):
    """(tokenizer, data report, train Batches, eval Batches or None)."""
    from peftchat.data.pipeline import build_datasets, sample_limit
    from peftchat.data.preference import PairBatches
    from peftchat.model.tokenizer import load_tokenizer

    cfg = recipe.training
    tokenizer = load_tokenizer(recipe)
    data = build_datasets(recipe, tokenizer)
    print(data.report.summary(), flush=True)
    if data.train is None or len(data.train) == 0:
        raise DataError(f"no training samples in {recipe.data.train} (see the data report above)")
    # a packed row holds at most one sample's limit
    common = dict(
        batch_size=cfg.batch_size,
        max_length=sample_limit(recipe),
        pad_id=tokenizer.pad_token_id,
        packing=recipe.data.packing,
    )
    batches = PairBatches if is_preference(recipe) else Batches  # preference pairs: one concatenated batch each
    train = batches(
        data.train, group_by_length=recipe.data.group_by_length, shuffle=recipe.data.shuffle, seed=cfg.seed, **common
    )
    evaluation = batches(data.eval, **common) if data.eval is not None and len(data.eval) else None
    return tokenizer, data.report, train, evaluation


def setup_model(recipe: Recipe, device: torch.device, hooks: TrainHooks, sharded: bool = False):
    """(LoRA model ready to train, its micro-batch loss, (trainable, total) parameter counts);
    `sharded`: FSDP2 will shard it."""
    from peftchat.kernels.varlen import VARLEN_ATTENTION
    from peftchat.model.adapters import apply_lora, count_parameters
    from peftchat.model.load import load_base_model
    from peftchat.train.memory_budget import budget_applies, budget_policy, with_policy
    from peftchat.train.speedups import apply_training_speedups, kernel_options

    base = load_base_model(recipe, device, sharded=sharded)
    if hooks.after_model_load is not None:
        hooks.after_model_load(base)
    model = apply_lora(base, recipe)
    budgeted = budget_applies(recipe, device.type)
    policy = budget_policy(model, recipe) if budgeted else None
    if budgeted:
        cfg = with_policy(recipe.training, policy)
    else:  # nothing was budgeted: the speed-ups line must not say so
        cfg = dataclasses.replace(recipe.training, max_memory_gib=None)
    kernels = kernel_options(model, cfg)
    speedups = apply_training_speedups(model, cfg, hooks.kernel_options(kernels) if hooks.kernel_options else kernels)
    applied = list(speedups.applied)
    if getattr(base.config, "_attn_implementation", None) == VARLEN_ATTENTION:
        applied.append("varlen attention for packed rows")
    if policy is not None:  # beside the measured peak in benchmark rows (the estimator's error)
        applied.append(f"memory estimate {policy.estimated_gib:.2f} GiB")
    print("speed-ups: " + (", ".join(applied) or "none"), flush=True)
    print("kernels: " + speedups.kernels.describe(), flush=True)
    if hooks.speedups_applied is not None:
        hooks.speedups_applied(applied)
    loss = make_preference_loss(recipe) if is_preference(recipe) else make_loss(speedups.head_loss)
    return model, loss, count_parameters(model)

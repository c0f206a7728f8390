"""The eval loss of a run: the training loss over the whole eval set, split over the processes."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from peftchat.train.distributed import sum_counts, sum_tensor
from peftchat.train.run import Run
from peftchat.train.step import to_device


@torch.no_grad()
def evaluate(run: Run) -> tuple[float, int]:
    """(mean loss per label token, label tokens) over the whole eval set, with the training loss.
    With N processes, process r takes eval micro-batches r, r+N, ... and the sums are added up
    over all; under FSDP2 (whose forwards gather the sharded weights) every process makes the same
    number of forwards, a spare one for a share that is shorter or has no label token."""
    dist = run.dist
    assert run.eval is not None  # callers evaluate only runs with an eval set
    plan = run.eval.plan(0)
    mine = plan[dist.rank :: dist.world_size]
    sharded = dist.strategy == "fsdp"
    passes = math.ceil(len(plan) / dist.world_size) if sharded else len(mine)
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    tokens = 0
    run.model.eval()
    for i in range(passes):
        micro = run.eval.micro_batch(mine[i] if i < len(mine) else plan[0])
        counted = i < len(mine) and micro.label_tokens > 0
        if not (counted or sharded):
            continue
        spare = run.loss_fn.not_counted() if not counted and hasattr(run.loss_fn, "not_counted") else nullcontext()
        with run.autocast(), spare:
            batch = to_device(micro.tensors, run.device)
            loss = (run.wrapped(batch, 1.0) if sharded else run.loss_fn(run.model, batch, normalizer=1.0)).double()
        if counted:
            total += loss
            tokens += micro.label_tokens
    run.model.train()
    total, tokens = sum_tensor(dist, total), int(sum_counts(dist, [tokens])[0])  # no-ops for one process
    return (total.item() / tokens if tokens else float("nan")), tokens

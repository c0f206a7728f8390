"""A NaN/inf loss (`training.on_nan`): `stop` ends the run naming the step and the micro-batch
before anything of that step is logged, evaluated or saved; `skip` drops the step's update and
counts it.

Under `stop` the losses are looked at where the loop syncs with the device anyway (logging,
evaluation, every save, the end) rather than after each step, so the check costs no host sync;
under `skip` the answer is needed before the optimizer steps: one sync a step."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from peftchat.data.batching import Window
from peftchat.errors import UserError
from peftchat.train.distributed import first_over_ranks, sum_tensor
from peftchat.train.run import Run


def step_dropped(run: Run, window: Window, micro_losses: list, loss: torch.Tensor) -> bool:
    """Whether the step of `window` (its window loss `loss`) is dropped (`on_nan=skip` and the
    loss is not finite); under `stop` the step is kept for `verify_finite` to look at later."""
    if run.recipe.training.on_nan == "skip":
        if not bool(torch.isfinite(sum_tensor(run.dist, loss))):
            skip_non_finite_step(run, window, micro_losses)
            return True
        return False
    # the window's place in the data, not its collated tensors: steps may pile up until a check
    run.unverified.append((run.state.step + 1, replace(window, micro_batches=[]), micro_losses, loss))
    return False


def verify_finite(run: Run) -> None:
    """`training.on_nan=stop`: UserError naming the first step whose loss was NaN/inf since the last
    check. Called where the loop syncs anyway (logging, evaluation, every save, the end) rather
    than after each step: a poisoned step may be followed by a few more, but none of them is ever
    logged, evaluated or saved."""
    pending, run.unverified = run.unverified, []
    if not pending:
        return
    finite = sum_tensor(run.dist, torch.stack([loss for *_, loss in pending])).isfinite()  # any process's NaN
    if bool(finite.all()):
        return
    step, window, micro_losses, _ = pending[int((~finite).nonzero()[0])]
    value, where = _non_finite(run, window, micro_losses)
    saved = f"checkpoint-{run.saved_step}" if run.saved_step is not None else "none"
    raise UserError(
        f"loss is {value} at step {step}, {where}; nothing of this step was saved (last "
        f"checkpoint: {saved}); lower training.lr or set training.max_grad_norm, check those "
        f"samples, or drop such steps with training.on_nan=skip"
    )


def skip_non_finite_step(run: Run, window: Window, micro_losses: list) -> None:
    """`training.on_nan=skip`: drop the update (the gradients are cleared, the schedule moves on as
    for a step a grad scaler skips), count it, and log it in metrics.jsonl."""
    state = run.state
    step = state.step + 1
    value, where = _non_finite(run, window, micro_losses)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    state.step = step
    state.epoch, state.batch_index = window.epoch, window.batch_index
    state.nan_skipped += 1
    run.epoch_progress = window.epoch_progress
    run.metrics.log({"step": step, "skipped": f"loss {value}", "where": where, "nan_skipped": state.nan_skipped})
    run.progress.say(f"step {step}: loss {value} at {where}; step skipped (training.on_nan=skip)")


def _non_finite(run: Run, window: Window, micro_losses: list) -> tuple[float, str]:
    """(the first non-finite micro-batch loss of `window`, where that micro-batch is in the data),
    over all processes: the lowest rank that has one tells (every process calls this together)."""
    # None: a micro-batch without label tokens, never run
    k = next((i for i, x in enumerate(micro_losses) if x is not None and not math.isfinite(float(x))), -1)
    rank, k, value = first_over_ranks(run.dist, k, float(micro_losses[k]) if k >= 0 else float("nan"))
    share = run.recipe.training.gradient_accumulation_steps  # each process's part of the window
    return value, _where_in_data(run, window, rank * share + max(k, 0))


def _where_in_data(run: Run, window: Window, k: int) -> str:
    """Micro-batch `k` of the whole `window` (all processes' shares, in order) as (epoch,
    micro-batch index in the epoch, train sample rows)."""
    n = window.size
    epoch, end = window.epoch, window.batch_index
    if end == 0:  # the window closed its epoch
        epoch, end = epoch - 1, len(run.train.plan(epoch - 1))
    index = end - n + k
    rows = list(run.train.plan(epoch)[index])
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    return f"micro-batch {index} of epoch {epoch} (micro-batch {k + 1} of the step's {n}; train samples {shown})"

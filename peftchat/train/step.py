"""One optimizer step: micro-batches to the device, forward and backward of an accumulation
window, clipping and the optimizer update, the precision they run in, and how the steps run (out
of GPU memory as a user error, the garbage collector kept off setup's objects).
(`peftchat.train.distributed.backward_window_sharded` is the window of one process of several.)"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

import torch

from peftchat.config import Recipe
from peftchat.data.batching import MicroBatch
from peftchat.errors import UserError
from peftchat.train.checkpoint import TrainState
from peftchat.train.loss import causal_lm_loss


def mixed_precision(recipe: Recipe, device: torch.device):
    """(autocast context factory, GradScaler or None). On CUDA a float32 base runs under bf16
    autocast (fp16 + loss scaling where bf16 is missing) and an fp16 base under fp16 autocast with
    loss scaling; a bf16 base runs under bf16 autocast too unless `training.autocast` is false
    (without it peft casts every LoRA input to the fp32 adapter dtype: 28 % fewer tokens/s on an
    8B QLoRA, benchmarks/RESULTS.md); every CPU run computes in the weights' own dtype."""
    if device.type != "cuda" or (recipe.model.dtype == "bf16" and not recipe.training.autocast):
        return nullcontext, None
    if recipe.model.dtype in ("fp32", "bf16") and torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to the device (non-tensors, e.g. `max_seq_len`, stay as they are)."""
    if device.type != "cuda":
        return batch
    return {
        k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def backward_window(
    model,
    micro_batches: list[MicroBatch],
    device: torch.device,
    loss_fn=causal_lm_loss,
    autocast=nullcontext,
    scaler=None,
    per_micro: Optional[list] = None,
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one accumulation window of CPU micro-batches.

    Each micro-batch's summed loss is divided by the label-token count of the whole window
    (counted on the CPU, so no device sync), which makes the accumulated gradient that of one big
    batch. Returns (the window's mean loss per label token as a detached device scalar, the
    window's label-token count). `per_micro`, when given, receives each micro-batch's detached
    loss (None for one without labels), to tell which one went non-finite.
    """
    label_tokens = sum(m.label_tokens for m in micro_batches)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for micro in micro_batches:
        if micro.label_tokens == 0:
            if per_micro is not None:
                per_micro.append(None)
            continue
        with autocast():
            loss = loss_fn(model, to_device(micro.tensors, device), normalizer=label_tokens)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().double()
        if per_micro is not None:
            per_micro.append(loss.detach())
    return total, label_tokens


def optimizer_step(
    optimizer, scheduler, params: list[torch.nn.Parameter], max_grad_norm: float, scaler=None
) -> torch.Tensor | None:
    """Clip (when `max_grad_norm` > 0), step, advance the schedule, clear the gradients; returns
    the gradient norm before clipping (a device scalar) or None when clipping is off."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@contextmanager
def out_of_memory_as_user_error(state: TrainState) -> Iterator[None]:
    """Out of GPU memory in a step: one line naming the step and the settings that lower memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        from peftchat.failures import MEMORY_SETTINGS  # the one list, shared with the CLI's handler

        raise UserError(
            f"out of GPU memory in step {state.step + 1} ({str(e).splitlines()[0][:120]}); "
            "settings that lower memory: " + "; ".join(MEMORY_SETTINGS)
        ) from None


@contextmanager
def setup_objects_frozen() -> Iterator[None]:
    """Keep what exists now out of Python's full garbage collections while the steps run.

    A full collection walks every tracked object with the host stopped: 532k objects after the
    demo recipe's setup (mostly the imported libraries), 198 ms on a CPU; after `gc.freeze()`,
    0.00 ms (a setup and two timed collections). On a GPU such a pause drains the launch queue and
    the GPU waits: the one candidate found for an 8B NF4 run whose timed steps ranged from 10,917
    to 12,770 tokens/s (up to ~100 ms lost a step), not measured on a GPU. What setup built lives as
    long as the run anyway; the frozen objects go back to the collector afterwards, so a process
    that trains again can free this run's.
    """
    gc.collect()  # setup's garbage is freed, not frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

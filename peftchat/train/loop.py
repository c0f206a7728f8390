"""`peftchat train`: setup -> train -> save, top to bottom, in the manner of torchtune's
lora_finetune_single_device.py and litgpt's finetune/lora.py rather than HF Trainer.

Setup: recipe -> tokenizer -> data (peftchat.data) -> base model (peftchat.model.load) -> LoRA
(peftchat.model.adapters) -> optimizer and schedule -> optional resume.
Train: per optimizer step one accumulation window of micro-batches; the loss of the window is the
mean over its loss-bearing tokens (not a mean of per-micro-batch means), so accumulation 2 x batch
1 gives the gradient of batch 2 x accumulation 1 even when lengths differ.
Save: `checkpoint-STEP/` every `save_steps` and at the end, then the final adapter, tokenizer,
`recipe.yaml`, `metrics.jsonl` and `training_summary.json` in `training.output_dir`.

Output-dir policy: a dir that already holds a run (a complete checkpoint or a finished adapter)
is never trained over from scratch: the run stops with an error that suggests
`training.resume=true` (continue it) or another `training.output_dir`. Anything else in the dir
(say, a `metrics.jsonl` of a run that died before its first checkpoint) is overwritten.

Resume is exact: a checkpoint holds the data position (epoch, micro-batch index, step) and every
RNG state, so a run stopped at step k and resumed ends with the same adapter, bit for bit on CPU,
as one that never stopped. Ctrl-C finishes the optimizer step under way, writes a checkpoint and
exits (a second Ctrl-C quits at once).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from peftchat.config import Recipe, save_recipe
from peftchat.errors import DataError, UserError
from peftchat.train.checkpoint import (
    TrainState,
    find_latest_checkpoint,
    is_complete,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temp_dirs,
    save_checkpoint,
)
from peftchat.train.loss import causal_lm_loss, count_label_tokens, with_loss_targets
from peftchat.train.metrics import METRICS_FILE, MetricsLogger, format_postfix, peak_memory_gb, perplexity
from peftchat.train.optim import build_optimizer, build_scheduler

SUMMARY_FILE = "training_summary.json"
FINAL_ADAPTER_FILE = "adapter_model.safetensors"


# ------------------------------------------------------------------------------ output dir


def resume_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from (`training.resume`), or None for a fresh run; raises a
    UserError for a fresh run into a dir that holds one already, or a resume with nothing to
    resume."""
    out = Path(recipe.training.output_dir)
    resume = recipe.training.resume
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    if resume is True:
        latest = find_latest_checkpoint(out)
        if latest is None:
            raise UserError(f"training.resume=true but {out} has no complete checkpoint-STEP dir to resume from")
        return latest
    if resume:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise UserError(f"training.resume: checkpoint {resume} not found")
        if not is_complete(path):
            raise UserError(f"training.resume: {resume} is not a complete checkpoint (no 'complete' marker)")
        return path
    existing = list_checkpoints(out)
    if existing or (out / FINAL_ADAPTER_FILE).exists():
        what = existing[-1].name if existing else "a finished adapter"
        raise UserError(
            f"training.output_dir {out} already holds a run ({what}); continue it with training.resume=true "
            f"or choose another training.output_dir"
        )
    return None


# ------------------------------------------------------------------------------ batches


def fetch_rows(dataset, rows: list[list[int]]) -> list[list[dict]]:
    """The samples of one batch plan entry (rows of sample indices), read in one call."""
    flat = [i for row in rows for i in row]
    got = dataset[flat]
    samples = [{"input_ids": ids, "labels": lab} for ids, lab in zip(got["input_ids"], got["labels"])]
    out, k = [], 0
    for row in rows:
        out.append(samples[k:k + len(row)])
        k += len(row)
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


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


# ------------------------------------------------------------------------------ Ctrl-C


class GracefulInterrupt:
    """While active, the first SIGINT only sets `requested` (the loop checkpoints at the end of
    the step under way and raises KeyboardInterrupt); a second one raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------ steps


def backward_window(model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast=nullcontext,
                    scaler=None) -> tuple[torch.Tensor, int]:
    """Forward and backward of one accumulation window of CPU micro-batches.

    Each micro-batch's summed loss is divided by the label-token count of the whole window
    (counted on the CPU tensors, so no device sync), which makes the accumulated gradient that of
    one big batch. Returns (the window's mean loss per label token as a detached device scalar,
    the window's label-token count).
    """
    counts = [count_label_tokens(b["labels"]) for b in batches]
    label_tokens = sum(counts)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch, count in zip(batches, counts):
        if count == 0:
            continue
        with autocast():
            loss = causal_lm_loss(model, to_device(with_loss_targets(batch), device), normalizer=label_tokens)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().double()
    return total, label_tokens


def optimizer_step(optimizer, scheduler, params: list[torch.nn.Parameter], max_grad_norm: float,
                   scaler=None) -> torch.Tensor | None:
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


# ------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate(model, dataset, plan: list[list[list[int]]], collate, pad_id: int, packing: bool,
             device: torch.device, autocast) -> tuple[float, int]:
    """(mean loss per label token, label tokens) over the whole eval set."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for rows in plan:
        batch = collate(fetch_rows(dataset, rows), pad_id, packing)
        n = count_label_tokens(batch["labels"])
        if n == 0:
            continue
        with autocast():
            total += causal_lm_loss(model, to_device(with_loss_targets(batch), device), normalizer=1.0).double()
        tokens += n
    model.train()
    return (total.item() / tokens if tokens else float("nan")), tokens


# ------------------------------------------------------------------------------ train


def train(recipe: Recipe) -> Path:
    """Train the recipe's adapter; returns `training.output_dir`."""
    from peftchat.model.load import check_model_source

    cfg = recipe.training
    out = Path(cfg.output_dir)
    resume_from = resume_checkpoint(recipe)  # fail fast, before any loading
    check_model_source(recipe)

    from tqdm.auto import tqdm
    from transformers import set_seed

    from peftchat.data.batching import collate, plan_batches, sample_lengths
    from peftchat.data.pipeline import build_datasets, sample_limit
    from peftchat.model.adapters import apply_lora, count_parameters
    from peftchat.model.load import load_base_model, resolve_device
    from peftchat.model.kernels import apply_training_speedups
    from peftchat.model.tokenizer import load_tokenizer

    device = resolve_device(recipe)
    set_seed(cfg.seed)

    # ---- data
    tokenizer = load_tokenizer(recipe)
    data = build_datasets(recipe, tokenizer)
    print(data.report.summary(), flush=True)
    if data.train is None or len(data.train) == 0:
        raise DataError(f"no training samples in {recipe.data.train} (see the data report above)")
    train_set = data.train.select_columns(["input_ids", "labels"])
    eval_set = data.eval.select_columns(["input_ids", "labels"]) if data.eval is not None and len(data.eval) else None
    lengths = sample_lengths(train_set)
    row_tokens = sample_limit(recipe)  # the most a packed row holds: one sample's limit
    packing, pad_id = recipe.data.packing, tokenizer.pad_token_id

    def epoch_plan(epoch: int) -> list[list[list[int]]]:
        return plan_batches(lengths, batch_size=cfg.batch_size, max_length=row_tokens, packing=packing,
                            group_by_length=recipe.data.group_by_length, shuffle=recipe.data.shuffle,
                            seed=cfg.seed, epoch=epoch)

    eval_plan = None
    if eval_set is not None:
        eval_plan = plan_batches(sample_lengths(eval_set), batch_size=cfg.batch_size, max_length=row_tokens,
                                 packing=packing, group_by_length=False, shuffle=False, seed=cfg.seed, epoch=0)

    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(epoch_plan(0)) / accum)  # the last window of an epoch may be short
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # ---- model, optimizer
    model = apply_lora(load_base_model(recipe, device), recipe)
    print("speed-ups: " + (", ".join(apply_training_speedups(model, recipe)) or "none"), flush=True)
    trainable_params, total_params = count_parameters(model)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    autocast, scaler = mixed_precision(recipe, device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, grad_scaler=scaler)  # RNG restored last
        MetricsLogger.truncate_after(out, state.step)
        print(f"resuming from {resume_from} (step {state.step}, epoch {state.epoch}, batch {state.batch_index})", flush=True)
        if state.step >= total_steps and (out / SUMMARY_FILE).exists():
            print(f"{out} is already trained to step {state.step} of {total_steps}; nothing to do", flush=True)
            return out
    else:
        (out / METRICS_FILE).unlink(missing_ok=True)  # a run that died before its first checkpoint
    print(f"training {total_steps} steps ({steps_per_epoch} per epoch; batch {cfg.batch_size} x accumulation {accum}) "
          f"on {device}", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the summary's peak is this run's
    metrics = MetricsLogger(out, tensorboard=cfg.tensorboard)
    interactive = sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not interactive)
    start_step = state.step
    # since the last log row; time counts training steps only, not eval or saving
    interval = {"time": 0.0, "tokens": 0, "steps": 0, "loss": torch.zeros((), device=device, dtype=torch.float64)}
    last = {"loss": None, "eval_loss": None, "eval_step": None, "saved_step": None}
    if resume_from is not None:
        last["saved_step"] = state.step

    def checkpoint_now() -> None:
        save_checkpoint(out, state, model, optimizer, scheduler, tokenizer=tokenizer, recipe=recipe,
                        grad_scaler=scaler, keep=cfg.save_total_limit)
        last["saved_step"] = state.step

    def run_eval() -> None:
        if eval_plan is None:
            return
        loss, tokens = evaluate(model, eval_set, eval_plan, collate, pad_id, packing, device, autocast)
        row = {"step": state.step, "eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": tokens}
        metrics.log(row)
        last["eval_loss"], last["eval_step"] = loss, state.step
        msg = f"step {state.step}: eval_loss {loss:.4f} | eval_ppl {row['eval_ppl']:.2f}"
        if interactive:
            bar.write(msg)
        else:
            print(msg, flush=True)

    model.train()
    plan, plan_epoch = None, None
    with GracefulInterrupt() as interrupt:
        try:
            while state.step < total_steps:
                if plan_epoch != state.epoch:
                    plan, plan_epoch = epoch_plan(state.epoch), state.epoch
                step_start = time.perf_counter()
                window = plan[state.batch_index:state.batch_index + accum]
                if not window:  # a resumed position past this epoch's end (the data changed): next epoch
                    state.epoch, state.batch_index = state.epoch + 1, 0
                    continue
                batches = [collate(fetch_rows(train_set, rows), pad_id, packing) for rows in window]
                lr = optimizer.param_groups[0]["lr"]
                window_loss, label_tokens = backward_window(model, batches, device, autocast, scaler)
                interval["loss"] += window_loss
                grad_norm = optimizer_step(optimizer, scheduler, trainable, cfg.max_grad_norm, scaler)

                step_tokens = sum(lengths[i] for rows in window for row in rows for i in row)
                state.step += 1
                state.batch_index += len(window)
                state.tokens += step_tokens
                state.label_tokens += label_tokens
                if state.batch_index >= len(plan):
                    state.epoch, state.batch_index = state.epoch + 1, 0
                bar.update(1)
                log_now = state.step % cfg.log_steps == 0 or state.step == start_step + 1 or state.step == total_steps
                if log_now:
                    interval["loss"].item()  # wait for the device, so the step time below is real
                step_time = time.perf_counter() - step_start
                state.train_time_s += step_time
                interval["time"] += step_time
                interval["tokens"] += step_tokens
                interval["steps"] += 1

                if log_now:
                    loss_value = interval["loss"].item() / interval["steps"]
                    tokens_per_s = interval["tokens"] / max(interval["time"], 1e-9)
                    memory, _ = peak_memory_gb(device)
                    row = {"step": state.step, "epoch": round(state.epoch + state.batch_index / len(plan), 4),
                           "loss": loss_value, "lr": lr, "tokens_per_s": round(tokens_per_s, 2), "tokens": state.tokens,
                           "memory_gb": round(memory, 3)}
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    metrics.log(row)
                    last["loss"] = loss_value
                    text = format_postfix(loss_value, lr, tokens_per_s, memory)
                    if interactive:
                        bar.set_postfix_str(text)
                    else:
                        print(f"step {state.step}/{total_steps}: {text}", flush=True)
                    interval.update(time=0.0, tokens=0, steps=0)
                    interval["loss"].zero_()

                if cfg.eval_steps > 0 and state.step % cfg.eval_steps == 0 and state.step < total_steps:
                    run_eval()
                if cfg.save_steps > 0 and state.step % cfg.save_steps == 0 and state.step < total_steps:
                    checkpoint_now()
                if interrupt.requested:
                    if last["saved_step"] != state.step:
                        checkpoint_now()
                    bar.close()
                    metrics.close()
                    print(f"saved {out / f'checkpoint-{state.step}'}; continue with training.resume=true",
                          file=sys.stderr, flush=True)
                    raise KeyboardInterrupt

        except torch.cuda.OutOfMemoryError as e:
            raise UserError(
                f"out of GPU memory in step {state.step + 1} ({str(e).splitlines()[0][:120]}); lower "
                "training.batch_size or data.max_length (raise gradient_accumulation_steps to keep the batch), "
                "or set training.gradient_checkpointing=true or model.quantization=4bit"
            ) from None

    bar.close()
    if last["eval_step"] != state.step:
        run_eval()
    if last["saved_step"] != state.step:
        checkpoint_now()

    # ---- final outputs
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    save_recipe(recipe, out / "recipe.yaml")
    memory, memory_kind = peak_memory_gb(device)
    summary = {
        "steps": state.step,
        "epochs": round(state.epoch + (state.batch_index / len(plan) if plan else 0.0), 4),
        "tokens": state.tokens,
        "label_tokens": state.label_tokens,
        "train_time_s": round(state.train_time_s, 3),  # all sessions of a resumed run; eval and saving excluded
        "tokens_per_s": round(state.tokens / state.train_time_s, 2) if state.train_time_s > 0 else None,
        "first_loss": first_logged_loss(out),
        "final_loss": last["loss"],
        "eval_loss": last["eval_loss"],
        "eval_ppl": perplexity(last["eval_loss"]) if last["eval_loss"] is not None else None,
        "peak_memory_gb": round(memory, 3),
        "memory_kind": memory_kind,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "data": report_counts(data.report),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    metrics.close()
    print(f"done: {state.step} steps, loss {_fmt(summary['first_loss'])} -> {_fmt(last['loss'])}, "
          f"eval loss {_fmt(last['eval_loss'])}; adapter in {out}", flush=True)
    return out


def first_logged_loss(output_dir: Path) -> float | None:
    """The loss of the first training row in metrics.jsonl (the run's, across resumes)."""
    path = output_dir / METRICS_FILE
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        row = json.loads(line)
        if "loss" in row:
            return row["loss"]
    return None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def report_counts(report) -> dict:
    """The data report's plain fields (counts, names) for the summary, whatever its class."""
    fields = asdict(report) if is_dataclass(report) else dict(getattr(report, "__dict__", {}))
    out = {}
    for key, value in fields.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out

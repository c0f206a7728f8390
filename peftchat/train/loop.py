"""`peftchat train`: setup -> the step loop -> finish, top to bottom, in the manner of torchtune's
lora_finetune_single_device.py and litgpt's finetune/lora.py rather than HF Trainer.

`setup` builds the run's one state object (`peftchat.train.run.Run`; data and model from
`peftchat.train.build`): recipe -> tokenizer -> data batches -> base model -> LoRA
(`peftchat.model.adapters`) -> speed-ups and the loss they choose (`peftchat.train.speedups`) ->
optimizer, optional resume (`peftchat.train.resume`: what a resume may change, and `restore`), lr
schedule. `train_steps` runs optimizer steps: per step one accumulation window of micro-batches
(`peftchat.train.step`; one process of several: `peftchat.train.distributed`); the loss of the
window is the mean over its loss-bearing tokens (not a mean of per-micro-batch means), so
accumulation 2 x batch 1 gives the gradient of batch 2 x accumulation 1 even when lengths differ.
Every `log_steps` a metrics row, every `eval_steps` an evaluation (`peftchat.train.evaluation`),
every `save_steps` a checkpoint; a NaN/inf loss is `peftchat.train.nonfinite`'s. `finish`
evaluates and checkpoints the last step, then publishes the final outputs as a set
(`peftchat.rundir.publish_final_outputs`: adapter, tokenizer, `recipe.yaml`,
`training_summary.json`, the `complete` marker last).

A dir that already holds a run is never trained over from scratch (`resume.resume_checkpoint`).

Resume is exact: a checkpoint holds the data position (epoch, micro-batch index, step) and every
RNG state, so a run stopped at step k and resumed ends with the same adapter, bit for bit on CPU,
as one that never stopped. Ctrl-C, SIGTERM and SIGHUP finish the optimizer step under way, write a
checkpoint, release the lock and raise `peftchat.errors.Interrupted` (the CLI: exit 128 + signal,
with the command that resumes); a second Ctrl-C quits at once, except while a checkpoint is written
(`peftchat.train.signals.GracefulInterrupt`).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch

from peftchat.config import Recipe
from peftchat.data.batching import Window
from peftchat.errors import Interrupted
from peftchat.rundir import (
    METRICS_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
    checkpoint_dir,
    is_complete,
    publish_final_outputs,
    remove_stale_temp_dirs,
    unmark_finished,
)
from peftchat.train import distributed
from peftchat.train.build import setup_data, setup_model
from peftchat.train.checkpoint import (
    TrainState,
    capture_rng,
    check_init_adapter,
    load_adapter_weights,
    load_init_adapter,
    save_checkpoint,
    save_recipe_with_history,
)
from peftchat.train.curves import write_training_curves
from peftchat.train.distributed import SINGLE, Dist, barrier, host_sum, sum_tensor
from peftchat.train.evaluation import evaluate
from peftchat.train.lock import sole_writer
from peftchat.train.metrics import (
    IntervalMeter,
    MetricsLogger,
    Muted,
    Progress,
    format_postfix,
    loss_metrics,
    peak_memory_gb,
    perplexity,
)
from peftchat.train.nonfinite import step_dropped, verify_finite
from peftchat.train.optim import build_optimizer, build_scheduler, planned_steps
from peftchat.train.preference import attach_reference
from peftchat.train.resume import check_resume_changes, restore, resume_checkpoint
from peftchat.train.run import Run, TrainHooks
from peftchat.train.signals import GracefulInterrupt
from peftchat.train.step import (
    backward_window,
    mixed_precision,
    optimizer_step,
    out_of_memory_as_user_error,
    setup_objects_frozen,
)
from peftchat.train.summary import done_line, summary


def train(recipe: Recipe, hooks: Optional[TrainHooks] = None) -> Path:
    """Train the recipe's adapter; returns `training.output_dir`. The dir has one writer: a
    second run (or resume) while this one lives is refused, naming this one. Under torchrun the
    processes form one job (`peftchat.train.distributed`): process 0 holds the dir and writes."""
    # the signal handlers span the lock, so that a SIGTERM at any point still releases it
    with GracefulInterrupt() as interrupt, distributed.process_group(recipe) as dist:
        with sole_writer(recipe.training.output_dir) if dist.is_main else nullcontext():
            return _train(recipe, hooks, dist, interrupt)


def _train(
    recipe: Recipe, hooks: Optional[TrainHooks], dist: Dist = SINGLE, interrupt: Optional[GracefulInterrupt] = None
) -> Path:
    run = setup(recipe, hooks or TrainHooks(), dist)
    run.interrupt = interrupt
    state = run.state
    if state.step >= run.total_steps and is_complete(run.out):
        print(f"{run.out} is already trained to step {state.step} of {run.total_steps}; nothing to do", flush=True)
        return run.out
    if state.step < run.total_steps and dist.is_main:
        unmark_finished(run.out)  # training on: the dir is no longer a finished run until `finish`
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)  # the summary's peak is this session's
    cfg = recipe.training
    ranks = f" x {dist.world_size} processes" if dist.active else ""
    print(
        f"training {run.total_steps} steps ({run.steps_per_epoch} per epoch; batch {cfg.batch_size} x "
        f"accumulation {cfg.gradient_accumulation_steps}{ranks}) on {run.device}",
        flush=True,
    )
    run.metrics = MetricsLogger(run.out, tensorboard=cfg.tensorboard) if dist.is_main else Muted()
    run.progress = Progress(run.total_steps, state.step) if dist.is_main else Muted()
    with setup_objects_frozen():
        train_steps(run)
    with interrupt.saving() if interrupt is not None else nullcontext():  # a signal waits for the outputs
        finish(run)
    if interrupt is not None and interrupt.requested:
        interrupt.stopping = True
        print("the run completed before the signal could stop it; nothing to resume", file=sys.stderr, flush=True)
    return run.out


# ------------------------------------------------------------------------------ setup


def setup(recipe: Recipe, hooks: TrainHooks, dist: Dist = SINGLE) -> Run:
    """Build the run: data, model, optimizer, and the state (fresh, or from a checkpoint)."""
    from transformers import set_seed

    from peftchat.model.load import check_model_source, resolve_device
    from peftchat.train.speedups import check_fp8_device

    cfg = recipe.training
    resume_from = resume_checkpoint(recipe)  # fail fast, before any loading
    changes = check_resume_changes(recipe, resume_from) if resume_from is not None else {}
    if resume_from is None and recipe.adapter.init_from:
        check_init_adapter(recipe.adapter.init_from)
    check_model_source(recipe)
    device = dist.device or resolve_device(recipe)
    check_fp8_device(cfg, device)  # before the model loads
    set_seed(cfg.seed)
    with distributed.main_first(dist):  # one process writes the tokenized-data caches, the others read them
        tokenizer, report, train, evaluation = setup_data(recipe)
    total, per_epoch = planned_steps(recipe, train, dist.world_size)
    model, loss_fn, counts = setup_model(recipe, device, hooks, sharded=dist.strategy == "fsdp")
    if resume_from is not None:
        load_adapter_weights(resume_from, model)  # before FSDP2 shards the weights
    elif recipe.adapter.init_from:
        load_init_adapter(recipe.adapter.init_from, model)
    wrapped = distributed.wrap_for_training(model, loss_fn, dist, recipe) if dist.active else None
    if dist.world_size > 1:
        torch.manual_seed(cfg.seed + dist.rank)  # the processes' dropout masks differ (all built the same LoRA init)
    optimizer = build_optimizer(model, cfg, device)
    autocast, scaler = mixed_precision(recipe, device)
    run = Run(
        recipe=recipe,
        out=Path(cfg.output_dir),
        device=device,
        tokenizer=tokenizer,
        data_report=report,
        train=train,
        eval=evaluation,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        params_count=counts,
        total_steps=total,
        steps_per_epoch=per_epoch,
        resumed_from=resume_from,
        hooks=hooks,
        state=TrainState(total_steps=total, world_size=dist.world_size),
        dist=dist,
        wrapped=wrapped,
    )
    if dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(run.out)
    if resume_from is not None:
        restore(run, resume_from, changes)  # RNG restored last
    elif dist.is_main:
        (run.out / METRICS_FILE).unlink(missing_ok=True)  # a run that died before its first checkpoint
    run.scheduler = build_scheduler(optimizer, cfg, total, start_step=run.state.step)
    attach_reference(run)  # preference runs: the cached reference log-probs, when the recipe asks for them
    return run


# ------------------------------------------------------------------------------ the step loop


def train_steps(run: Run) -> None:
    """Optimizer steps from the run's position to `total_steps`, with logging, eval and saving."""
    cfg = run.recipe.training
    params = [p for p in run.model.parameters() if p.requires_grad]
    meter = IntervalMeter(run.device)
    world = run.dist.world_size  # N processes step through the windows one process with N x accumulation takes
    windows = run.train.windows(
        run.state.epoch, run.state.batch_index, cfg.gradient_accumulation_steps * world, part=(run.dist.rank, world)
    )
    run.model.train()
    interrupt = run.interrupt or GracefulInterrupt()
    interrupt.deferring = True  # from here a signal saves the run
    with out_of_memory_as_user_error(run.state):
        while run.state.step < run.total_steps:
            lr, grad_norm = training_step(run, next(windows), meter, params)
            run.progress.advance()
            if log_due(run) and meter.steps:  # a window of skipped steps has no loss to show
                log_training(run, meter, lr, grad_norm)
            if due(run.state.step, cfg.eval_steps, run.total_steps):
                run_eval(run)
            if due(run.state.step, cfg.save_steps, run.total_steps):
                save(run)
            if run.hooks.after_step is not None:
                run.hooks.after_step(run)
            if run.interrupt_seen if run.dist.active else interrupt.requested:
                stop_for_interrupt(run)


def training_step(run: Run, window: Window, meter: IntervalMeter, params: list) -> tuple[float, Any]:
    """One optimizer step over `window`; returns (the lr it used, the gradient norm or None).
    A NaN/inf loss stops the run before the step is applied, or drops the step
    (`training.on_nan`, `peftchat.train.nonfinite`)."""
    cfg, state = run.recipe.training, run.state
    start = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    micro_losses: list = []
    if run.dist.active:
        loss, label_tokens, tokens, run.interrupt_seen = distributed.backward_window_sharded(
            run.wrapped,
            window,
            run.dist,
            batches=run.train,
            accumulation=cfg.gradient_accumulation_steps,
            device=run.device,
            autocast=run.autocast,
            scaler=run.scaler,
            stop_requested=bool(run.interrupt and run.interrupt.requested),
            per_micro=micro_losses,
        )
    else:
        loss, label_tokens = backward_window(
            run.model, window.micro_batches, run.device, run.loss_fn, run.autocast, run.scaler, per_micro=micro_losses
        )
        tokens = window.tokens
    if step_dropped(run, window, micro_losses, loss):
        return lr, None
    grad_norm = optimizer_step(run.optimizer, run.scheduler, params, cfg.max_grad_norm, run.scaler)
    state.step += 1
    state.epoch, state.batch_index = window.epoch, window.batch_index
    state.tokens += tokens
    state.label_tokens += label_tokens
    run.epoch_progress = window.epoch_progress
    if log_due(run):
        meter.sync()  # wait for the device, so the step time below is real
    elapsed = time.perf_counter() - start
    state.train_time_s += elapsed
    meter.add(loss, tokens, elapsed)
    return lr, grad_norm


def log_due(run: Run) -> bool:
    """Every `log_steps`, the first step of a fresh run and the last one. A resumed run's first
    row comes at the next multiple, so its tokens/s is measured from the resumed step on."""
    step = run.state.step
    return step % run.recipe.training.log_steps == 0 or step == 1 or step == run.total_steps


def due(step: int, every: int, total: int) -> bool:
    """An interval event (eval, save) at `step`; the last step's are `finish`'s."""
    return every > 0 and step % every == 0 and step < total


def log_training(run: Run, meter: IntervalMeter, lr: float, grad_norm) -> None:
    verify_finite(run)
    world = run.dist.world_size
    loss, tokens_per_s = meter.take(reduce=(lambda t: sum_tensor(run.dist, t) / world) if world > 1 else None)
    memory, _ = peak_memory_gb(run.device)
    row = {
        "step": run.state.step,
        "epoch": round(run.epoch_progress, 4),
        "loss": loss,
        "lr": lr,
        "tokens_per_s": round(tokens_per_s, 2),
        "tokens": run.state.tokens,
        "memory_gb": round(memory, 3),
    }
    if grad_norm is not None:  # FSDP2: a DTensor
        row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    extra = loss_metrics(run.loss_fn, "train", host_sum(run.dist))
    row.update(extra)
    run.metrics.log(row)
    run.progress.show(run.state.step, run.total_steps, format_postfix(loss, lr, tokens_per_s, memory, extra))


def run_eval(run: Run) -> None:
    verify_finite(run)
    if run.eval is None:
        return
    loss, tokens = evaluate(run)
    row = {
        "step": run.state.step,
        "eval_loss": loss,
        "eval_ppl": perplexity(loss),
        "eval_tokens": tokens,
        **loss_metrics(run.loss_fn, "eval", host_sum(run.dist)),
    }
    if run.hooks.eval_scores is not None and run.dist.is_main:  # DDP: rank 0 scores while the others wait
        row.update(run.hooks.eval_scores(run.model, run.tokenizer))
    run.metrics.log(row)
    run.eval_step = run.state.step
    margin = (
        f" | eval margin {row['eval_rewards/margin']:.3f} | acc {row['eval_rewards/accuracy']:.2f}"
        if "eval_rewards/margin" in row
        else ""
    )
    run.progress.say(f"step {run.state.step}: eval_loss {loss:.4f} | eval_ppl {row['eval_ppl']:.2f}{margin}")
    if run.dist.is_main:
        write_training_curves(run.out)


def save(run: Run) -> None:
    """A checkpoint of the run, written by the main process alone (FSDP2: the others send their
    shards to it first); with several processes it holds each one's RNG state."""
    verify_finite(run)
    cfg, dist = run.recipe.training, run.dist
    adapter_state = distributed.full_trainable_state(run.model, dist)
    optimizer_state = distributed.full_optimizer_state(run.model, run.optimizer, dist)
    rng = None
    if dist.active:
        ranks = distributed.gather_to_main(dist, capture_rng())
        rng = {**ranks[0], "ranks": ranks} if ranks is not None else None  # the main process alone gets them
    if dist.is_main:
        with run.interrupt.saving() if run.interrupt is not None else nullcontext():  # a signal waits for it
            save_checkpoint(
                run.out,
                run.state,
                run.model,
                run.optimizer,
                tokenizer=run.tokenizer,
                recipe=run.recipe,
                grad_scaler=run.scaler,
                keep=cfg.save_total_limit,
                rng=rng,
                adapter_state=adapter_state,
                optimizer_state=optimizer_state,
            )
    barrier(dist)
    run.saved_step = run.state.step


def stop_for_interrupt(run: Run) -> None:
    """Checkpoint the step just done (unless saved already) and raise `Interrupted` naming it."""
    if run.saved_step != run.state.step:
        save(run)
    run.progress.close()
    run.metrics.close()
    signum = run.interrupt.signum or signal.SIGINT  # torchrun: another process got the signal
    run.interrupt.stopping = True  # from here further signals are only noted: the lock is released
    checkpoint = checkpoint_dir(run.out, run.state.step)
    raise Interrupted(signum, f"saved {checkpoint} (step {run.state.step} of {run.total_steps})", checkpoint)


def finish(run: Run) -> None:
    """Evaluate and checkpoint the last step (unless done), then publish the final outputs."""
    run.progress.close()
    verify_finite(run)
    if run.eval_step != run.state.step:
        run_eval(run)
    if run.saved_step != run.state.step:
        save(run)
    result = summary(run)
    adapter_state = distributed.full_trainable_state(run.model, run.dist)  # FSDP2: gathered to rank 0

    def write(tmp: Path) -> None:
        run.model.save_pretrained(str(tmp), **({"state_dict": adapter_state} if adapter_state is not None else {}))
        run.tokenizer.save_pretrained(str(tmp))
        save_recipe_with_history(run.recipe, run.state.changes, tmp / RECIPE_FILE)
        (tmp / SUMMARY_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    if run.dist.is_main:
        publish_final_outputs(run.out, write, run.state.step)
    run.metrics.close()
    if run.dist.is_main:
        write_training_curves(run.out)  # a picture beside the outputs, not part of the completed set
    barrier(run.dist)
    print(done_line(run, result), flush=True)

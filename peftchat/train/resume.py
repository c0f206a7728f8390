"""Resume: which checkpoint a run continues from, which recipe changes it accepts, and loading
the checkpoint into the run (`restore`).

The resumed recipe is compared with the checkpoint's `recipe.yaml`, key by key, under each key's
resume policy, declared with the key in `peftchat.config` (`peftchat config --explain` lists them):

* `schedule` keys only shape the future (the run's length and the save / eval / log intervals):
  they may change; a new length re-plans the lr schedule (`peftchat.train.optim`);
* `runtime` keys say how the run is carried out, not what it learns (device, output and speed
  knobs, decoding): they may change;
* `trained` keys (the default for a key declared without a policy) change what is trained: a change
  stops the run (exit 2, the differences listed) unless `training.resume_changes=allow`, and then
  it is recorded in `recipe.yaml` (a comment header) and `metrics.jsonl` (a row with
  `resume_changes` at the step it took effect).

Output-dir policy: a dir that already holds a run (a complete checkpoint or a finished adapter)
is never trained over from scratch: the run stops with an error that suggests
`training.resume=true` (continue it) or another `training.output_dir`. Anything else in the dir
(say, a `metrics.jsonl` of a run that died before its first checkpoint) is overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from peftchat.config import KEYS, TRAINED, Recipe, load_recipe, with_absolute_paths
from peftchat.errors import ConfigError, UserError
from peftchat.rundir import (
    RECIPE_FILE,
    checkpoint_damage,
    existing_run,
    integrity_checked,
    is_complete,
    latest_checkpoint,
    latest_intact_checkpoint,
)
from peftchat.train import distributed
from peftchat.train.checkpoint import TrainState, load_training_state
from peftchat.train.metrics import MetricsLogger, row_with
from peftchat.train.run import Run


def resume_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from (`training.resume`), or None for a fresh run; raises a
    UserError for a fresh run into a dir that holds one already, or a resume with nothing to
    resume."""
    out = Path(recipe.training.output_dir)
    resume = recipe.training.resume
    if resume is True:
        latest = latest_intact_checkpoint(out) if integrity_checked() else latest_checkpoint(out)
        if latest is None:
            damaged = " (the complete ones are damaged, see above)" if latest_checkpoint(out) is not None else ""
            raise UserError(
                f"training.resume=true but {out} has no complete checkpoint-STEP dir to resume from{damaged}"
            )
        return latest
    if resume:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise UserError(f"training.resume: checkpoint {resume} not found")
        if not is_complete(path):
            raise UserError(f"training.resume: {resume} is not a complete checkpoint (no 'complete' marker)")
        damage = checkpoint_damage(path) if integrity_checked() else None
        if damage is not None:
            raise UserError(
                f"training.resume: checkpoint {resume} is damaged: {damage}; "
                f"resume from an older checkpoint, or with training.resume=true (the newest intact one); "
                f"--no-integrity-check resumes from it anyway"
            )
        return path
    what = existing_run(out)
    if what is not None:
        raise UserError(
            f"training.output_dir {out} already holds a run ({what}); continue it with "
            f"training.resume=true or choose another training.output_dir"
        )
    return None


def _flat(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(recipe)), "")
    return out


def key_kind(name: str) -> str:
    """`schedule`, `runtime` or `trained` (see the module docstring): the policy declared for
    `name` or for the key it lies under (`data.roles.bot` is `data.roles`'s); a key the schema does
    not have (a recipe of an older peftchat) counts as trained."""
    while name:
        info = KEYS.get(name)
        if info is not None:
            return info.spec.resume
        name = name.rpartition(".")[0]
    return TRAINED


def recipe_changes(old: Recipe, new: Recipe) -> dict[str, list]:
    """`{key: [old value, new value]}` for every key that differs, runtime keys left out."""
    a, b = _flat(with_absolute_paths(old)), _flat(with_absolute_paths(new))  # saved recipes hold absolute paths
    return {
        k: [a.get(k), b.get(k)]
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k) and key_kind(k) != "runtime"
    }


def check_resume_changes(recipe: Recipe, checkpoint: Path) -> dict[str, list]:
    """The changes of `recipe` against the checkpoint's (see `recipe_changes`); ConfigError when
    one changes what is trained and `training.resume_changes` is not `allow`."""
    saved = checkpoint / RECIPE_FILE
    if not saved.is_file():
        return {}  # a checkpoint written without a recipe (tests, old runs): nothing to compare
    changes = recipe_changes(load_recipe(saved), recipe)
    trained = {k: v for k, v in changes.items() if key_kind(k) == "trained"}
    if trained and recipe.training.resume_changes != "allow":
        listed = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in trained.items())
        raise ConfigError(
            f"training.resume: the recipe changes what {checkpoint.name} was trained with ({listed}); "
            f"undo the change, or accept it with training.resume_changes=allow"
        )
    return changes


def restore(run: Run, checkpoint: Path, changes: dict) -> None:
    """Load the checkpoint into the run (its adapter weights are in already: `loop.setup`); re-plan
    the schedule and record accepted recipe changes."""
    load_sharded = None
    if run.dist.strategy == "fsdp":

        def load_sharded(saved: dict) -> None:
            distributed.load_full_optimizer_state(run.model, run.optimizer, saved)

    state = load_training_state(
        checkpoint, run.optimizer, grad_scaler=run.scaler, load_optimizer=load_sharded, rank=run.dist.rank
    )
    _apply_optimizer_settings(run.optimizer, run.recipe)
    if run.dist.is_main:
        MetricsLogger.truncate_after(run.out, state.step)
    distributed.barrier(run.dist)  # every process reads the truncated metrics below
    _note_world_size(run, state)
    run.saved_step = state.step
    last_eval = row_with(run.out, "eval_loss")
    if last_eval is not None and last_eval["step"] == state.step:
        run.eval_step = state.step  # a resume after the last step: its eval is done already
    print(f"resuming from {checkpoint} (step {state.step}, epoch {state.epoch}, batch {state.batch_index})", flush=True)
    if state.total_steps and state.total_steps != run.total_steps and state.step < run.total_steps:
        print(
            f"lr schedule re-planned for {run.total_steps} steps (was {state.total_steps}): steps "
            f"{state.step + 1}..{run.total_steps} follow the curve of a {run.total_steps}-step run",
            flush=True,
        )
    state.total_steps = run.total_steps
    if changes and not (state.step >= run.total_steps and is_complete(run.out)):  # a no-op resume changes nothing
        state.changes.append({"step": state.step, "changes": changes})
        if run.dist.is_main:
            with MetricsLogger(run.out) as metrics:
                metrics.log({"step": state.step, "resume_changes": changes})
        print(
            "recipe changes from step "
            + f"{state.step + 1}: "
            + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()),
            flush=True,
        )
    run.state = state


def _note_world_size(run: Run, state: TrainState) -> None:
    """A resume with another number of processes is allowed; it changes the global batch."""
    now, then = run.dist.world_size, state.world_size
    if now != then:
        g = run.recipe.training.gradient_accumulation_steps
        print(
            f"note: {run.resumed_from} was written by {then} process(es), this run has {now}: from step "
            f"{state.step + 1} an optimizer step takes {now * g} micro-batches (was {then * g}); "
            f"resume with {then} process(es) to continue the run exactly",
            flush=True,
        )
        if run.dist.is_main:
            with MetricsLogger(run.out) as metrics:
                metrics.log({"step": state.step, "world_size_change": [then, now]})
    state.world_size = now


def _apply_optimizer_settings(optimizer: torch.optim.Optimizer, recipe: Recipe) -> None:
    """The recipe's Adam settings over those a loaded optimizer state carries (they differ only
    after a change accepted with `training.resume_changes=allow`; lr is the schedule's)."""
    cfg = recipe.training
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"] = cfg.adam_eps
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0  # optim.parameter_groups' order

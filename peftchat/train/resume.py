"""Resume rules: which checkpoint a run continues from, and which recipe changes it accepts.

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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from peftchat.config import KEYS, TRAINED, Recipe, load_recipe, recipe_to_yaml, with_absolute_paths
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
            raise UserError(f"training.resume=true but {out} has no complete checkpoint-STEP dir to resume from{damaged}")
        return latest
    if resume:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise UserError(f"training.resume: checkpoint {resume} not found")
        if not is_complete(path):
            raise UserError(f"training.resume: {resume} is not a complete checkpoint (no 'complete' marker)")
        damage = checkpoint_damage(path) if integrity_checked() else None
        if damage is not None:
            raise UserError(f"training.resume: checkpoint {resume} is damaged: {damage}; "
                            f"resume from an older checkpoint, or with training.resume=true (the newest intact one); "
                            f"--no-integrity-check resumes from it anyway")
        return path
    what = existing_run(out)
    if what is not None:
        raise UserError(f"training.output_dir {out} already holds a run ({what}); continue it with "
                        f"training.resume=true or choose another training.output_dir")
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
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and key_kind(k) != "runtime"}


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
        raise ConfigError(f"training.resume: the recipe changes what {checkpoint.name} was trained with ({listed}); "
                          f"undo the change, or accept it with training.resume_changes=allow")
    return changes


def save_recipe_with_history(recipe: Recipe, history: list, path: str | os.PathLike) -> None:
    """`recipe.yaml`, headed by one comment line per accepted resume change (YAML comments, so
    the file still loads as a recipe)."""
    lines = []
    for entry in history:
        changed = ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in entry["changes"].items())
        lines.append(f"# resumed at step {entry['step']} with changes: {changed}\n")
    Path(path).write_text("".join(lines) + recipe_to_yaml(with_absolute_paths(recipe)), encoding="utf-8")

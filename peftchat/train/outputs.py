"""What `peftchat train` may write into: checked before anything is loaded.

`training.output_dir` must not be, or hold, anything the run reads (the base model, the tokenizer,
a data file, the recipe, the checkpoint resumed from), and must be empty, a peftchat run dir, or
a dir the user explicitly lets the run add its files to (`--into-nonempty-dir`); even then no
file already there is ever replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftchat.config import Recipe
from peftchat.data.sources import local_data_files
from peftchat.errors import UserError
from peftchat.paths import check_outputs
from peftchat.rundir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKSUMS_FILE,
    COMPLETE_MARKER,
    CURVES_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    TMP_PREFIX,
    checkpoint_step,
    is_run_dir,
)
from peftchat.train.lock import HOLDER_FILE, LOCK_FILE

INTO_NONEMPTY_FLAG = "--into-nonempty-dir"
# Every name a run writes at the top of its dir: the final outputs (peft adds a README.md model
# card, the tokenizer its files) and what a run keeps there while it lives.
RUN_FILES = frozenset(
    {
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        "README.md",
        RECIPE_FILE,
        SUMMARY_FILE,
        CHECKSUMS_FILE,
        COMPLETE_MARKER,
        METRICS_FILE,
        CURVES_FILE,
        TENSORBOARD_DIR,
        LOCK_FILE,
        HOLDER_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
    }
)
_LEFT_BY_A_RUN = frozenset({LOCK_FILE, HOLDER_FILE})  # a run killed during setup leaves only these


def _ours(name: str) -> bool:
    return name in _LEFT_BY_A_RUN or name.startswith(TMP_PREFIX) or checkpoint_step(name) is not None


def check_output_dir_owner(out: Path, into_nonempty: bool) -> None:
    """UserError for a non-empty dir that holds no peftchat run, unless `into_nonempty`; and
    then still for one that holds a name the run would write."""
    if not out.is_dir() or is_run_dir(out):
        return
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
    if not foreign:
        return
    if not into_nonempty:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(
            f"training.output_dir {out} is not empty and holds no peftchat run ({foreign[0]}{more}); "
            f"choose an empty or new dir, or pass {INTO_NONEMPTY_FLAG} to add the run's files beside them"
        )
    clash = [name for name in foreign if name in RUN_FILES]
    if clash:
        raise UserError(
            f"training.output_dir {out} holds {out / clash[0]}, a name the run writes; peftchat never "
            f"replaces files it did not create: choose another training.output_dir"
        )


def recipe_inputs(recipe: Recipe, recipe_file: str | os.PathLike) -> list[tuple[str, str | os.PathLike | None]]:
    """What a command driven by a recipe reads (as `paths.check_outputs` takes it): the recipe,
    the base model, the tokenizer and every local data file of `data.train` and `data.eval`."""
    inputs = [
        ("the recipe", recipe_file),
        ("model.path", recipe.model.path),
        ("model.tokenizer", recipe.model.tokenizer),
    ]
    for key in ("train", "eval"):
        inputs += [(f"data.{key} file", f) for f in local_data_files(getattr(recipe.data, key), f"data.{key}")]
    return inputs


def check_train_outputs(recipe: Recipe, recipe_file: str | os.PathLike, into_nonempty: bool = False) -> None:
    """The output dir against every input of the run, then against its owner (see the module doc)."""
    out = Path(recipe.training.output_dir).expanduser()
    resume = recipe.training.resume
    inputs = recipe_inputs(recipe, recipe_file)
    # The run dir's own recipe.yaml and a checkpoint of this very run dir are the run's to rewrite
    # and to resume from; anything else the run reads is the user's.
    if is_run_dir(out) and _under(Path(recipe_file), out):
        inputs = inputs[1:]
    if isinstance(resume, str) and not _under(Path(resume), out):
        inputs.append(("training.resume", resume))
    if recipe.adapter.init_from:
        inputs.append(("adapter.init_from", recipe.adapter.init_from))
    check_outputs([("training.output_dir", out)], inputs)
    check_output_dir_owner(out, into_nonempty)


def _under(path: Path, folder: Path) -> bool:
    return folder.expanduser().resolve() in path.expanduser().resolve().parents

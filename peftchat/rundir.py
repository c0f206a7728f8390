"""The run directory: every file name and layout training leaves behind, written safely, and what
a dir handed to merge / chat / generate is.

`training.output_dir/` of a run:

    checkpoint-STEP/           adapter, tokenizer, recipe.yaml, optimizer.pt, rng_state.pt,
                               trainer_state.json, checksums.json (size + sha256 of each file;
                               resume skips a checkpoint that no longer matches), then `complete`
                               (written last; only marked checkpoints are resumed from or loaded)
    metrics.jsonl              one JSON row per log / eval / resume event, appended live
    adapter_config.json, adapter_model.safetensors, tokenizer files, recipe.yaml,
    training_summary.json, checksums.json (of those)
                               the final outputs, written as a set:
    complete                   ... into a hidden `.tmp-final-*` dir first, moved in file by file,
                               this marker last. A dir whose marker is missing is an unfinished
                               run: every reader refuses it (its checkpoints stay usable), and
                               every reader checks the files against checksums.json
                               (`check_usable_adapter_dir`; --no-integrity-check skips both).

A checkpoint is written into a hidden `.tmp-*` dir, flushed, marked and renamed into place, so a
crash leaves the old set of checkpoints or the new one, never a half-written `checkpoint-STEP`.

Sources (`resolve_source`): a recipe file (its base, plus the final adapter of its output dir, else
the newest complete checkpoint), an adapter dir (a finished run dir, a checkpoint, or any peft
adapter dir not written by a run), or a merged model dir. Each resolves to a Recipe whose
`model.*` says how to load the base.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from peftchat.config import Recipe, load_recipe, recipe_from_dict
from peftchat.errors import UserError
from peftchat.shipped_recipes import resolve_recipe_name

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "training_summary.json"
CURVES_FILE = "training_curves.png"
TENSORBOARD_DIR = "tensorboard"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
COMPLETE_MARKER = "complete"
# inside a checkpoint
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
CHECKSUMS_FILE = "checksums.json"  # size + sha256 of every other file, written before the marker

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"  # hidden dirs of a save under way; never read, removed when found stale


def note(message: str) -> None:
    """Notes go to stderr, so stdout carries only replies and results."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint, or a run dir's final outputs, written to the end."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first (temp and unmarked dirs skipped)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)  # type: ignore[arg-type]  # found: only paths with a step


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """`checksums.json`: size and sha256 of every file under `folder` (the marker aside), so a
    truncated, bit-flipped or missing file is found before it is resumed from."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (CHECKSUMS_FILE, COMPLETE_MARKER):
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    (folder / CHECKSUMS_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """Why a marked checkpoint cannot be trusted (a file missing, of the wrong size or content,
    an unreadable manifest), else None. A checkpoint written before checksums existed (no
    manifest) is taken as it is."""
    folder = Path(path)
    manifest = folder / CHECKSUMS_FILE
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CHECKSUMS_FILE} is unreadable"
    for rel, want in files.items():
        file = folder / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written (truncated or overwritten)"
        if _sha256(file) != want["sha256"]:
            return f"{rel} does not match its checksum (the file changed on disk since it was written)"
    return None


def latest_intact_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; a note names each newer
    one skipped and why."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        damage = checkpoint_damage(ckpt)
        if damage is None:
            return ckpt
        note(f"note: skipping {ckpt.name}: {damage}")
    return None


def remove_stale_temp_dirs(output_dir: str | os.PathLike) -> None:
    """Delete temp dirs left by a save that crashed (they are never resumed from)."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (`keep` <= 0 keeps all); returns
    the deleted dirs."""
    if keep <= 0:
        return []
    doomed = list_checkpoints(output_dir)[:-keep]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _mark(path: Path, text: str) -> None:
    (path / COMPLETE_MARKER).write_text(text + "\n", encoding="utf-8")
    _fsync(path / COMPLETE_MARKER)
    _fsync(path)


def write_checkpoint_dir(output_dir: str | os.PathLike, step: int, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes a checkpoint's files into a hidden dir, which is then flushed, marked
    and renamed to `checkpoint-STEP` (replacing one of the same step)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f"{TMP_PREFIX}checkpoint-{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        write_checksums(tmp)
        _fsync_tree(tmp)
        _mark(tmp, str(step))
        if final.exists():  # os.replace cannot overwrite a non-empty dir: move the old one aside
            old = root / f"{TMP_PREFIX}old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------ final outputs


def publish_final_outputs(output_dir: str | os.PathLike, fill: Callable[[Path], None], step: int) -> None:
    """`fill(tmp)` writes the final outputs into a hidden dir; they are flushed, moved into
    `output_dir` one file at a time, and the `complete` marker is written last."""
    root = Path(output_dir)
    unmark_finished(root)
    tmp = root / f"{TMP_PREFIX}final-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        write_checksums(tmp)  # readers (merge, chat, export, ...) check the final files against it
        _fsync_tree(tmp)
        for item in sorted(tmp.iterdir()):
            target = root / item.name
            if target.is_dir() and not item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        _mark(root, str(step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unmark_finished(output_dir: str | os.PathLike) -> None:
    """A run that trains on (a resume with more steps) is no longer finished until it publishes again."""
    (Path(output_dir) / COMPLETE_MARKER).unlink(missing_ok=True)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Written by `peftchat train` (metrics, checkpoints or the final marker), not just any adapter dir."""
    p = Path(path)
    return is_complete(p) or (p / METRICS_FILE).is_file() or bool(list_checkpoints(p))


def existing_run(output_dir: str | os.PathLike) -> str | None:
    """What of a run `output_dir` already holds (a complete checkpoint or final outputs), else None."""
    out = Path(output_dir)
    ckpts = list_checkpoints(out)
    if ckpts:
        return ckpts[-1].name
    if is_complete(out) or (out / ADAPTER_WEIGHTS).exists():
        return "a finished adapter"
    return None


# ------------------------------------------------------------------------------ sources


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def is_model_dir(path: Path) -> bool:
    return (path / MODEL_CONFIG).is_file()


def has_tokenizer(path: Path) -> bool:
    return (path / TOKENIZER_CONFIG).is_file()


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{adapter_dir} is not an adapter dir (no {ADAPTER_CONFIG})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


NO_CHECK_FLAG = "--no-integrity-check"
# Off only inside `integrity_unchecked()` (the CLI's --no-integrity-check): a context variable
# rather than a parameter, because every reader reaches the check through resolve_source.
_CHECK_INTEGRITY: ContextVar[bool] = ContextVar("peftchat_check_integrity", default=True)


@contextmanager
def integrity_unchecked() -> Iterator[None]:
    """Load run dirs and checkpoints without their marker and checksums (files edited on purpose)."""
    token = _CHECK_INTEGRITY.set(False)
    try:
        yield
    finally:
        _CHECK_INTEGRITY.reset(token)


def integrity_checked() -> bool:
    """False inside `integrity_unchecked()`."""
    return _CHECK_INTEGRITY.get()


def check_usable_adapter_dir(adapter_dir: Path) -> None:
    """UserError for a checkpoint without its marker, a run dir whose final outputs were not all
    written (training stopped or crashed before the end: its newest intact checkpoint is named),
    or a file that no longer matches the run's `checksums.json`. An adapter dir not written by a
    run (no manifest) is taken as it is; so is anything inside `integrity_unchecked()`."""
    if not _CHECK_INTEGRITY.get():
        note(f"note: {NO_CHECK_FLAG}: {adapter_dir} used without checking its '{COMPLETE_MARKER}' marker and checksums")
        return
    opt_out = f"({NO_CHECK_FLAG} loads it anyway)"
    if checkpoint_step(adapter_dir) is not None:
        if not is_complete(adapter_dir):
            raise UserError(f"{adapter_dir} is an incomplete checkpoint (no '{COMPLETE_MARKER}' marker) {opt_out}")
    elif is_run_dir(adapter_dir) and not is_complete(adapter_dir):
        latest = latest_intact_checkpoint(adapter_dir)
        hint = (
            f"; use its newest complete checkpoint {latest} or resume the run with training.resume=true"
            if latest
            else ""
        )
        raise UserError(f"{adapter_dir} is an unfinished run (no '{COMPLETE_MARKER}' marker){hint} {opt_out}")
    damage = checkpoint_damage(adapter_dir)
    if damage is not None:
        raise UserError(
            f"{adapter_dir}: {damage}; use another checkpoint of the run, or pass {NO_CHECK_FLAG} "
            f"if it was changed on purpose"
        )


@dataclass
class ChatSource:
    """What to load: the recipe (base model and conversation format), the adapter dir to put on
    the base (None = none) and the dir holding the tokenizer to use (None = the recipe's)."""

    kind: str  # "recipe" | "adapter" | "checkpoint" | "model"
    recipe: Recipe
    adapter_dir: Optional[Path]
    tokenizer_dir: Optional[Path]


def _recipe_from(data: dict, overrides: Iterable[str], source: str) -> Recipe:
    """A recipe from a dict plus `key=value` overrides (for sources that have no recipe file)."""
    try:
        return recipe_from_dict(data, overrides, source=source)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def recipe_for_adapter(
    adapter_dir: str | os.PathLike, overrides: Iterable[str] = (), base: Optional[str] = None
) -> Recipe:
    """The recipe an adapter was trained with: `recipe.yaml` in the adapter dir, or in its parent
    (a `checkpoint-STEP` inside an output dir). Without one, a default recipe whose base is
    adapter_config's `base_model_name_or_path` and whose format is the tokenizer's chat template.
    `base` replaces `model.path` (and the tokenizer, unless the adapter dir carries its own)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    for candidate in (adapter_dir / RECIPE_FILE, adapter_dir.parent / RECIPE_FILE):
        if candidate.is_file():
            recipe = load_recipe(candidate, overrides)
            break
    else:
        fallback = base or config.get("base_model_name_or_path")
        if not fallback:
            raise UserError(
                f"{adapter_dir} has no {RECIPE_FILE} and its {ADAPTER_CONFIG} names no base model; pass --base"
            )
        note(
            f"note: {adapter_dir} has no {RECIPE_FILE}; base {fallback}, conversation format = the tokenizer's chat template"
        )
        recipe = _recipe_from(
            {"model": {"path": str(fallback)}, "data": {"train": ""}}, overrides, str(adapter_dir / ADAPTER_CONFIG)
        )
    if base is not None:
        recipe.model.path = str(base)
        recipe.model.tokenizer = None
    return recipe


def _merged_dir_recipe(model_dir: Path, overrides: Iterable[str]) -> Recipe:
    recipe_file = model_dir / RECIPE_FILE
    if recipe_file.is_file():
        recipe = load_recipe(recipe_file, overrides)
    else:
        config = json.loads((model_dir / MODEL_CONFIG).read_text(encoding="utf-8"))
        stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(stored, "fp32")
        recipe = _recipe_from(
            {"model": {"path": str(model_dir), "dtype": dtype}, "data": {"train": ""}}, overrides, str(model_dir)
        )
    # The dir itself is the model, wherever it was moved to since it was written.
    recipe.model.path = str(model_dir)
    recipe.model.tokenizer = None
    return recipe


def trained_adapter(recipe: Recipe) -> Optional[Path]:
    """The final adapter of `training.output_dir`, else its newest complete checkpoint, else None."""
    out = Path(recipe.training.output_dir).expanduser()
    if is_adapter_dir(out) and (is_complete(out) or not is_run_dir(out)):
        check_usable_adapter_dir(out)
        return out
    latest = latest_intact_checkpoint(out) if _CHECK_INTEGRITY.get() else latest_checkpoint(out)
    if latest is not None and is_adapter_dir(latest):
        note(f"note: no final adapter in {out}; using the newest checkpoint {latest.name}")
        return latest
    return None


def adapter_source(adapter_dir: Path, overrides: Iterable[str] = (), base: Optional[str] = None) -> ChatSource:
    """An adapter dir as a source: its recipe, and the tokenizer saved with it (in the dir, or in
    the output dir holding a `checkpoint-STEP`). Refuses unfinished runs and checkpoints."""
    check_usable_adapter_dir(adapter_dir)
    recipe = recipe_for_adapter(adapter_dir, overrides, base=base)
    tok_dir = next((d for d in (adapter_dir, adapter_dir.parent) if has_tokenizer(d)), None)
    kind = "checkpoint" if checkpoint_step(adapter_dir) is not None and is_complete(adapter_dir) else "adapter"
    return ChatSource(kind, recipe, adapter_dir, tok_dir)


def source_paths(
    source: str | os.PathLike, overrides: Iterable[str] = ()
) -> list[tuple[str, str | os.PathLike | None]]:
    """What a command reads through `source`, as `paths.check_outputs` takes it, found without
    loading anything or printing notes: the source itself, the base model and tokenizer its
    recipe names, and for a recipe file the run dir whose adapter it would load. A source that
    does not resolve gives what it can (resolve_source names the problem)."""
    path = Path(source).expanduser()
    found: list[tuple[str, str | os.PathLike | None]] = [("the source", path)]
    recipe_file = (
        path
        if path.is_file()
        else next((c for c in (path / RECIPE_FILE, path.parent / RECIPE_FILE) if c.is_file()), None)
    )
    try:
        if recipe_file is not None:
            recipe = load_recipe(recipe_file, overrides)
            found += [("model.path", recipe.model.path), ("model.tokenizer", recipe.model.tokenizer)]
            if recipe_file == path:
                found.append(("training.output_dir", recipe.training.output_dir))
        elif is_adapter_dir(path):
            found.append(("the adapter's base model", read_adapter_config(path).get("base_model_name_or_path")))
    except UserError:
        pass
    return found


def resolve_source(source: str | os.PathLike, overrides: Iterable[str] = ()) -> ChatSource:
    """Tell a recipe file, an adapter or checkpoint dir and a merged model dir apart, and read its recipe."""
    path = resolve_recipe_name(source, "source")  # `demo`: the shipped recipe, unless ./demo exists
    if not path.exists():
        raise UserError(f"not found: {source} (expected a recipe file, an adapter dir or a model dir)")
    if path.is_file():
        recipe = load_recipe(path, overrides)
        adapter = trained_adapter(recipe)
        if adapter is None:
            note(
                f"note: no trained adapter in {recipe.training.output_dir}; talking to the base model {recipe.model.path}"
            )
        return ChatSource(
            "recipe", recipe, adapter, adapter if adapter is not None and has_tokenizer(adapter) else None
        )
    if is_adapter_dir(path):
        return adapter_source(path, overrides)
    if is_model_dir(path):
        return ChatSource("model", _merged_dir_recipe(path, overrides), None, path if has_tokenizer(path) else None)
    raise UserError(f"{source} is neither an adapter dir ({ADAPTER_CONFIG}) nor a model dir ({MODEL_CONFIG})")

"""Training checkpoints: save atomically, find the newest complete one, load, rotate.

A checkpoint is `output_dir/checkpoint-STEP/` holding the adapter (peft `save_pretrained`, so
`PeftModel.from_pretrained` loads it), the tokenizer and `recipe.yaml` (so merge/chat can use a
checkpoint as they use a finished run), `optimizer.pt` (optimizer, scheduler, grad scaler),
`rng_state.pt` (python, numpy, torch, CUDA), `trainer_state.json` (the data position) and the
`complete` marker. It is written into a hidden temp dir, flushed to disk, then renamed into place,
so a crash leaves either the old set of checkpoints or the new one, never a half-written
`checkpoint-STEP`; only dirs with the marker are resumable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from peftchat.errors import UserError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
COMPLETE_MARKER = "complete"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"


@dataclass
class TrainState:
    """Where training stands after `step` optimizer steps: the next micro-batch to read is
    `batch_index` of `epoch`'s batch plan."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    tokens: int = 0  # input tokens (padding excluded) trained on so far
    label_tokens: int = 0  # loss-bearing tokens so far
    train_time_s: float = 0.0  # time spent in training steps, over all sessions


# ------------------------------------------------------------------------------------ RNG


def capture_rng() -> dict:
    """Every RNG state a training step can draw from (dropout, shuffles), in a form that
    `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ------------------------------------------------------------------------------------ files


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


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first (temp and unmarked dirs skipped)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


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


def save_checkpoint(output_dir: str | os.PathLike, state: TrainState, model, optimizer, scheduler, *,
                    tokenizer=None, recipe=None, grad_scaler=None, rng: dict | None = None,
                    keep: int = 0) -> Path:
    """Write `output_dir/checkpoint-{state.step}` atomically, then keep the newest `keep`.

    `rng` is the RNG state to record (default: now); an existing checkpoint of the same step is
    replaced.
    """
    from peftchat.config import save_recipe

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f"{TMP_PREFIX}{state.step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if recipe is not None:
            save_recipe(recipe, tmp / "recipe.yaml")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
            },
            tmp / OPTIMIZER_FILE,
        )
        torch.save(rng if rng is not None else capture_rng(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{state.step}\n", encoding="utf-8")
        _fsync(tmp / COMPLETE_MARKER)
        _fsync(tmp)
        if final.exists():  # os.replace cannot overwrite a non-empty dir: move the old one aside
            old = root / f"{TMP_PREFIX}old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rotate_checkpoints(root, keep)
    return final


def read_state(path: str | os.PathLike) -> TrainState:
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8")))


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, *, grad_scaler=None,
                    restore_rng_state: bool = True) -> TrainState:
    """Load adapter weights, optimizer, scheduler (and grad scaler) from checkpoint `path` into the
    live objects, restore the RNG states last, and return the data position.

    Call it at the very end of setup: anything drawing random numbers afterwards (a LoRA init,
    say) would move the restored RNG.
    """
    from peft import load_peft_weights, set_peft_model_state_dict

    path = Path(path)
    if not is_complete(path):
        raise UserError(f"checkpoint {path} is incomplete or not a checkpoint (no '{COMPLETE_MARKER}' marker)")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    try:
        result = set_peft_model_state_dict(model, load_peft_weights(str(path), device=str(device)))
    except RuntimeError as e:  # shape mismatch: the recipe's adapter settings changed since
        raise UserError(f"checkpoint {path} does not fit this adapter: {str(e).splitlines()[0]}") from None
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint {path} does not fit this adapter: unexpected {result.unexpected_keys[:3]}")
    blobs = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blobs["optimizer"])
    scheduler.load_state_dict(blobs["scheduler"])
    if grad_scaler is not None and blobs.get("grad_scaler"):
        grad_scaler.load_state_dict(blobs["grad_scaler"])
    state = read_state(path)
    if restore_rng_state:
        restore_rng(torch.load(path / RNG_FILE, weights_only=True))
    return state

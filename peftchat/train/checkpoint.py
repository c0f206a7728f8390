"""Training checkpoints: what one holds, saved and loaded (names and layout: `peftchat.rundir`).

A checkpoint is `output_dir/checkpoint-STEP/` holding the adapter (peft `save_pretrained`, so
`PeftModel.from_pretrained` loads it), the tokenizer and `recipe.yaml` (so merge/chat can use a
checkpoint as they use a finished run), `optimizer.pt` (optimizer and grad scaler; the lr
schedule is rebuilt from the recipe and the step), `rng_state.pt` (python, numpy, torch, CUDA),
`trainer_state.json` (the data position), `checksums.json` (`rundir.write_checksums`) and the
`complete` marker, written last.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftchat.config import Recipe, recipe_to_yaml, with_absolute_paths
from peftchat.errors import UserError
from peftchat.rundir import (
    COMPLETE_MARKER,
    OPTIMIZER_FILE,
    RECIPE_FILE,
    RNG_FILE,
    STATE_FILE,
    is_complete,
    rotate_checkpoints,
    write_checkpoint_dir,
)


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
    total_steps: int = 0  # the run's planned length when this state was saved
    nan_skipped: int = 0  # optimizer steps dropped for a NaN/inf loss (training.on_nan=skip)
    world_size: int = 1  # processes that trained the last stretch (torchrun; peftchat.train.distributed)
    # recipe changes accepted at resumes: [{"step": S, "changes": {"key": [old, new]}}, ...]
    changes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------ RNG


def capture_rng() -> dict:
    """Every RNG state a training step can draw from (dropout, shuffles), in a form that
    `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form, get_state's default
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
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


def save_recipe_with_history(recipe: Recipe, history: list, path: str | os.PathLike) -> None:
    """`recipe.yaml`, headed by one comment line per accepted resume change (YAML comments, so
    the file still loads as a recipe)."""
    lines = []
    for entry in history:
        changed = ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in entry["changes"].items())
        lines.append(f"# resumed at step {entry['step']} with changes: {changed}\n")
    Path(path).write_text("".join(lines) + recipe_to_yaml(with_absolute_paths(recipe)), encoding="utf-8")


def save_checkpoint(
    output_dir: str | os.PathLike,
    state: TrainState,
    model,
    optimizer,
    *,
    tokenizer=None,
    recipe=None,
    grad_scaler=None,
    rng: dict | None = None,
    keep: int = 0,
    adapter_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write `output_dir/checkpoint-{state.step}` atomically, then keep the newest `keep`.

    `rng` is the RNG state to record (default: now); an existing checkpoint of the same step is
    replaced. `adapter_state` / `optimizer_state`: the trainable weights and the optimizer state
    when the live objects do not hold them whole (FSDP2 gathers them; default: read them live).
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp), **({"state_dict": adapter_state} if adapter_state is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if recipe is not None:
            save_recipe_with_history(recipe, state.changes, tmp / RECIPE_FILE)
        torch.save(
            {
                "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
            },
            tmp / OPTIMIZER_FILE,
        )
        torch.save(rng if rng is not None else capture_rng(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")

    final = write_checkpoint_dir(output_dir, state.step, fill)
    rotate_checkpoints(output_dir, keep)
    return final


def read_state(path: str | os.PathLike) -> TrainState:
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8")))


def load_adapter_weights(path: str | os.PathLike, model) -> None:
    """The checkpoint's adapter weights into the (not yet sharded) LoRA model."""
    from peft import load_peft_weights, set_peft_model_state_dict

    path = Path(path)
    if not is_complete(path):
        raise UserError(f"checkpoint {path} is incomplete or not a checkpoint (no '{COMPLETE_MARKER}' marker)")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    try:
        # Any: peft annotates torch's _IncompatibleKeys result as a bare `namedtuple`
        result: Any = set_peft_model_state_dict(model, load_peft_weights(str(path), device=str(device)))
    except RuntimeError as e:  # shape mismatch: the recipe's adapter settings changed since
        raise UserError(f"checkpoint {path} does not fit this adapter: {str(e).splitlines()[0]}") from None
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint {path} does not fit this adapter: unexpected {result.unexpected_keys[:3]}")


def check_init_adapter(path: str | os.PathLike) -> Path:
    """`adapter.init_from` checked before anything loads: an adapter dir whose files are intact
    (as `merge` and `chat` check them)."""
    from peftchat.rundir import check_usable_adapter_dir, is_adapter_dir

    path = Path(path).expanduser()
    if not is_adapter_dir(path):
        raise UserError(f"adapter.init_from: {path} is not an adapter dir (a finished run dir or checkpoint)")
    check_usable_adapter_dir(path)
    return path


def load_init_adapter(path: str | os.PathLike, model) -> None:
    """`adapter.init_from`: a finished run's (or a checkpoint's) adapter weights as the starting
    point (SFT then DPO)."""
    from peft import load_peft_weights, set_peft_model_state_dict

    path = check_init_adapter(path)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    try:
        # Any: peft annotates torch's _IncompatibleKeys result as a bare `namedtuple`
        result: Any = set_peft_model_state_dict(model, load_peft_weights(str(path), device=str(device)))
    except RuntimeError as e:  # another r, target or modules_to_save shape
        raise UserError(
            f"adapter.init_from: {path} does not fit this recipe's adapter: {str(e).splitlines()[0]}"
        ) from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or "modules_to_save" in k]
    if getattr(result, "unexpected_keys", None) or missing:
        what = result.unexpected_keys[:2] if result.unexpected_keys else missing[:2]
        raise UserError(
            f"adapter.init_from: {path} does not fit this recipe's adapter (adapter.* must match "
            f"the run it comes from): {what}"
        )
    print(f"adapter initialized from {path}", flush=True)


def load_training_state(
    path: str | os.PathLike,
    optimizer,
    *,
    grad_scaler=None,
    restore_rng_state: bool = True,
    load_optimizer=None,
    rank: int = 0,
) -> TrainState:
    """Optimizer (and grad scaler) from checkpoint `path`, the RNG states last (rank `rank`'s
    when the checkpoint holds one per rank, else rank 0's); returns the data position.
    `load_optimizer(saved)`: how to put the saved optimizer state in (default: load_state_dict)."""
    path = Path(path)
    blobs = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    (load_optimizer or optimizer.load_state_dict)(blobs["optimizer"])
    if grad_scaler is not None and blobs.get("grad_scaler"):
        grad_scaler.load_state_dict(blobs["grad_scaler"])
    state = read_state(path)
    if restore_rng_state:
        rng = torch.load(path / RNG_FILE, weights_only=True)
        ranks = rng.get("ranks") or [rng]
        restore_rng(ranks[rank] if rank < len(ranks) else ranks[0])
    return state


def load_checkpoint(
    path: str | os.PathLike, model, optimizer, *, grad_scaler=None, restore_rng_state: bool = True
) -> TrainState:
    """Load adapter weights, optimizer (and grad scaler) from checkpoint `path` into the live
    objects, restore the RNG states last, and return the data position.

    Call it at the very end of setup (before only the lr schedule, which draws no random
    numbers): anything drawing random numbers afterwards (a LoRA init, say) would move the
    restored RNG.
    """
    load_adapter_weights(path, model)
    return load_training_state(path, optimizer, grad_scaler=grad_scaler, restore_rng_state=restore_rng_state)

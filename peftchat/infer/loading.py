"""Load a model to talk to from what training or merging left behind.

A source is one of:

* a recipe file: its base model, plus the trained adapter in `training.output_dir` when there is
  one (the final adapter, else the newest complete checkpoint), else the bare base;
* an adapter dir (a training output dir or one of its `checkpoint-STEP` dirs): the base named by
  its `recipe.yaml`, plus the adapter;
* a merged model dir (written by `peftchat merge`): its `recipe.yaml` says the conversation
  format; without one the tokenizer's own chat template is used.

Every kind resolves to a Recipe whose `model.*` says how to load the base, so the model is always
loaded by `peftchat.model.load.load_base_model`, exactly as training loads it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from omegaconf import OmegaConf

from peftchat.config import Recipe, load_recipe, recipe_from_dict
from peftchat.errors import UserError
from peftchat.formats.registry import make_format

ADAPTER_CONFIG = "adapter_config.json"
RECIPE_FILE = "recipe.yaml"


def say(message: str) -> None:
    """Progress and notes go to stderr, so stdout carries only replies and results."""
    print(message, file=sys.stderr, flush=True)


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{adapter_dir} is not an adapter dir (no {ADAPTER_CONFIG})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _apply_overrides(data: dict, overrides: Iterable[str], source: str) -> Recipe:
    """A recipe from a dict plus `key=value` overrides (for sources that have no recipe file)."""
    items = list(overrides)
    if items:
        bad = [o for o in items if "=" not in o or o.startswith("=")]
        if bad:
            raise UserError(f"override '{bad[0]}' is not of the form key=value")
        data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(items)))
    try:
        return recipe_from_dict(data)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def recipe_for_adapter(adapter_dir: str | os.PathLike, overrides: Iterable[str] = (), base: Optional[str] = None) -> Recipe:
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
        say(f"note: {adapter_dir} has no {RECIPE_FILE}; base {fallback}, conversation format = the tokenizer's chat template")
        recipe = _apply_overrides(
            {"model": {"path": str(fallback)}, "data": {"train": ""}},
            overrides,
            str(adapter_dir / ADAPTER_CONFIG),
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
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(stored, "fp32")
        recipe = _apply_overrides(
            {"model": {"path": str(model_dir), "dtype": dtype}, "data": {"train": ""}},
            overrides,
            str(model_dir),
        )
    # The dir itself is the model, wherever it was moved to since it was written.
    recipe.model.path = str(model_dir)
    recipe.model.tokenizer = None
    return recipe


@dataclass
class ChatSource:
    """What to load: the recipe (base model and conversation format), the adapter dir to put on
    the base (None = none) and the dir holding the tokenizer to use (None = the recipe's)."""

    kind: str  # "recipe" | "adapter" | "model"
    recipe: Recipe
    adapter_dir: Optional[Path]
    tokenizer_dir: Optional[Path]


def _trained_adapter(recipe: Recipe) -> Optional[Path]:
    """The final adapter in `training.output_dir`, else its newest complete checkpoint, else None."""
    from peftchat.train.checkpoint import find_latest_checkpoint

    out = Path(recipe.training.output_dir).expanduser()
    if is_adapter_dir(out):
        return out
    latest = find_latest_checkpoint(out)
    if latest is not None and is_adapter_dir(latest):
        say(f"note: no final adapter in {out}; using the newest checkpoint {latest.name}")
        return latest
    return None


def adapter_source(adapter_dir: Path, overrides: Iterable[str] = (), base: Optional[str] = None) -> ChatSource:
    """An adapter dir as a source: its recipe, and the tokenizer saved with it (in the dir, or in
    the output dir holding a `checkpoint-STEP`)."""
    recipe = recipe_for_adapter(adapter_dir, overrides, base=base)
    tok_dir = next((d for d in (adapter_dir, adapter_dir.parent) if has_tokenizer(d)), None)
    return ChatSource("adapter", recipe, adapter_dir, tok_dir)


def resolve_source(source: str | os.PathLike, overrides: Iterable[str] = ()) -> ChatSource:
    """Tell a recipe file, an adapter dir and a merged model dir apart, and read its recipe."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"not found: {source} (expected a recipe file, an adapter dir or a model dir)")
    if path.is_file():
        recipe = load_recipe(path, overrides)
        adapter = _trained_adapter(recipe)
        if adapter is None:
            say(f"note: no trained adapter in {recipe.training.output_dir}; talking to the base model {recipe.model.path}")
        return ChatSource("recipe", recipe, adapter, adapter if adapter is not None and has_tokenizer(adapter) else None)
    if is_adapter_dir(path):
        return adapter_source(path, overrides)
    if is_model_dir(path):
        return ChatSource("model", _merged_dir_recipe(path, overrides), None, path if has_tokenizer(path) else None)
    raise UserError(f"{source} is neither an adapter dir ({ADAPTER_CONFIG}) nor a model dir (config.json)")


def load_tokenizer_for(chat_source: ChatSource):
    """The tokenizer saved beside the adapter/model when there is one (training may have added
    tokens), else the recipe's."""
    from peftchat.model.tokenizer import load_tokenizer

    src = str(chat_source.tokenizer_dir) if chat_source.tokenizer_dir is not None else None
    return load_tokenizer(chat_source.recipe, source=src)


def load_chat_model(source: str | os.PathLike, overrides: Iterable[str] = (), device=None):
    """Load (model, tokenizer, recipe) for chat or generation from a recipe, adapter or model dir.

    The model is in eval mode on `device` (default: the recipe's `training.device`); an adapter
    stays unmerged on its base, so a k-bit base computes exactly as in training.
    """
    from peftchat.model.load import load_base_model

    chat_source = resolve_source(source, overrides)
    recipe = chat_source.recipe
    tokenizer = load_tokenizer_for(chat_source)
    try:  # a format the tokenizer cannot serve fails before the model loads
        make_format(recipe.data, tokenizer)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    what = f"{recipe.model.path}" + (f" ({recipe.model.quantization})" if recipe.model.quantization != "none" else "")
    say(f"loading model {what} ...")
    model = load_base_model(recipe, device=device, for_training=False)
    if chat_source.adapter_dir is not None:
        say(f"loading adapter {chat_source.adapter_dir} ...")
        model = load_adapter(model, chat_source.adapter_dir)
    return model, tokenizer, recipe


def load_adapter(base_model, adapter_dir: str | os.PathLike):
    """`PeftModel.from_pretrained(base_model, adapter_dir)` in eval mode (adapter left unmerged)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        # peft probes the deprecated `is_gradient_checkpointing` of transformers 5.2x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            model = PeftModel.from_pretrained(base_model, str(adapter_dir))
        except Exception:
            from peftchat.model.load import damaged_safetensors

            damaged = damaged_safetensors(Path(adapter_dir))
            if damaged is None:
                raise
            raise UserError(f"{damaged}; use another checkpoint of the run or train again") from None
    model.eval()
    return model

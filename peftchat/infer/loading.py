"""Load a model to talk to from what training or merging left behind.

Which dir is what (a recipe, a finished run or adapter dir, a checkpoint, a merged model dir) is
`peftchat.rundir.resolve_source`'s business; this module loads the result. Every kind resolves
to a Recipe whose `model.*` says how to load the base, so the model is always loaded by
`peftchat.model.load.load_base_model`, exactly as training loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from peftchat.errors import UserError
from peftchat.formats.registry import make_format
from peftchat.quiet import quiet_peft
from peftchat.rundir import (  # noqa: F401  (re-exported: infer's callers import them from here)
    ChatSource,
    adapter_source,
    read_adapter_config,
    recipe_for_adapter,
    resolve_source,
)
from peftchat.rundir import note as say


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
    from peft import PeftModel

    with quiet_peft():
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

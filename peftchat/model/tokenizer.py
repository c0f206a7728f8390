"""Tokenizer loading, shared by data preparation, training, merge and chat."""

from __future__ import annotations

from pathlib import Path

from peftchat.config import Recipe, tokenizer_source
from peftchat.errors import UserError
from peftchat.paths import looks_local


def load_tokenizer(recipe: Recipe, source: str | None = None):
    """Load the recipe's tokenizer (`model.tokenizer`, else `model.path`) with a pad token set."""
    from transformers import AutoTokenizer

    src = source or tokenizer_source(recipe)
    if looks_local(src) and not Path(src).expanduser().exists():
        raise UserError(f"tokenizer not found: {src} (model.tokenizer / model.path)")
    try:
        tok = AutoTokenizer.from_pretrained(
            str(Path(src).expanduser()) if looks_local(src) else src,
            trust_remote_code=recipe.model.trust_remote_code,
            revision=recipe.model.revision,
        )
    except OSError as e:
        raise UserError(f"cannot load tokenizer from '{src}': {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        # Labels mask padding by position (-100), never by id, so pad == eos is safe for training.
        tok.pad_token = tok.eos_token
    return tok

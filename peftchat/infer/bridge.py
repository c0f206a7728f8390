"""The one spot where serve, eval and export reach into code that is being moved.

Prompt building (`data.prompting`, becoming one class per conversation format), source resolution
(`infer.loading`, moving into a run-dir module) and merging (`model.merge`, moving out of model/)
are called from here only, so following those moves is a few-line switch in this file.

History shape used by callers: a list of `{"user": str, "assistant": str}` rounds (MOSS rounds may
carry `"raw"` field values, as `data.prompting` documents).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Optional

from peftchat.config import Recipe
from peftchat.data.formats import MOSS_FIELDS, Conversation

Round = dict[str, Any]


def _prompting():
    from peftchat.data import prompting

    return prompting


def prompt_ids(recipe: Recipe, tokenizer, history: list[Round], query: str, system: Optional[str] = None) -> list[int]:
    """Training-format prompt for `query` after `history`; UserError when it exceeds the budget
    even after leaving out the oldest rounds."""
    return _prompting().chat_prompt_ids(recipe, tokenizer, history, query, system=system)


def history_used(recipe: Recipe) -> bool:
    """False when the format leaves the history out of every prompt (chatglm, history_column null)."""
    return not (recipe.data.collator == "chatglm" and recipe.data.history_column is None)


def eval_prompt_ids(recipe: Recipe, tokenizer, history: list[Round], query: str, system: Optional[str] = None) -> list[int]:
    """The prompt ChatGLM's ptuning evaluates with: for the chatglm format a round with no history
    is the bare query (`preprocess_function_eval`), otherwise the training prompt."""
    if recipe.data.collator == "chatglm" and not history:
        recipe = copy.deepcopy(recipe)
        recipe.data.history_column = None
    return prompt_ids(recipe, tokenizer, history, query, system)


def stop_ids(recipe: Recipe, tokenizer) -> list[int]:
    return _prompting().stop_token_ids(recipe, tokenizer)


def reply_text(recipe: Recipe, tokenizer, generated_ids: list[int], partial: bool = False) -> str:
    """The reply in the generated ids (up to the first stop token). `partial`: the reply so far
    while streaming — a MOSS model's reply starts only at its `<|MOSS|>:` field."""
    if partial and recipe.data.collator == "moss" and \
            MOSS_FIELDS["MOSS"] not in tokenizer.decode(generated_ids, skip_special_tokens=False):
        return ""
    return _prompting().extract_reply(recipe, tokenizer, generated_ids)


def generation_config(recipe: Recipe, tokenizer):
    from peftchat.infer.decoding import generation_config as build

    return build(recipe, tokenizer, stop_ids(recipe, tokenizer))


def eval_rounds(conv: Conversation) -> list[tuple[list[Round], str, str, Optional[str]]]:
    """(history, query, reference answer, system) for every answer of `conv` that training puts
    loss on: context-only rounds (chatglm history) are history, never references. The history is
    the reference history (teacher forcing), MOSS rounds with their raw fields as training renders
    them."""
    rounds = conv.rounds()
    out = []
    history: list[Round] = []
    for k, (query, answer) in enumerate(rounds):
        if k >= conv.context_rounds:
            out.append((list(history), query, answer, conv.system))
        round_: Round = {"user": query, "assistant": answer}
        if conv.moss_turns is not None and k < len(conv.moss_turns):
            round_["raw"] = dict(conv.moss_turns[k])
        history.append(round_)
    return out


def load_model(source: str | os.PathLike, overrides: Iterable[str] = ()):
    """(model, tokenizer, recipe) from a recipe, adapter dir or merged dir, as `chat` loads it."""
    from peftchat.infer.loading import load_chat_model

    return load_chat_model(source, overrides)


def resolve_source(source: str | os.PathLike, overrides: Iterable[str] = ()):
    """(kind "recipe" | "adapter" | "model", recipe, adapter dir or None)."""
    from peftchat.infer.loading import resolve_source as resolve

    s = resolve(source, overrides)
    return s.kind, s.recipe, s.adapter_dir


def merge_to_dir(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32") -> None:
    from peftchat.model.merge import merge_adapter

    merge_adapter(adapter_dir, out_dir, dtype=dtype, force=True)  # verified as `peftchat merge` verifies


def say(message: str) -> None:
    from peftchat.infer.loading import say as say_

    say_(message)


def generate_batch(model, tokenizer, recipe: Recipe, prompts: list[list[int]], batch_size: int = 8) -> list[str]:
    """Replies to prompt ids in left-padded batches, as `peftchat generate` makes them."""
    from peftchat.infer.generate import generate_replies

    return generate_replies(model, tokenizer, recipe, prompts, batch_size=batch_size)

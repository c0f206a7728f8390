"""How to decode: the recipe's `decoding.*` as a transformers GenerationConfig; prompts that fit the context budget."""

from __future__ import annotations

from typing import Optional

from peftchat.config import Recipe
from peftchat.data.prompting import chat_prompt_ids


def generation_config(recipe: Recipe, tokenizer, stop_ids: list[int]):
    """GenerationConfig from `decoding.*`: temperature 0 is greedy; top_k 0, top_p 1 and
    repetition_penalty 1 switch those filters off. Generation stops at any of `stop_ids`.

    Built whole rather than layered on the model's own generation config, so a saved config's
    sampling defaults never leak into greedy decoding (and transformers does not warn about them).
    """
    from transformers import GenerationConfig

    d = recipe.decoding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    kwargs = dict(
        max_new_tokens=d.max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
    )
    if d.temperature > 0:
        kwargs.update(do_sample=True, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if d.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = d.repetition_penalty
    return GenerationConfig(**kwargs)


def fit_prompt(recipe: Recipe, tokenizer, history: list[dict], query: str, system: Optional[str] = None) -> tuple[list[int], int]:
    """Prompt ids for `query` after `history`, built by the training prompt code, and the number of
    oldest rounds left out to fit the context budget; those are deleted from `history` too, so
    later turns do not bring them back.

    `chat_prompt_ids` leaves the rounds out itself but does not say how many: that is the largest
    `s` for which `history[s:]` renders the same prompt (a round always renders to some tokens,
    so keeping one more round than fits changes nothing, keeping one fewer changes the prompt).
    """
    ids = chat_prompt_ids(recipe, tokenizer, history, query, system=system)
    history_used = not (recipe.data.collator == "chatglm" and recipe.data.history_column is None)
    dropped = 0
    while history_used and dropped < len(history) and \
            chat_prompt_ids(recipe, tokenizer, history[dropped + 1:], query, system=system) == ids:
        dropped += 1
    del history[:dropped]
    return ids, dropped

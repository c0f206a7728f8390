"""How to decode: the recipe's `decoding.*` as a transformers GenerationConfig, and the prompt's token budget."""

from __future__ import annotations

from peftchat.config import Recipe


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


def context_budget(recipe: Recipe) -> int:
    """Prompt tokens a chat turn may use: `decoding.max_context` (default `data.max_length`) less
    room for `decoding.max_new_tokens` (the chatglm format keeps to its own S instead)."""
    return (recipe.decoding.max_context or recipe.data.max_length) - recipe.decoding.max_new_tokens


def logits_processors(fmt):
    """The format's forced continuations (`ConversationFormat.forced_continuations`) as a
    transformers LogitsProcessorList for `generate`, or None when it has none."""
    rules = fmt.forced_continuations()
    if not rules:
        return None
    from transformers import LogitsProcessorList

    return LogitsProcessorList([ForcedContinuation(rules)])


class ForcedContinuation:
    """A logits processor: right after a trigger (and the first k forced tokens) only the next
    forced token may come. Written by hand because transformers' own constraints (force_words_ids)
    need beam search and do not fix the position of the words."""

    def __init__(self, rules: list[tuple[list[int], list[int]]]) -> None:
        # every (pattern the generated ids may end with, the token that must follow), longest first
        self.patterns = sorted(
            ((trigger + forced[:k], forced[k]) for trigger, forced in rules for k in range(len(forced))),
            key=lambda p: -len(p[0]),
        )
        self.longest = max(len(p) for p, _ in self.patterns)

    def __call__(self, input_ids, scores):
        tails = input_ids[:, -self.longest :].tolist()
        for row, tail in enumerate(tails):
            for pattern, token in self.patterns:
                if tail[-len(pattern) :] == pattern:
                    forced = scores[row, token].clone()
                    scores[row, :] = float("-inf")
                    scores[row, token] = forced if forced.isfinite() else 0.0
                    break
        return scores

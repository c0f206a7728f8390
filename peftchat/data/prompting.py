"""Inference prompts built by the training collators' own code, so chat sees what training showed.

History shape (a list of finished rounds, oldest first)::

    {"user": str, "assistant": str,
     "raw": {"Inner Thoughts": str, "Commands": str, "Tool Responses": str}}   # "raw": moss only, optional

``raw`` holds verbatim MOSS field values with their markup (``"<|Inner Thoughts|>: None<eot>\\n"``);
it may also hold ``"Human"`` / ``"MOSS"`` to override the rendered ones. `history_round` builds
such a dict from what the model generated.

`chat_prompt_ids(recipe, tok, history, query)` equals, token for token, what the training collator
puts in front of the answer of the next round:

* chatglm: ``[Round k]`` prompt of history + query (with `source_prefix`), then the separator
  tokens — the model generates the answer and eos.
* moss: meta instruction + each past turn (Human, raw fields, MOSS; each field encoded alone) +
  ``<|Human|>: {query}<eoh>\\n``. Unlike moss_cli_demo (which appends ``<eoh>`` without the newline)
  the newline is kept, as in training. The model then writes the rest of the turn as it was trained:
  for MOSS records with all five fields ``<|Inner Thoughts|>: …<eot>\\n<|Commands|>: …<eoc>\\n
  <|Results|>: …<eor>\\n<|MOSS|>: …<eom>``; for sessions rendered from other formats just
  ``<|MOSS|>: …<eom>``. It stops at ``<eom>``; `extract_reply` keeps the text of the MOSS field.
* chat_template: ``apply_chat_template(system + history + query, add_generation_prompt=True)``.

The system message / meta instruction is `data.meta_instruction` (or the `system` argument). When
the history is longer than the context budget — ``decoding.max_context`` (default
``data.max_length``) minus ``decoding.max_new_tokens`` for moss and chat_template, ``S - 1`` prompt
tokens for chatglm — the oldest rounds are left out, so the query always survives (for chatglm
that is the training `drop_oldest` rule, whatever `data.truncation` says: cutting the prompt's tail
at inference would cut the question).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peftchat.config import Recipe
from peftchat.data.formats import MOSS_FIELDS, Conversation, _strip_markup
from peftchat.data.samples import encode_text, make_collator, token_id
from peftchat.errors import UserError

Round = dict[str, Any]
MOSS_STOP = "<eom>"


def _system(recipe: Recipe, system: str | None) -> str | None:
    return system if system is not None else recipe.data.meta_instruction


def _moss_turn(round_: Round) -> list[tuple[str, str]]:
    from peftchat.data.moss import human_field, moss_field

    raw = round_.get("raw") or {}
    unknown = set(raw) - set(MOSS_FIELDS)
    if unknown:
        raise ValueError(f"unknown MOSS field(s) in history: {sorted(unknown)}")
    rendered = {"Human": human_field(round_["user"]), "MOSS": moss_field(round_["assistant"])}
    return [(name, raw.get(name, rendered.get(name))) for name in MOSS_FIELDS if name in raw or name in rendered]


def chat_prompt_ids(recipe: Recipe, tokenizer, history: list[Round], query: str, *, system: str | None = None) -> list[int]:
    """Prompt ids for `query` after the finished rounds `history` (shape in the module docstring)."""
    cfg = recipe.data
    budget = (recipe.decoding.max_context or cfg.max_length) - recipe.decoding.max_new_tokens
    if cfg.collator == "chatglm":
        from peftchat.data.chatglm import ChatGLMCollator

        collator = ChatGLMCollator(dataclasses.replace(cfg, truncation="drop_oldest"), tokenizer)
        return collator.prompt_ids([(r["user"], r["assistant"]) for r in history], query)[0]
    collator = make_collator(cfg, tokenizer)
    for start in range(len(history) + 1):
        rounds = history[start:]
        if cfg.collator == "moss":
            ids = collator.prompt_ids(_system(recipe, system) or "", [_moss_turn(r) for r in rounds], query)
        else:
            messages: list[dict[str, Any]] = []
            meta = _system(recipe, system)
            if meta:
                messages.append({"role": "system", "content": meta})
            for r in rounds:
                messages += [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["assistant"]}]
            ids = collator.prompt_ids(messages + [{"role": "user", "content": query}])
        if len(ids) <= budget:
            return ids
    raise UserError(
        f"the message needs {len(ids)} prompt tokens, more than the context budget of {budget} "
        "(decoding.max_context or data.max_length, minus decoding.max_new_tokens)"
    )


def stop_token_ids(recipe: Recipe, tokenizer) -> list[int]:
    """Token ids that end a reply: chatglm eos; moss `<eom>` (and eos); chat_template the
    template's end-of-turn token(s) (e.g. `<|im_end|>`) and eos."""
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    collator = recipe.data.collator
    if collator == "chatglm":
        ids = eos
    elif collator == "moss":
        ids = [token_id(tokenizer, MOSS_STOP, "moss stop token")] + eos
    else:
        from peftchat.data.chat_template import end_of_turn_ids

        ids = end_of_turn_ids(tokenizer) + eos
    return list(dict.fromkeys(ids))


def _cut_at_stop(recipe: Recipe, tokenizer, generated_ids: list[int]) -> list[int]:
    stops = set(stop_token_ids(recipe, tokenizer))
    ids = [int(t) for t in generated_ids]
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k]
    return ids


def _moss_fields(text: str) -> dict[str, str]:
    """Split generated MOSS text into its fields: {field name: raw value with markup}."""
    markers = sorted(((text.find(m), name, m) for name, m in MOSS_FIELDS.items() if m in text), key=lambda x: x[0])
    out: dict[str, str] = {}
    for k, (pos, name, _marker) in enumerate(markers):
        end = markers[k + 1][0] if k + 1 < len(markers) else len(text)
        out[name] = text[pos:end]
    return out


def extract_reply(recipe: Recipe, tokenizer, generated_ids: list[int]) -> str:
    """The reply text in the ids the model generated after the prompt (up to the first stop)."""
    ids = _cut_at_stop(recipe, tokenizer, generated_ids)
    if recipe.data.collator == "moss":
        text = tokenizer.decode(ids, skip_special_tokens=False)
        fields = _moss_fields(text)
        if "MOSS" in fields:
            reply = _strip_markup(fields["MOSS"], MOSS_FIELDS["MOSS"], MOSS_STOP)
            return tokenizer.decode(encode_text(tokenizer, reply), skip_special_tokens=True).strip()
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def history_round(recipe: Recipe, tokenizer, query: str, generated_ids: list[int]) -> Round:
    """The finished round to append to the history after the model answered `query`."""
    reply = extract_reply(recipe, tokenizer, generated_ids)
    round_: Round = {"user": query, "assistant": reply}
    if recipe.data.collator == "moss":
        text = tokenizer.decode(_cut_at_stop(recipe, tokenizer, generated_ids), skip_special_tokens=False)
        raw = {k: v if v.endswith("\n") else v + "\n" for k, v in _moss_fields(text).items()
               if k in ("Inner Thoughts", "Commands", "Tool Responses")}
        if raw:
            round_["raw"] = raw
    return round_


def conversation_from_history(history: list[Round], query: str, answer: str, system: str | None = None) -> Conversation:
    """A Conversation of the history plus one more round (tests and tools compare it with training)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for r in [*history, {"user": query, "assistant": answer}]:
        messages += [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["assistant"]}]
    return Conversation(messages=messages, origin="chat")

"""The `chat_template` collator: the tokenizer's own `apply_chat_template` (spec §3).

The whole conversation is rendered once; loss goes on the tokens of assistant messages only —
their content and the end-of-turn token that closes each one (``<|im_end|>`` for ChatML), so the
model learns to stop. Whitespace the template writes *after* the end-of-turn token (ChatML's
``\\n``) gets no loss: generation stops at the end-of-turn token and never produces it, and the
shipped template's ``{% generation %}`` markers draw the line at the same place. System, user and
tool messages get no loss. ``data.loss_on: last_assistant`` trains the last assistant message only;
the history rounds of a chatglm row are never trained.

Assistant spans are found by rendering prefixes, not by searching strings: for assistant message
i, ``P = render(messages[:i], add_generation_prompt=True)`` and ``Q = render(messages[:i + 1])``;
the span starts where P and Q part (after the assistant header) and ends at the last end-of-turn
token of Q's tail. When a template re-renders earlier turns differently once later ones follow
(so the full rendering does not start with Q), the span instead runs from where P and the full
rendering part to the first end-of-turn token after it.

BOS: the rendered text is encoded with no special tokens added, as transformers'
`apply_chat_template` does: a template that writes a BOS gets exactly one, and none is added to one
that does not. Labels are set by position, never by comparing ids, so pad == eos is harmless.

Truncation (`data.max_length`): ``seed`` cuts the tail; ``drop_oldest`` drops whole oldest rounds
(a round starts at a user message), always keeping the system message and the last round, then
cuts the tail if still too long. A sample left with no loss tokens is dropped and counted.
"""

from __future__ import annotations

from typing import Any

from peftchat.config import DataConfig
from peftchat.data.formats import Conversation
from peftchat.data.samples import IGNORE_INDEX, Encoded, Sample, encode_text
from peftchat.errors import ConfigError, DataError

Span = tuple[int, int]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def render_ids(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the chat template's rendering of `messages` (no special tokens added)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return encode_text(tokenizer, text)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special tokens the template writes after an assistant message's content
    (e.g. ``<|im_end|>``), found by rendering a probe conversation."""
    user = [{"role": "user", "content": "ping"}]
    try:
        prompt = render_ids(tokenizer, user, add_generation_prompt=True)
        full = render_ids(tokenizer, user + [{"role": "assistant", "content": "pong"}])
    except Exception:  # a template that rejects the probe: no end-of-turn known
        return []
    special = set(tokenizer.all_special_ids)
    found: list[int] = []
    for t in full[common_prefix_length(prompt, full) :]:
        if t in special and t not in found:
            found.append(t)
    return found


class ChatTemplateCollator:
    def __init__(self, cfg: DataConfig, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.collator is 'chat_template' but the tokenizer has no chat template "
                "(use data.collator=chatglm or moss, or a tokenizer that has one)"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.eot = set(end_of_turn_ids(tokenizer))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, origin: str = "") -> list[int]:
        try:
            return render_ids(self.tokenizer, messages, add_generation_prompt)
        except Exception as e:  # jinja raises for conversations the template refuses
            where = f"{origin}: " if origin else ""
            raise DataError(f"{where}the chat template rejects this conversation: {e}") from None

    def assistant_span(self, messages: list[dict[str, Any]], i: int, full: list[int], origin: str) -> Span:
        prompt = self.render(messages[:i], add_generation_prompt=True, origin=origin)
        upto = self.render(messages[: i + 1], origin=origin)
        if full[: len(upto)] == upto:
            start, end = common_prefix_length(prompt, upto), len(upto)
            closing = [k for k in range(start, end) if upto[k] in self.eot]
            return (start, closing[-1] + 1 if closing else end)
        start = common_prefix_length(prompt, full)
        closing = [k for k in range(start, len(full)) if full[k] in self.eot]
        if not closing:
            raise DataError(
                f"{origin}: cannot locate assistant message {i} in the chat template's rendering "
                "(the template re-renders earlier turns and has no end-of-turn special token)"
            )
        return (start, closing[0] + 1)

    def trained_indices(self, messages: list[dict[str, Any]], context_rounds: int) -> list[int]:
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = assistants[context_rounds:]
        if self.cfg.loss_on == "last_assistant":
            trained = trained[-1:]
        return trained

    def encode_messages(self, messages: list[dict[str, Any]], trained: list[int], origin: str = "") -> Sample:
        """The whole rendering of `messages`, loss on the assistant messages listed in `trained`."""
        ids = self.render(messages, origin=origin)
        labels = [IGNORE_INDEX] * len(ids)
        for i in trained:
            lo, hi = self.assistant_span(messages, i, ids, origin)
            labels[lo:hi] = ids[lo:hi]
        return Sample(ids, labels)

    def encode(self, conv: Conversation) -> Encoded:
        if conv.dropped:
            return Encoded(dropped=[conv.dropped])
        messages = conv.messages
        trained = set(self.trained_indices(messages, conv.context_rounds))
        limit = self.cfg.max_length
        sample = self.encode_messages(messages, sorted(trained), conv.origin)
        dropped_rounds = False
        if len(sample.input_ids) > limit and self.cfg.truncation == "drop_oldest":
            head = 1 if conv.system is not None else 0
            starts = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
            for cut in starts[1:]:  # drop the rounds before `cut`, keeping the system message
                kept = list(range(head)) + list(range(cut, len(messages)))
                kept_msgs = [messages[i] for i in kept]
                kept_trained = [j for j, i in enumerate(kept) if i in trained]
                dropped_rounds = True
                sample = self.encode_messages(kept_msgs, kept_trained, conv.origin)
                if len(sample.input_ids) <= limit:
                    break
        truncated = dropped_rounds or len(sample.input_ids) > limit
        ids, labels = sample.input_ids[:limit], sample.labels[:limit]
        if all(x == IGNORE_INDEX for x in labels):
            return Encoded(dropped=["no loss tokens left after truncation"])
        return Encoded(samples=[Sample(ids, labels, truncated)])

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The rendering of `messages` followed by the template's assistant generation prompt."""
        return self.render(messages, add_generation_prompt=True)

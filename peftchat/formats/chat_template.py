"""The `chat_template` format: the tokenizer's own `apply_chat_template` (spec §3).

The whole conversation is rendered once; loss goes on the tokens of assistant messages only —
their content and the end-of-turn token that closes each one (``<|im_end|>`` for ChatML), so the
model learns to stop. Whitespace the template writes *after* the end-of-turn token (ChatML's
``\\n``) gets no loss: generation stops at the end-of-turn token and never produces it, and the
shipped template's ``{% generation %}`` markers draw the line at the same place. System, user and
tool messages get no loss, nor does an assistant message marked ``"train": false``.
``data.loss_on: last_assistant`` trains the last assistant message only; the history rounds of a
chatglm row are never trained.

Tools: a conversation's tool list goes to the template as ``tools=`` and its assistant
``tool_calls`` / ``tool`` messages as they are (`peftchat.formats.turns` shapes them), so the ids are
``apply_chat_template(messages, tools=...)``'s; loss on the assistant's calls and answers, none on
tool results. A template that does not write a record's tool list or calls (probed once with a
dummy tool, `renders_tools`) is a DataError naming the template and the record, never silent text.

System message: the conversation's own, else `data.meta_instruction` (when set), in training and
in chat alike — so a chat prompt holds exactly the system message training showed.

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
cuts the tail if still too long. A sample left with no loss tokens is dropped and counted. How
many rounds to drop is found by galloping/bisecting over full renders (`fewest_to_drop`): one
render when the conversation fits, O(log n) otherwise. Chat prompts drop oldest rounds the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from peftchat.config import DataConfig
from peftchat.errors import ConfigError, DataError
from peftchat.formats.base import EMPTY_ANSWER_DROPPED, ChatPrompt, Reply, SessionFormat, fewest_to_drop, too_long
from peftchat.formats.conversation import Conversation, is_empty_answer
from peftchat.formats.samples import IGNORE_INDEX, Encoded, Sample, encode_text
from peftchat.formats.turns import parse_tool_calls

Span = tuple[int, int]
Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]]
Query = Union[str, Messages]  # a user message, or the `tool` results of the history's last calls


def _asked(query: Query) -> Messages:
    return [{"role": "user", "content": query}] if isinstance(query, str) else list(query)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def render_ids(
    tokenizer, messages: Messages, add_generation_prompt: bool = False, tools: Optional[Tools] = None
) -> list[int]:
    """Token ids of the chat template's rendering of `messages` (no special tokens added)."""
    text = tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return encode_text(tokenizer, text)


# A tool and a call no real data uses: a template renders tools when the probe's name shows up in
# its text (a template that ignores `tools` or `tool_calls` renders the conversation without it).
PROBE = "peftchat_probe_tool"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {"name": PROBE, "description": "probe", "parameters": {"type": "object", "properties": {}}},
    }
]
PROBE_CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": PROBE, "arguments": {}}}]}


def renders_tools(tokenizer) -> dict[str, bool]:
    """Which tool structures the tokenizer's chat template writes: {"tools": ..., "tool_calls": ...}."""
    user = [{"role": "user", "content": "ping"}]

    def shows(messages: Messages, tools: Optional[Tools]) -> bool:
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # a template that raises on the structure cannot render it
            return False
        return PROBE in text

    return {"tools": shows(user, PROBE_TOOLS), "tool_calls": shows(user + [PROBE_CALL], None)}


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


class ChatTemplateFormat(SessionFormat):
    name = "chat_template"
    has_tools = True

    def __init__(self, cfg: DataConfig, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.collator is 'chat_template' but the tokenizer has no chat template "
                "(use data.collator=chatglm or moss, or a tokenizer that has one)"
            )
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.eot = set(self.eot_ids)
        self._renders: Optional[dict[str, bool]] = None  # renders_tools(tokenizer), probed when first needed
        super().__init__(cfg, tokenizer)

    def _stop_ids(self) -> list[int]:
        return self.eot_ids + self._eos()

    def with_system(self, conv: Conversation) -> Messages:
        """The messages to render: `data.meta_instruction` goes first when there is no system message."""
        if conv.system is None and self.cfg.meta_instruction:
            return [{"role": "system", "content": self.cfg.meta_instruction}, *conv.messages]
        return conv.messages

    def check_tools(self, conv: Conversation) -> None:
        """DataError naming the template and the record when the record has tools or tool calls the
        template does not write: training on the text without them would be silent data loss."""
        needs = [
            k
            for k, used in (
                ("tools", bool(conv.tools)),
                ("tool_calls", any(m.get("tool_calls") for m in conv.messages)),
            )
            if used
        ]
        if not needs:
            return
        if self._renders is None:
            self._renders = renders_tools(self.tokenizer)
        missing = [k for k in needs if not self._renders[k]]
        if missing:
            what = " and ".join({"tools": "a tool list", "tool_calls": "tool calls"}[k] for k in missing)
            name = getattr(self.tokenizer, "name_or_path", "") or "the tokenizer"
            raise DataError(
                f"{conv.origin or 'chat'}: the conversation has {what}, but the chat template of {name} does not "
                "render them (use a tokenizer whose template does, e.g. Qwen2.5's, or data.collator=moss for "
                "MOSS tool data)"
            )

    def render(
        self, messages: Messages, add_generation_prompt: bool = False, origin: str = "", tools: Optional[Tools] = None
    ) -> list[int]:
        try:
            return render_ids(self.tokenizer, messages, add_generation_prompt, tools)
        except Exception as e:  # jinja raises for conversations the template refuses
            where = f"{origin}: " if origin else ""
            raise DataError(f"{where}the chat template rejects this conversation: {e}") from None

    def assistant_span(
        self, messages: Messages, i: int, full: list[int], origin: str, tools: Optional[Tools] = None
    ) -> Span:
        prompt = self.render(messages[:i], add_generation_prompt=True, origin=origin, tools=tools)
        upto = self.render(messages[: i + 1], origin=origin, tools=tools)
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

    def trained_indices(self, messages: Messages, context_rounds: int) -> list[int]:
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = [i for i in assistants[context_rounds:] if messages[i].get("train", True) is not False]
        if self.cfg.loss_on == "last_assistant":
            trained = trained[-1:]
        return trained

    def encode_messages(
        self,
        messages: Messages,
        trained: list[int],
        origin: str = "",
        ids: Optional[list[int]] = None,
        tools: Optional[Tools] = None,
    ) -> Sample:
        """The whole rendering of `messages`, loss on the assistant messages listed in `trained`."""
        ids = self.render(messages, origin=origin, tools=tools) if ids is None else ids
        labels = [IGNORE_INDEX] * len(ids)
        for i in trained:
            lo, hi = self.assistant_span(messages, i, ids, origin, tools)
            labels[lo:hi] = ids[lo:hi]
        return Sample(ids, labels)

    def _encode(self, conv: Conversation) -> Encoded:
        if conv.dropped:
            return Encoded(dropped=[conv.dropped])
        self.check_tools(conv)
        messages = self.with_system(conv)
        trained = set(self.trained_indices(messages, conv.context_rounds))
        if not trained:  # say why, rather than "no loss tokens left after truncation"
            return Encoded(
                dropped=[
                    EMPTY_ANSWER_DROPPED
                    if any(is_empty_answer(m) for m in messages)
                    else 'no assistant message to train (all "train": false)'
                ]
            )
        limit = self.cfg.max_length
        head = 1 if messages and messages[0]["role"] == "system" else 0
        starts = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
        rendered: dict[int, list[int]] = {}

        def kept_from(s: int) -> list[int]:  # message indices left after dropping s oldest rounds
            return list(range(head)) + list(range(starts[s] if s else head, len(messages)))

        def ids_from(s: int) -> list[int]:
            if s not in rendered:
                rendered[s] = self.render([messages[i] for i in kept_from(s)], origin=conv.origin, tools=conv.tools)
            return rendered[s]

        dropped = 0
        if len(ids_from(0)) > limit and self.cfg.truncation == "drop_oldest" and len(starts) > 1:
            # drop 1..len(starts)-1 rounds, always keeping the last one
            found = fewest_to_drop(len(starts) - 2, lambda s: len(ids_from(s + 1)) <= limit)
            dropped = len(starts) - 1 if found is None else found + 1
        kept = kept_from(dropped)
        sample = self.encode_messages(
            [messages[i] for i in kept],
            [j for j, i in enumerate(kept) if i in trained],
            conv.origin,
            ids_from(dropped),
            conv.tools,
        )
        truncated = dropped > 0 or len(sample.input_ids) > limit
        ids, labels = sample.input_ids[:limit], sample.labels[:limit]
        if all(x == IGNORE_INDEX for x in labels):
            return Encoded(dropped=["no loss tokens left after truncation"])
        return Encoded(samples=[Sample(ids, labels, truncated)])

    def add_round(self, history: Conversation, query: Query, reply: Reply) -> Conversation:
        """The history after the reply; with tools, calls in the reply's `<tool_call>` syntax become
        the assistant's `tool_calls`, so later prompts render the turn as training rendered calls.
        `query` is a user message, or the `tool` results the reply answers."""
        text, calls = parse_tool_calls(reply.text) if history.tools else (reply.text, [])
        asked = _asked(query)
        if not calls and isinstance(query, str):
            return history.with_round(query, reply.text)
        answer = {
            "role": "assistant",
            **({"content": text} if text or not calls else {}),
            **({"tool_calls": calls} if calls else {}),
        }
        return dataclasses.replace(history, messages=[*history.messages, *asked, answer])

    def prompt(self, history: Conversation, query: Query, budget: Optional[int] = None) -> ChatPrompt:
        """The rendering of the history (oldest rounds left out to fit) and `query`, followed by
        the template's assistant generation prompt. `query` is a user message, or the `tool`
        results of the calls that end the history (whose round is then never left out)."""
        budget = self.cfg.max_length if budget is None else budget
        self.check_tools(history)
        messages = self.with_system(history)
        head = 1 if messages and messages[0]["role"] == "system" else 0
        starts = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
        asked = _asked(query)
        rendered: dict[int, list[int]] = {}

        def ids_from(s: int) -> list[int]:
            if s not in rendered:
                rest = messages[starts[s] :] if s < len(starts) else []
                rendered[s] = self.render(
                    messages[:head] + rest + asked, add_generation_prompt=True, tools=history.tools
                )
            return rendered[s]

        # tool results answer the calls of the history's last round, which must stay
        most = max(len(starts) - (0 if isinstance(query, str) else 1), 0)
        dropped = fewest_to_drop(most, lambda s: len(ids_from(s)) <= budget)
        if dropped is None:
            raise too_long(len(ids_from(most)), budget)
        return ChatPrompt(ids_from(dropped), dropped)

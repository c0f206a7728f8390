"""`Conversation`: one session, normalized — the only shape of a conversation or chat history."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from peftchat.errors import DataError


def is_empty_answer(message: dict[str, Any]) -> bool:
    """An assistant message with neither text nor a tool call."""
    return (
        message["role"] == "assistant" and not (message.get("content") or "").strip() and not message.get("tool_calls")
    )


@dataclass
class Conversation:
    """One session, normalized.

    `messages` is the conversation in OpenAI form (system first when there is one); every format
    can render it. An assistant message may carry ``"train": False`` to keep it out of the loss.
    `moss_turns` keeps the raw MOSS field values, in order, one list per user/assistant round, for
    the moss format; it is None for the other formats. `context_rounds` leading user/assistant
    rounds are history given as context only (chatglm rows): no format puts loss on them.
    A chat history is a Conversation of finished rounds (it may be empty, or a system message only).
    """

    messages: list[dict[str, Any]]
    origin: str = ""
    context_rounds: int = 0
    moss_turns: Optional[list[list[tuple[str, str]]]] = None
    dropped: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None  # the tool list the chat template renders (`formats.turns`)

    @classmethod
    def from_rounds(
        cls, rounds: Sequence[tuple[str, str]], system: Optional[str] = None, origin: str = ""
    ) -> Conversation:
        """A conversation of (user, assistant) rounds after an optional system message."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        for user, assistant in rounds:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return cls(messages=messages, origin=origin)

    @property
    def system(self) -> Optional[str]:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def round_starts(self) -> list[int]:
        """Indices of the messages that open a round (each user message after the system one)."""
        head = 1 if self.system is not None else 0
        return [i for i in range(head, len(self.messages)) if self.messages[i]["role"] == "user"]

    def rounds(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs, for the formats that only know question/answer rounds.

        The system message is left out. Raises DataError unless the rest strictly alternates
        user, assistant (tool messages are for the chat_template format only).
        """
        start = 1 if self.system is not None else 0
        if self.tools or any(m.get("tool_calls") for m in self.messages):
            # ChatGLM's rounds have no place for a tool list or a call; MOSS records carry theirs in
            # their own Commands / Tool Responses fields. Dropping them silently would train other text.
            raise DataError(
                f"{self.origin}: the chatglm and moss collators have no place for tool definitions or "
                "tool calls (MOSS records carry theirs in 'Commands' and 'Tool Responses'); "
                "use data.collator=chat_template with a template that renders tools"
            )
        expect = "user"
        for i in range(start, len(self.messages)):
            role = self.messages[i]["role"]
            if role != expect:
                raise DataError(
                    f"{self.origin}: the chatglm and moss collators need alternating user/assistant "
                    f"messages, found {role!r} at messages[{i}] (use data.collator=chat_template)"
                )
            expect = "assistant" if expect == "user" else "user"
        body = self.messages[start:]
        out = [(body[k]["content"] or "", body[k + 1]["content"] or "") for k in range(0, len(body) - 1, 2)]
        return out

    def with_empty_answers_untrained(self) -> tuple[Conversation, int]:
        """The conversation with every empty assistant answer (no text, no tool call) marked
        ``"train": False`` — kept as context, no loss — and how many there were. ChatGLM-6B drops
        such a round and keeps the rest of the data (spec §1); a session-level format cannot drop a
        round from the middle without changing the context of the later ones, so it trains none."""
        empty = [i for i, m in enumerate(self.messages) if is_empty_answer(m)]
        if not empty:
            return self, 0
        messages = [dict(m, train=False) if i in empty else m for i, m in enumerate(self.messages)]
        return dataclasses.replace(self, messages=messages), len(empty)

    def without_oldest_rounds(self, n: int) -> Conversation:
        """The conversation less its `n` oldest rounds; the system message stays."""
        if n <= 0:
            return self
        starts = self.round_starts()
        head = self.messages[:1] if self.system is not None else []
        rest = self.messages[starts[n] :] if n < len(starts) else []
        turns = self.moss_turns[n:] if self.moss_turns is not None else None
        return dataclasses.replace(
            self, messages=head + rest, moss_turns=turns, context_rounds=max(self.context_rounds - n, 0)
        )

    def with_round(self, user: str, assistant: str, moss_turn: Optional[list[tuple[str, str]]] = None) -> Conversation:
        """The conversation plus one finished round (`moss_turn`: its raw MOSS fields, moss only)."""
        messages = self.messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        turns = self.moss_turns + [moss_turn] if self.moss_turns is not None and moss_turn is not None else None
        return dataclasses.replace(self, messages=messages, moss_turns=turns)

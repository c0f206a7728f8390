"""`ConversationFormat`: the interface every conversation format implements.

A format is built once per tokenizer (`registry.make_format`) and then answers, with one body of
code for training and inference:

* `encode(conv)`                     training samples of a `Conversation` (+ drops, left-outs)
* `prompt(history, query, budget)`   the chat prompt ids for `query` after the finished rounds of
                                     `history`: exactly the tokens training put in front of that
                                     answer, oldest rounds left out to fit `budget`
* `stop_ids`                         token ids that end a reply (computed once, in `__init__`)
* `parse_reply(ids)` / `reply_stream()`   the reply in generated ids, whole or incrementally
* `add_round(history, query, reply)`      the history after the model answered
* `sample_limit(cfg)`                the most tokens one training sample can have

Adding a format = one module with a subclass + one line in `registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Optional

from peftchat.config import DataConfig
from peftchat.errors import UserError
from peftchat.formats.conversation import Conversation
from peftchat.formats.samples import Encoded

# Counted in the data report (left out) for each empty assistant answer a session format keeps
# without loss (`Conversation.with_empty_answers_untrained`); chatglm drops such a round instead.
EMPTY_ANSWER = "empty answer (kept as context, no loss)"
# Counted (dropped) for a conversation with no answer left to train because its answers are empty.
EMPTY_ANSWER_DROPPED = "empty answer"


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    dropped_rounds: int = 0  # oldest history rounds left out to fit the budget


@dataclass(frozen=True)
class Reply:
    text: str  # what the user reads
    fields: dict[str, str] = field(default_factory=dict)  # moss: raw Inner Thoughts/Commands/Tool Responses


def fewest_to_drop(n: int, fits: Callable[[int], bool]) -> Optional[int]:
    """The smallest s in 0..n with `fits(s)` (s = oldest rounds dropped), None when not even n fits.

    `fits` must be monotone (dropping more rounds never makes a prompt longer). Galloping then
    bisecting: one probe when nothing has to go, O(log s) probes otherwise — a chat session that
    outgrows its budget by one round costs two renders, not one per history start.
    """
    if fits(0):
        return 0
    lo, step = 0, 1  # invariant: fits(lo) is False
    while True:
        hi = min(lo + step, n)
        if hi > lo and fits(hi):
            break
        if hi >= n:
            return None
        lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def too_long(n_tokens: int, budget: int) -> UserError:
    return UserError(
        f"the message needs {n_tokens} prompt tokens, more than the context budget of {budget} "
        "(decoding.max_context or data.max_length, minus decoding.max_new_tokens)"
    )


class ConversationFormat(ABC):
    name: ClassVar[str]
    has_system: ClassVar[bool] = True  # False: the format has no place for a system message
    # True: a tool list, assistant `tool_calls` and `tool` results can be rendered (chat_template);
    # `prompt`'s query may then be the results of the history's last calls (a list of `tool` messages)
    has_tools: ClassVar[bool] = False

    def __init__(self, cfg: DataConfig, tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stop_ids: list[int] = list(dict.fromkeys(self._stop_ids()))

    # --- training ------------------------------------------------------------------------------
    @classmethod
    def sample_limit(cls, cfg: DataConfig) -> int:
        """The most tokens one training sample of this format can have."""
        return cfg.max_length

    @abstractmethod
    def encode(self, conv: Conversation) -> Encoded: ...

    # --- chat ----------------------------------------------------------------------------------
    @abstractmethod
    def prompt(self, history: Conversation, query: str, budget: Optional[int] = None) -> ChatPrompt:
        """Prompt ids for `query` after `history`; `budget` (default data.max_length) caps them."""

    @abstractmethod
    def _stop_ids(self) -> list[int]: ...

    def _eos(self) -> list[int]:
        return [int(self.tokenizer.eos_token_id)] if self.tokenizer.eos_token_id is not None else []

    def forced_continuations(self) -> list[tuple[list[int], list[int]]]:
        """(trigger ids, forced ids): whenever generation has just produced `trigger` (and a part
        of `forced`), the next tokens are `forced` — text the system, not the model, writes in
        this format. None by default."""
        return []

    def cut_at_stop(self, generated_ids: Iterable[int]) -> list[int]:
        ids = [int(t) for t in generated_ids]
        stops = set(self.stop_ids)
        for k, t in enumerate(ids):
            if t in stops:
                return ids[:k]
        return ids

    def parse_reply(self, generated_ids: Iterable[int]) -> Reply:
        """The reply in the ids generated after the prompt (up to the first stop token)."""
        return Reply(self.tokenizer.decode(self.cut_at_stop(generated_ids), skip_special_tokens=True).strip())

    def add_round(self, history: Conversation, query: str, reply: Reply) -> Conversation:
        return history.with_round(query, reply.text)

    def reply_stream(self) -> ReplyStream:
        return ReplyStream(self)


class SessionFormat(ConversationFormat):
    """A format that renders a whole session as one sequence (moss, chat_template): an empty
    answer cannot be cut out of the middle without changing the later rounds' context, so it stays
    as context without loss, counted (`EMPTY_ANSWER`); chatglm drops such a round instead."""

    def encode(self, conv: Conversation) -> Encoded:
        conv, empty = conv.with_empty_answers_untrained()
        out = self._encode(conv)
        if out.samples:  # a dropped conversation is counted once, by its drop reason
            out.left_out += [EMPTY_ANSWER] * empty
        return out

    @abstractmethod
    def _encode(self, conv: Conversation) -> Encoded: ...


class ReplyStream:
    """The reply text as tokens arrive, decoded incrementally: each token costs a decode of a few
    tokens, never of the whole reply, and nothing is re-rendered.

    Written by hand (the vLLM-style prefix/read window) because tokenizers' `DecodeStream` needs a
    fast tokenizer and ChatGLM's is not. Leading whitespace is not shown and trailing whitespace
    waits for more text, as `parse_reply` strips both; text ending in U+FFFD (a character split
    across tokens) waits for the next token.
    """

    skip_special_tokens = True

    def __init__(self, fmt: ConversationFormat) -> None:
        self.tokenizer = fmt.tokenizer
        self.stops = set(fmt.stop_ids)
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.stopped = False
        self._prefix = self._read = 0  # window: ids[_prefix:_read] is decoded context, the rest new
        self._pos: Optional[int] = None  # index in `text` up to which the reply was shown
        self.shown = ""

    def push(self, token_ids: Iterable[int]) -> str:
        """Feed generated ids; returns the reply text they add (possibly "")."""
        for t in token_ids:
            if self.stopped or int(t) in self.stops:
                self.stopped = True
                break
            self.ids.append(int(t))
        self._decode_new()
        return self._emit()

    def _decode_new(self) -> None:
        if self._read == len(self.ids):
            return
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=self.skip_special_tokens)
        after = decode(self.ids[self._prefix :], skip_special_tokens=self.skip_special_tokens)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def window(self) -> tuple[Optional[int], Optional[int]]:
        """(start, end) of the reply inside `text`; start None = not begun, end None = open."""
        return 0, None

    def _emit(self) -> str:
        start, end = self.window()
        if start is None:
            return ""
        end = len(self.text) if end is None else end
        pos = max(start, self._pos or 0)
        if not self.shown:
            while pos < end and self.text[pos].isspace():
                pos += 1
        piece = self.text[pos:end]
        piece = piece[: len(piece.rstrip())]
        self._pos = pos + len(piece)
        self.shown += piece
        return piece

    def finish(self, reply: str) -> str:
        """What the final reply adds to what was shown (the whole reply after a newline when the
        stream showed something the final reply does not start with)."""
        if reply.startswith(self.shown):
            return reply[len(self.shown) :]
        return "\n" + reply

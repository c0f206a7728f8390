"""What every format's `encode` produces, and the token helpers the formats share.

A sample is unpadded: `input_ids` and `labels` of equal length, labels unshifted (label[i] is the
target of position i; the model shifts once), -100 = no loss. Whatever a format cannot turn into
a sample (an empty round, a session that does not fit) is returned as a drop reason, and a part of
a conversation a format has no place for (a system message under chatglm) as a left-out reason,
so the data report can count both: nothing disappears silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftchat.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # some tokens, turns or history rounds were cut to fit the limits


@dataclass
class Encoded:
    """The result of encoding one conversation: its samples and what was dropped (and why)."""

    samples: list[Sample] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # one reason per would-be sample or session
    left_out: list[str] = field(default_factory=list)  # parts not used although samples were made


def encode_text(tokenizer, text: str) -> list[int]:
    """E(text): the token ids of `text` with no special tokens added."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def token_id(tokenizer, token: str, key: str) -> int:
    """Id of `token`, which must be a single token of the vocabulary (added tokens included)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or token not in tokenizer.get_vocab():
        raise ConfigError(f"'{key}': {token!r} is not a token of the tokenizer")
    return int(tid)


def has_loss(labels: list[int]) -> bool:
    return any(x != IGNORE_INDEX for x in labels)

"""The conversation formats by name (`data.collator`) — the only place that names them.

Adding a format: write `peftchat/formats/<name>.py` with a `ConversationFormat` subclass and add
it to `FORMATS` below; training, `data dump`, chat, generate and merge pick it up from here.
"""

from __future__ import annotations

from peftchat.config import DataConfig
from peftchat.errors import ConfigError
from peftchat.formats.base import ConversationFormat
from peftchat.formats.chat_template import ChatTemplateFormat
from peftchat.formats.chatglm import ChatGLMFormat
from peftchat.formats.moss import MossFormat

FORMATS: dict[str, type[ConversationFormat]] = {
    cls.name: cls for cls in (ChatGLMFormat, MossFormat, ChatTemplateFormat)
}


def format_class(name: str) -> type[ConversationFormat]:
    """The class of format `name`; ConfigError naming `data.collator` for an unknown one."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"'data.collator' is {name!r}; expected one of {', '.join(FORMATS)}") from None


def make_format(cfg: DataConfig, tokenizer) -> ConversationFormat:
    """The format named by `data.collator`, set up for this tokenizer."""
    return format_class(cfg.collator)(cfg, tokenizer)


def sample_limit(cfg: DataConfig) -> int:
    """The most tokens one training sample of the recipe's format can have (no tokenizer needed)."""
    return format_class(cfg.collator).sample_limit(cfg)

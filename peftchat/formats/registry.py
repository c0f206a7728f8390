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


# data.loss_on values a format applies when it does not list its own (`loss_on_values`): every value
# but `all`, the loss on the user turns too, which is MOSS's own training and the moss format's alone.
DEFAULT_LOSS_ON = ("auto", "all_assistant", "assistant", "last_assistant")


def checked_format_class(cfg: DataConfig) -> type[ConversationFormat]:
    """The class of `data.collator`, after checking that it applies `data.loss_on` (no tokenizer needed)."""
    cls = format_class(cfg.collator)
    values = getattr(cls, "loss_on_values", DEFAULT_LOSS_ON)
    if cfg.loss_on not in values:
        why = getattr(cls, "loss_on_refusal", "")
        raise ConfigError(
            f"'data.loss_on' is {cfg.loss_on!r}, which the {cls.name} collator cannot apply"
            f"{': ' + why if why else ''}; it takes {', '.join(values)}"
        )
    return cls


def make_format(cfg: DataConfig, tokenizer) -> ConversationFormat:
    """The format named by `data.collator`, set up for this tokenizer."""
    return checked_format_class(cfg)(cfg, tokenizer)


def sample_limit(cfg: DataConfig) -> int:
    """The most tokens one training sample of the recipe's format can have (no tokenizer needed)."""
    return checked_format_class(cfg).sample_limit(cfg)

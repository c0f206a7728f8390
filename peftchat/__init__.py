"""peftchat: LoRA/QLoRA fine-tuning of chat LLMs on multi-turn conversations, on one GPU."""

__version__ = "0.1.0"

from peftchat.quiet import quiet_bitsandbytes_import as _quiet_bitsandbytes_import

_quiet_bitsandbytes_import()  # before anything imports peft (and with it bitsandbytes)

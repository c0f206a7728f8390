"""peftchat: LoRA/QLoRA fine-tuning of chat LLMs on multi-turn conversations, on one GPU."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:  # pyproject.toml's version is the one source; the installed metadata carries it
    __version__ = _version("peftchat")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

from peftchat.quiet import quiet_bitsandbytes_import as _quiet_bitsandbytes_import

_quiet_bitsandbytes_import()  # before anything imports peft (and with it bitsandbytes)

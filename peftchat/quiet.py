"""Known, harmless messages of third-party libraries, each silenced by an exact filter at the one
place that triggers it (never a blanket warnings filter).

* bitsandbytes >= 0.49, on a CPU with AVX512-BF16, tries at import time to fetch an optional CPU
  gemm kernel through the `kernels` package (code downloaded from the hub) and logs a warning
  when that package is missing. peft imports bitsandbytes whenever it is installed, so every
  command printed it, quantized or not. peftchat does not use or install `kernels` (bitsandbytes
  falls back to its own CPU kernels), so that one record is dropped.
* bitsandbytes logs on every LLM.int8 matmul that bf16 inputs are cast to fp16 (by design).
* Without `peftchat --verbose` (`quiet_by_default`): transformers' and the hub's progress bars
  (weight loading and shard writing take a blink for small models), matplotlib's one-time "building
  the font cache" note, and hub look-ups for a run whose model, tokenizer and data are all local
  paths (HF_HUB_OFFLINE is set for it, so nothing waits on an unreachable hub).
* peft's `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5.2x
  deprecated (FutureWarning); peftchat's own code uses `is_activation_checkpointing`.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

_BNB_KERNEL_PROBE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_INT8_CAST = "MatMul8bitLt: inputs will be cast"


def _not_bnb_kernel_probe(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_KERNEL_PROBE)


def _not_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_INT8_CAST)


def quiet_bitsandbytes_import() -> None:
    """Drop the `kernels`-probe record of bitsandbytes' CPU backend (call before peft is imported)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_bnb_kernel_probe)


_VERBOSE = False


def verbose() -> bool:
    return _VERBOSE


def _not_font_cache_note(record: logging.LogRecord) -> bool:
    return "building the font cache" not in str(record.msg)


def quiet_by_default(verbose_on: bool) -> None:
    """Called once by the CLI before any command runs; `--verbose` keeps every library message.
    Environment variables are read by the libraries at import, which has not happened yet."""
    global _VERBOSE
    _VERBOSE = verbose_on
    if verbose_on:
        logging.getLogger("bitsandbytes.backends.cpu.ops").removeFilter(_not_bnb_kernel_probe)
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the hub's and transformers' bars
    import sys

    if "transformers" in sys.modules:  # imported already (a test calling cli.main): tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    logging.getLogger("matplotlib.font_manager").addFilter(_not_font_cache_note)


def offline_when_local(paths: list[str]) -> None:
    """HF_HUB_OFFLINE=1 for a run that names only existing local paths (model, tokenizer, data),
    unless the user set it or asked for --verbose: then no library waits on the hub's retries."""
    if _VERBOSE or "HF_HUB_OFFLINE" in os.environ:
        return
    if paths and all(os.path.exists(os.path.expanduser(p)) for p in paths):
        os.environ["HF_HUB_OFFLINE"] = "1"


def quiet_int8_cast() -> None:
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_int8_cast)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Around peft calls that build a PeftModel (get_peft_model, PeftModel.from_pretrained)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

"""The unsloth peer: its documented QLoRA path, in a process of its own.

    FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True, max_seq_length=...)
    FastLanguageModel.get_peft_model(r=16, lora_alpha=32, all seven projections,
                                     use_gradient_checkpointing="unsloth")

then the same hand-written step as the other peers (plain AdamW, clipping, loss from the model's
own `labels` path). unsloth patches transformers when it is imported, so it must be imported
before transformers (the worker imports nothing of transformers before this module runs) and
never share a process with another variant (bench.py isolates every job). Hub access is off
(`HF_HUB_OFFLINE=1`); the tokenizer is the one bench.py copies into the model dir.

unsloth's documented setting is LoRA dropout 0 (`peer:unsloth`); `peer:unsloth@dropout0.05` runs
it at the dropout of the peftchat rows beside it. unsloth needs CUDA: on CPU the row is skipped.
"""

from __future__ import annotations

import os
from typing import Any

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def unsloth_available() -> str | None:
    """None when unsloth can run here, else why not (the row's `skipped` note)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "unsloth needs CUDA (skipped on CPU)"
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (benchmarks/pack_unsloth.sh)"
    return None


def build_unsloth(mode: str, model_dir: str, max_seq_length: int, dropout: float):
    """Load `model_dir` through FastLanguageModel in `mode` (nf4 or bf16) and add LoRA."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth import FastLanguageModel

    if mode not in ("nf4", "bf16"):
        raise ValueError(f"peer:unsloth runs nf4 or bf16, not {mode!r}")
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=max_seq_length, load_in_4bit=mode == "nf4", load_in_16bit=mode == "bf16",
        dtype=None)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGET_MODULES, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, max_seq_length=max_seq_length)
    model.train()
    return model


def unsloth_versions() -> dict[str, Any]:
    from importlib import metadata

    out = {}
    for name in ("unsloth", "unsloth_zoo", "trl", "datasets", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out

"""How closely llama.cpp runs a GGUF export: the same token ids through the transformers model and
through llama.cpp (via llama-cpp-python, the `gguf-check` extra), logits compared at every position
of a fixed prompt set.

The ids are the transformers tokenizer's, fed to both, so the figure measures the weights and the
architecture; whether llama.cpp's own tokenizer splits the prompts alike is reported beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# Fixed prompts: Chinese and English, the demo's chat markers and digits, so that every family is
# measured on the same 80-odd positions.
PARITY_PROMPTS = (
    "<|Human|>: 番茄炒蛋怎么做？<eoh>\n<|MOSS|>:",
    "The quick brown fox jumps over the lazy dog.",
    "你好，请用一句话介绍一下你自己。",
    "1 + 1 = 2, 2 + 2 = 4, 3 + 3 =",
)


@dataclass(frozen=True)
class Parity:
    positions: int  # logits compared
    top1_agree: int  # positions where both pick the same next token
    max_logit_diff: float  # largest |llama.cpp - transformers| over all positions and tokens
    max_abs_logit: float  # scale of the logits, to read the difference against
    same_tokens: bool  # llama.cpp's tokenizer gives the transformers ids for every prompt

    def line(self) -> str:
        return (
            f"llama.cpp parity: top-1 agreement {self.top1_agree}/{self.positions}, max logit diff "
            f"{self.max_logit_diff:.2e} (logits up to {self.max_abs_logit:.2g}); tokenizer "
            f"{'matches' if self.same_tokens else 'DIFFERS from'} transformers'"
        )


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _transformers_logits(model_dir: Path, prompts: Sequence[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def gguf_parity(
    model_dir: str | os.PathLike, gguf_path: str | os.PathLike, prompts: Sequence[str] = PARITY_PROMPTS
) -> Parity:
    """Compare the GGUF file run by llama.cpp with the transformers model in `model_dir`."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    want = _transformers_logits(Path(model_dir), ids)
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=max(len(i) for i in ids) + 8,
        logits_all=True,
        n_threads=max(1, min(4, os.cpu_count() or 1)),
        verbose=False,
    )
    try:
        positions = agree = 0
        diff = scale = 0.0
        same = True
        for text, row, ref in zip(prompts, ids, want):
            same &= llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == row
            llm.reset()
            llm.eval(row)
            got = np.asarray(llm.scores[: len(row)], dtype=np.float32)[:, : ref.shape[-1]]
            positions += len(row)
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            diff = max(diff, float(np.abs(got - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    finally:
        llm.close()
    return Parity(positions, agree, diff, scale, bool(same))

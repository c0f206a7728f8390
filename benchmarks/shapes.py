"""Model shapes of the benchmark, random-init model building, and the FLOP count per token.

Models are Llama-architecture, random-init (no hub): the weights do not change the speed of a
training step, only the shapes do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Llama-3.2-1B and Llama-3-8B shapes; `tiny` is the CPU smoke shape.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}

COMMON = dict(
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def shape_dict(shape: str, vocab_size: int | None = None) -> dict[str, Any]:
    cfg = {**COMMON, **SHAPES[shape]}
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return cfg


def linear_params(cfg: dict[str, Any]) -> int:
    """Weights of every matmul a token goes through: all decoder linears plus the LM head.

    The LM head counts even when tied to the embedding (its matmul runs either way); the embedding
    lookup is no matmul and does not count.
    """
    d, ff, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    q = d * cfg["num_attention_heads"] * hd
    kv = 2 * d * cfg["num_key_value_heads"] * hd
    o = cfg["num_attention_heads"] * hd * d
    mlp = 3 * d * ff
    return L * (q + kv + o + mlp) + cfg["vocab_size"] * d


def flops_per_token(cfg: dict[str, Any], seq_len: int) -> float:
    """Model FLOPs per trained token of LoRA fine-tuning with a frozen base (recompute not counted).

    4 * N_linear: forward (2 N) plus the input-gradient half of the backward (2 N); frozen weights
    need no weight gradient. LoRA's own matmuls (< 1 % here) are left out.
    12 * L * S * d_attn: attention scores and values, forward 4 * L * S * d_attn, backward twice
    that; no causal discount (the PaLM convention).
    """
    d_attn = cfg["num_attention_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    return 4.0 * linear_params(cfg) + 12.0 * cfg["num_hidden_layers"] * seq_len * d_attn


def build_random_model(
    shape: str, out_dir: str | Path, device: str, vocab_size: int | None = None, seed: int = 0
) -> Path:
    """Build a random-init bf16 Llama of `shape` directly on `device` and save it to `out_dir`.

    Skipped when `out_dir` already holds the same shape (marker file), so a machine builds each
    model once for all the variants.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = Path(out_dir)
    cfg_dict = shape_dict(shape, vocab_size)
    marker = out / "bench_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == cfg_dict:
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg_dict)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    marker.write_text(json.dumps(cfg_dict))
    del model
    return out


def bench_model(shape: str, models_dir: str | Path, device: str) -> Path:
    """The benchmarks' model of `shape` under `models_dir` (built once): its vocabulary at least the
    shipped tokenizer's, so peftchat's data path fits, and that tokenizer beside the weights (for
    peers that load the dir as users do)."""
    from transformers import AutoTokenizer

    from benchmarks.worker import copy_tokenizer
    from peftchat.demo_assets import demo_tokenizer_dir

    vocab = max(shape_dict(shape)["vocab_size"], len(AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))))
    path = build_random_model(shape, Path(models_dir) / shape, device, vocab)
    copy_tokenizer(str(path))
    return path

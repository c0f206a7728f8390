"""Attention over packed rows with torch's variable-length flash kernel.

Why: transformers turns packed ``position_ids`` into a dense block-diagonal mask, and with a mask
sdpa leaves its flash kernel. On the H200 (benchmarks/HISTORY.md) a packed 8B NF4 step
took 1.53 s against 0.78 s for a full unpacked row of the same token count. torch (>= 2.10) has
`torch.nn.attention.varlen.varlen_attn`, flash attention over sequences laid end to end and
described by cumulative lengths; transformers' own varlen path needs the flash-attn package, which
a plain pip install of peftchat does not bring.

`VARLEN_ATTENTION` is registered as a transformers attention implementation whose mask is sdpa's,
so everything but a packed training batch (padding, a KV cache, sliding windows, dropout) goes
through transformers' sdpa function exactly as `sdpa` would. A packed batch passes its sample
boundaries as the `cu_seq_lens_q/k`, `max_length_q/k` keyword arguments (the names transformers'
flash path uses; `packed_kwargs`), which reach every attention call of a decoder. Layers with a
sliding window (Mistral configs that set `sliding_window`, Gemma 3's local layers) and soft-capped
logits keep sdpa's mask: correct, not faster (tests/test_families.py checks every family).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "sdpa_varlen"
# Attention kwargs the kernel cannot honour: with any of them set, the call goes to sdpa.
_SDPA_ONLY_KWARGS = ("sliding_window", "softcap", "s_aux")


def packed_kwargs(cu_seq_lens: torch.Tensor, max_seq_len: int | torch.Tensor) -> dict[str, Any]:
    """Decoder keyword arguments for one packed batch: `cu_seq_lens` (int32, samples' cumulative
    lengths over the flattened batch, starting at 0) and the longest sample."""
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": int(max_seq_len),
        "max_length_k": int(max_seq_len),
    }


def _reference_varlen(q, k, v, cu_seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention per sample with sdpa: the same result as the flash kernel, on any device
    and dtype (the CPU path, and what tests compare against)."""
    out = torch.empty_like(q)
    bounds = cu_seq_lens.tolist()
    gqa = k.shape[1] != q.shape[1]
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
            out[start:end] = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
            ).transpose(0, 1)
    return out


@functools.lru_cache(maxsize=4)
def _parameter_names(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)  # once, not in every layer's attention call


def _flash_varlen(q, k, v, cu_seq_lens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    params = _parameter_names(varlen_attn)
    # torch 2.10 takes is_causal; 2.11 on replaced it with window_size ((-1, 0) is causal).
    extra: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # torch 2.10 / 2.11 (the GPU image's signature, in benchmarks/results/) have no GQA switch
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    # without return_aux it returns the output alone (torch annotates both forms)
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, scale=scale, **extra)  # type: ignore[return-value]


def flash_varlen_available(device: torch.device) -> bool:
    """True where `varlen_attn` can run: a CUDA device and a torch that has it."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Causal attention within each sample of tokens laid end to end: q (tokens, heads, dim), k/v
    (tokens, kv_heads, dim), samples bounded by `cu_seq_lens`. Flash kernel on CUDA in bf16/fp16,
    the per-sample sdpa reference otherwise."""
    if q.dtype in (torch.bfloat16, torch.float16) and flash_varlen_available(q.device):
        return _flash_varlen(q, k, v, cu_seq_lens, max_len, scale)
    return _reference_varlen(q, k, v, cu_seq_lens, scale)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (query (batch, heads, len, dim)); returns (batch, len,
    heads, dim) like transformers' sdpa function, which it calls for anything but a packed batch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    unpackable = (
        cu_seq_lens is None
        or dropout
        or query.shape[2] != key.shape[2]
        or not getattr(module, "is_causal", True)
        or any(kwargs.get(name) is not None for name in _SDPA_ONLY_KWARGS)
    )
    if unpackable:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    assert cu_seq_lens is not None  # else unpackable
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    scale = scaling if scaling is not None else dim**-0.5
    out = packed_causal_attention(q, k, v, cu_seq_lens, kwargs["max_length_q"], scale)
    return out.view(batch, length, heads, dim), None


def register_varlen_attention() -> str:
    """Register `VARLEN_ATTENTION` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION

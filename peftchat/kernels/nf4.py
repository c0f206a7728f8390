"""bitsandbytes 4-bit (NF4 / FP4) weights read from their codes by peftchat's Triton kernels
(peftchat.kernels.nf4_kernels): which weights the kernels take, their arguments, and the
dequantization to the compute dtype that `frozen_linear` uses instead of bitsandbytes' own
wherever the kernel fits (lean 8B NF4 10,955 tok/s against 10,810 with bitsandbytes', one run).

Why a dequantization of our own: bitsandbytes' `dequantize_4bit` of a double-quantized weight is
three launches (the absmaxes, their offset, the weight) and two temporary buffers, three times per
LoRA linear and step (forward, recompute, backward); its weight kernel took 22.3 ms of fast's
633 ms step (8B NF4 fast, profiled on an H200), about 2.3 TB/s. One tiled kernel (the FP8 weight kernels'
decode, `nf4_tile_values`) reads the codes once and writes the weight once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

# (rows, columns) of the (N, K) weight tile one program of the weight kernels converts
TILE = (64, 128)

# weight -> (the kernels' arguments after the codes, their meta-parameters), built once per frozen
# weight, on the hot path of every LoRA linear: the offset lives on the device, and reading it on
# every call would wait for the GPU. torch's weak dictionary (tensors compare elementwise, not by
# identity); the key is the weight itself (the Parameter), not `.data`, which is a new tensor at
# every access. The value must not hold the weight: it would keep its own entry alive.
_DECODE = WeakTensorKeyDictionary()


@functools.cache
def _kernels():
    try:
        from peftchat.kernels import nf4_kernels
    except ImportError:  # no Triton
        return None
    return nf4_kernels


def kernels_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors like `t` (CUDA with Triton; the tests also run
    them on the CPU through Triton's interpreter)."""
    return t.is_cuda and _kernels() is not None


def kernel_fits(weight: torch.Tensor, quant_state) -> bool:
    """Whether the Triton kernels take this bitsandbytes 4-bit weight: packed uint8 for a 2-D shape
    whose rows hold whole absmax blocks (NF4 or FP4: the code table is read, not assumed), not
    repacked by bitsandbytes' CPU inference path."""
    shape = getattr(quant_state, "shape", None)
    return (
        weight.dtype == torch.uint8
        and shape is not None
        and len(shape) == 2
        and shape[1] % quant_state.blocksize == 0
        and weight.numel() * 2 == shape[0] * shape[1]
        and not getattr(quant_state, "packing_format_for_cpu", False)
    )


def decode_args(weight: torch.Tensor, quant_state) -> tuple[tuple, dict]:
    """((absmaxes, code table, absmax2, code2, offset), meta-parameters): the kernels' arguments
    after the codes (`weight`, which they take first), cached on `weight`. Without double
    quantization the nested ones stand in with the absmaxes and the offset is 0.0. The cached
    meta dict is shared: callers pass it on (`**meta`), never change it."""
    cached = _DECODE.get(weight)
    if cached is None:
        nested = bool(quant_state.nested)
        s2: Any = quant_state.state2 if nested else None
        absmax = quant_state.absmax
        rest = (
            absmax,
            quant_state.code,
            s2.absmax if nested else absmax,
            s2.code if nested else absmax,
            float(quant_state.offset) if nested else 0.0,
        )
        meta = dict(
            BLOCKSIZE=quant_state.blocksize,
            BLOCKSIZE2=s2.blocksize if nested else 1,
            NESTED=nested,
            BN=TILE[0],
            BK=TILE[1],
            SPAN=min(quant_state.blocksize, TILE[1]),
        )
        cached = _DECODE[weight] = (rest, meta)
    return cached


def dequantize(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in `dtype` (bf16 or fp16) from a bitsandbytes 4-bit `weight` (the
    Parameter, which the offset is cached on; `kernel_fits` must hold): bitsandbytes' values, one
    launch. Without FP fusion: the absmax decode stays a multiply and then an add, as bitsandbytes
    rounds it (a fused multiply-add rounds once and can differ in the last bit)."""
    from triton import cdiv

    n, k = quant_state.shape
    rest, meta = decode_args(weight, quant_state)
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    soft_round = not weight.is_cuda and dtype == torch.bfloat16  # the interpreter's bf16 cast truncates
    _kernels().nf4_dequant_kernel[(cdiv(n, TILE[0]), cdiv(k, TILE[1]))](
        weight, *rest, out, n, k, **meta, SOFT_ROUND=soft_round, enable_fp_fusion=False
    )
    return out

"""FP8 scaling for the frozen base matmuls (`training.fp8`): amax, scales, quantize, `_scaled_mm`.

Dynamic scaling, one scale per row of the left operand and one per output (or input) channel of
the weight: `_scaled_mm`'s "rowwise" mode, which Hopper runs at about twice its bf16 rate. Scales
are *dequantization* scales (`t ≈ q * scale`), what `torch._scaled_mm` multiplies back in.

Written here rather than taken from torchao: torchao's Float8Linear converts trainable
`nn.Linear` modules (and their weight gradients); peftchat's frozen base is bitsandbytes NF4/int8
(or a frozen bf16 weight) wrapped by peft, which Float8Linear does not take, and the base needs no
weight gradient at all. What remains is the four small functions below.
"""

from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn  # activations and weights: 3 mantissa bits, max 448
E5M2 = torch.float8_e5m2  # wider range (max 57344), 2 mantissa bits: the usual gradient format
FP8_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}
# An all-zero row (padding) would give a zero scale and 0/0 = NaN; its values are all 0 anyway.
AMAX_FLOOR = 1e-12
# `_scaled_mm` on CUDA wants both matrix dimensions it reduces over / writes along divisible by 16.
FP8_ALIGN = 16


def amax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Largest |value| along `dim` (kept as a size-1 dim), in fp32."""
    return t.abs().amax(dim=dim, keepdim=True).float()


def dequant_scale(t_amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The scale that maps each slice's amax onto the largest finite value of `fp8_dtype`."""
    return t_amax.clamp(min=AMAX_FLOOR) / torch.finfo(fp8_dtype).max


def quantize(t: torch.Tensor, dim: int, fp8_dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, fp32 dequant scales) of `t`, one scale per slice along `dim`: ``dim=1`` on an
    (M, K) matrix gives per-row scales of shape (M, 1), ``dim=0`` per-column scales (1, K).

    The clamp only guards rounding at the top of the range: e4m3fn has no infinity, so a value
    that rounds past 448 would turn into NaN.
    """
    scale = dequant_scale(amax(t, dim), fp8_dtype)
    fmax = torch.finfo(fp8_dtype).max
    return (t.float() / scale).clamp(-fmax, fmax).to(fp8_dtype), scale


def fp8_shapes_fit(*dims: int) -> bool:
    """Whether every reduced/written dimension suits `_scaled_mm` (multiples of 16)."""
    return all(d % FP8_ALIGN == 0 for d in dims)


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)`` in fp8: `a` (M, K) row-major with scales (M, 1), `b` (K, N)
    column-major (the transpose of a row-major (N, K)) with scales (1, N); fp32 accumulation."""
    return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale.contiguous(), out_dtype=out_dtype)


def fp8_linear_eager(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ weight.T`` with x (M, K) in e4m3 per row and weight (N, K) in e4m3 per output channel."""
    xq, xs = quantize(x, 1)
    wq, ws = quantize(weight, 1)  # (N, K) row-major: its transpose is the column-major b
    return scaled_matmul(xq, xs, wq.t(), ws.t(), out_dtype)


def fp8_grad_input_eager(grad: torch.Tensor, weight: torch.Tensor, grad_dtype: torch.dtype, out_dtype: torch.dtype
                         ) -> torch.Tensor:
    """``grad @ weight`` (the input gradient of a linear): grad (M, N) per row in `grad_dtype`,
    weight (N, K) per input channel (its columns: the dimension the product keeps) in e4m3.

    `_scaled_mm` needs both operands contiguous along the reduced dimension (N here), so the
    quantized weight is written transposed: the one copy the FP8 backward cannot avoid.
    """
    gq, gs = quantize(grad, 1, grad_dtype)
    wq, ws = quantize(weight, 0)  # scales (1, K)
    return scaled_matmul(gq, gs, wq.t().contiguous().t(), ws, out_dtype)


@functools.cache
def _compiled(fn):
    # Eager, each quantization is five passes over its tensor (abs, amax, divide, clamp, cast) and
    # the transposed weight copy a slow 1-byte transpose; compiled, the amax and the scaled cast
    # fuse, the transpose is written tiled, and the whole product is one region (fewer launches).
    # Shapes start static; torch.compile makes them dynamic once a second size shows up.
    return torch.compile(fn)


# Both are called without grad (inside an autograd.Function); grad mode is pinned anyway because a
# change of it makes torch.compile recompile, and past its recompile limit it falls back to eager.
@torch.no_grad()
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_linear_eager`, compiled on CUDA (the same arithmetic)."""
    return (_compiled(fp8_linear_eager) if x.is_cuda else fp8_linear_eager)(x, weight, out_dtype)


@torch.no_grad()
def fp8_grad_input(grad: torch.Tensor, weight: torch.Tensor, grad_dtype: torch.dtype, out_dtype: torch.dtype
                   ) -> torch.Tensor:
    """`fp8_grad_input_eager`, compiled on CUDA (the same arithmetic)."""
    fn = _compiled(fp8_grad_input_eager) if grad.is_cuda else fp8_grad_input_eager
    return fn(grad, weight, grad_dtype, out_dtype)

"""FP8 scaling for the frozen base matmuls (`training.fp8`): amax, scales, quantize, `_scaled_mm`.

Dynamic scaling, one scale per row of the left operand and one per output (or input) channel of
the weight: `_scaled_mm`'s "rowwise" mode, which Hopper runs at about twice its bf16 rate. Scales
are *dequantization* scales (`t ≈ q * scale`), what `torch._scaled_mm` multiplies back in.

Written here rather than taken from torchao: torchao's Float8Linear converts trainable
`nn.Linear` modules (and their weight gradients); peftchat's frozen base is bitsandbytes NF4/int8
(or a frozen bf16 weight) wrapped by peft, which Float8Linear does not take, and the base needs no
weight gradient at all. What remains is small: the torch functions below (also the reference the
tests hold the kernels to), the Triton passes that replace them on CUDA (one read and one write
each, `fp8_kernels`), and `Fp8Passes`, which says which matmuls run in FP8.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from peftchat.kernels import nf4

E4M3 = torch.float8_e4m3fn  # activations and weights: 3 mantissa bits, max 448
E5M2 = torch.float8_e5m2  # wider range (max 57344), 2 mantissa bits: the usual gradient format
FP8_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}
# An all-zero row (padding) would give a zero scale and 0/0 = NaN; its values are all 0 anyway.
# Far below any real row: the input gradient's rows, times the weight's per-row scales folded into
# them, fell under the 1e-12 this was once and were flushed to zero (8B FP8 runs stopped
# learning). 1e-30 / 57344 is still a normal fp32 scale.
AMAX_FLOOR = 1e-30
# `_scaled_mm` on CUDA wants both matrix dimensions it reduces over / writes along divisible by 16.
FP8_ALIGN = 16


@dataclass(frozen=True)
class Fp8Passes:
    """Which of a frozen base linear's three matmuls run in FP8.

    `forward`: the forward whose output the loss sees. `recompute`: a checkpointed layer's
    forward replayed in backward, whose outputs only feed that layer's own backward.
    `grad_input`: the input gradient, its incoming gradient in `grad_dtype`.
    """

    forward: bool = False
    recompute: bool = True
    grad_input: bool = True
    grad_dtype: torch.dtype = E4M3


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


def scaled_matmul(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)`` in fp8: `a` (M, K) row-major with scales (M, 1), `b` (K, N)
    column-major (the transpose of a row-major (N, K)) with scales (1, N); fp32 accumulation."""
    return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale.contiguous(), out_dtype=out_dtype)


def fp8_linear_eager(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ weight.T`` with x (M, K) in e4m3 per row and weight (N, K) in e4m3 per output channel."""
    xq, xs = quantize(x, 1)
    wq, ws = quantize(weight, 1)  # (N, K) row-major: its transpose is the column-major b
    return scaled_matmul(xq, xs, wq.t(), ws.t(), out_dtype)


def fp8_grad_input_eager(
    grad: torch.Tensor, weight: torch.Tensor, grad_dtype: torch.dtype, out_dtype: torch.dtype
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
def fp8_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, grad_dtype: torch.dtype, out_dtype: torch.dtype
) -> torch.Tensor:
    """`fp8_grad_input_eager`, compiled on CUDA (the same arithmetic)."""
    fn = _compiled(fp8_grad_input_eager) if grad.is_cuda else fp8_grad_input_eager
    return fn(grad, weight, grad_dtype, out_dtype)


# --- Triton passes (peftchat.kernels.fp8_kernels): quantization in one read and one write -------
#
# Round 3's per-kernel timings on the H200 (benchmarks/results/checks/check_fp8_call2.json, 8192
# rows): quantizing x compiled took 0.106 ms at K = 4096 and 0.318 at 14,336; the NF4 dequant plus
# the weight's quantization 0.28 ms for gate/up and the transposed copy for the input gradient
# 0.37 ms, against a `_scaled_mm` saving of 0.12 (q/o) to 0.48 ms (down) over bf16: the FP8 layer
# ran no faster than bf16. The kernels below read each operand once and write it once.

# (mantissa bits, smallest normal, subnormal rounding constant, largest finite) per format
FP8_GRID = {E4M3: (3, 2.0**-6, 1.5 * 2.0**14, 448.0), E5M2: (2, 2.0**-14, 1.5 * 2.0**7, 57344.0)}


@functools.cache
def _kernels():
    try:
        from peftchat.kernels import fp8_kernels
    except ImportError:  # no Triton: the torch passes above
        return None
    return fp8_kernels


def kernels_on(t: torch.Tensor) -> bool:
    """Whether the Triton passes serve tensors like `t` (CUDA with Triton; the tests also run them
    on the CPU through Triton's interpreter)."""
    return t.is_cuda and _kernels() is not None


def quantize_rows(
    t: torch.Tensor, fp8_dtype: torch.dtype = E4M3, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(t * col_scale, 1, fp8_dtype)` of an (M, K) `t` (fp32 (K,) `col_scale` or None):
    one Triton pass on CUDA, else torch."""
    if kernels_on(t):
        return quantize_rows_triton(t, fp8_dtype, col_scale)
    return quantize(t.float() * col_scale if col_scale is not None else t, 1, fp8_dtype)


def quantize_rows_triton(
    t: torch.Tensor, fp8_dtype: torch.dtype = E4M3, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` by `fp8_kernels.quantize_rows_kernel` (also in Triton's CPU interpreter)."""
    import triton

    t = t.contiguous()
    m, k = t.shape
    q = torch.empty((m, k), dtype=fp8_dtype, device=t.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=t.device)
    mbits, min_normal, sub_magic, fmax = FP8_GRID[fp8_dtype]
    block = triton.next_power_of_2(k)
    if m:
        _kernels().quantize_rows_kernel[(m,)](
            t,
            col_scale if col_scale is not None else t,
            q,
            scale,
            m,
            k,
            AMAX_FLOOR,
            HAS_COL_SCALE=col_scale is not None,
            SOFT_ROUND=not t.is_cuda,
            MBITS=mbits,
            MIN_NORMAL=min_normal,
            SUB_MAGIC=sub_magic,
            FMAX=fmax,
            BK=block,
            num_warps=8 if block >= 8192 else 4,
        )
    return q, scale


# weight -> (the weight kernels' arguments after the codes: `nf4.decode_args`' and the e4m3 rows'
# scales; their meta-parameters), built once per frozen weight: one lookup per call on the hot
# path. Keyed as nf4's cache is (the Parameter itself, weakly).
_NF4_ARGS = WeakTensorKeyDictionary()


def _row_scales(quant_state) -> torch.Tensor:
    """(N,) fp32 dequant scales of the e4m3 rows of a 4-bit (N, K) weight. An NF4/FP4 code table
    holds ±1, so a row's largest |value| is its largest block |absmax| (decoded by bitsandbytes):
    no pass over the weight."""
    absmax = quant_state.absmax
    if quant_state.nested:
        import bitsandbytes.functional as bnb_f

        absmax = bnb_f.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    # |absmax|: a decoded nested absmax can be negative (small blocks under a large offset;
    # bitsandbytes' dequantization then flips the codes' signs, and so do the kernels)
    row_amax = absmax.float().abs().view(quant_state.shape[0], -1).amax(dim=1)
    return dequant_scale(row_amax, E4M3).contiguous()


def nf4_kernel_args(weight: torch.Tensor, quant_state) -> tuple[tuple, dict]:
    """(the weight kernels' arguments after the codes: `nf4.decode_args`' then the rows' scales,
    their meta-parameters) for a bitsandbytes 4-bit `weight`, cached on it. The meta
    dict is shared: pass it on, never change it."""
    cached = _NF4_ARGS.get(weight)
    if cached is None:
        rest, meta = nf4.decode_args(weight, quant_state)
        cached = _NF4_ARGS[weight] = ((*rest, _row_scales(quant_state)), {**meta, "SOFT_ROUND": not weight.is_cuda})
    return cached


def nf4_row_scales(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The (N,) e4m3 rows' scales of a 4-bit `weight` (cached with its kernel arguments)."""
    return nf4_kernel_args(weight, quant_state)[0][-1]


def nf4_to_fp8(
    weight: torch.Tensor, quant_state, rows: bool = True, transposed: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(e4m3 (N, K) weight or None, e4m3 (K, N) transposed copy or None, (N,) row scales) of a
    bitsandbytes 4-bit `weight` (the Parameter, which `nf4_kernel_args` caches on), from its codes
    (`nf4.kernel_fits` must hold). Without FP fusion, as `nf4.dequantize`: bitsandbytes' absmaxes
    bit for bit."""
    from triton import cdiv

    n, k = quant_state.shape
    rest, meta = nf4_kernel_args(weight, quant_state)
    grid = (cdiv(n, nf4.TILE[0]), cdiv(k, nf4.TILE[1]))
    out = out_t = None
    if rows:
        out = torch.empty((n, k), dtype=E4M3, device=weight.device)
        _kernels().nf4_to_fp8_kernel[grid](weight, *rest, out, n, k, **meta, enable_fp_fusion=False)
    if transposed:
        out_t = torch.empty((k, n), dtype=E4M3, device=weight.device)
        _kernels().nf4_to_fp8_t_kernel[grid](weight, *rest, out_t, n, k, **meta, enable_fp_fusion=False)
    return out, out_t, rest[-1]


@functools.cache
def ones_row(n: int, device: torch.device) -> torch.Tensor:
    """A (1, n) fp32 scale of ones (`_scaled_mm` wants a scale per output column)."""
    return torch.ones((1, n), dtype=torch.float32, device=device)


class LastQuantized:
    """The last (x, e4m3 rows of x) pair: q, k and v take the same x, as gate and up do, so it is
    quantized once. The entry keeps x alive, so no other tensor can take its memory while it is
    held: the same address, shape, strides and version counter mean the same values."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.version = -1
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.x
        if (
            held is None
            or held.data_ptr() != x.data_ptr()
            or held.shape != x.shape
            or held.stride() != x.stride()
            or held.dtype != x.dtype
            or x._version != self.version
        ):
            self.x, self.version, self.value = x, x._version, quantize_rows(x)
        assert self.value is not None  # set with self.x
        return self.value

    def clear(self) -> None:
        self.x = self.value = None

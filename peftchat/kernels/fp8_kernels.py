"""Triton kernels of peftchat.kernels.fp8 (imported only where Triton is installed).

Two memory-bound passes the FP8 base matmuls need, each one read and one write:

- `quantize_rows_kernel`: an (M, K) bf16 matrix to fp8 with one scale per row, optionally
  multiplied first by one factor per column (the weight's per-channel scales, folded into the
  incoming gradient so that one fp8 weight serves forward and backward).
- `nf4_to_fp8_kernel` / `nf4_to_fp8_t_kernel`: a bitsandbytes NF4 weight straight to fp8, rows
  (N, K) or transposed (K, N), with no bf16 copy in between, a tile at a time with one absmax per
  block (`nf4_tile_e4m3`). The 4-bit
  decode is peftchat.kernels.nf4_kernels'.

Divisions are `tl.math.div_rn` (IEEE, as torch divides): Triton's `/` on fp32 compiles to
div.full.f32, 2 ulp off, which moved 2-3e-5 of the quantized gradient values from torch's.
On the GPU the cast to fp8 is the hardware's (`cvt.rn.satfinite`: nearest even). In Triton's
CPU interpreter (the tests) it is not: it mis-rounds values that carry into the next power of two
(7.88 -> 4 instead of 8 in e4m3), so with SOFT_ROUND the kernels round to the fp8 grid themselves
(`round_to_fp8`, nearest even too) and the cast is then exact. On the GPU the kernels' bits were
compared with torch's casts (the retired check_fp8.py; benchmarks/HISTORY.md, round 9).
"""

import triton
import triton.language as tl

from peftchat.kernels.nf4_kernels import nf4_tile_values


@triton.jit
def to_fp8_grid(
    v,
    SOFT_ROUND: tl.constexpr,
    MBITS: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUB_MAGIC: tl.constexpr,
    FMAX: tl.constexpr,
):
    # v ready for the cast to fp8: rounded here under SOFT_ROUND, else only clamped (the cast rounds)
    if SOFT_ROUND:
        return round_to_fp8(v, MBITS, MIN_NORMAL, SUB_MAGIC, FMAX)
    return tl.minimum(tl.maximum(v, -FMAX), FMAX)


@triton.jit
def round_to_fp8(v, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr, FMAX: tl.constexpr):
    # fp32 v rounded to nearest even on the grid of an fp8 format with MBITS mantissa bits:
    # normal values by rounding the fp32 mantissa in integer arithmetic (a carry moves into the
    # exponent, as it should), subnormals (|v| < MIN_NORMAL, a fixed spacing) by adding and
    # subtracting a constant whose fp32 spacing is that of the fp8 subnormals. Written out rather
    # than left to the cast so that it is exact in the interpreter too (module docstring).
    DROP: tl.constexpr = 23 - MBITS
    bits = v.to(tl.uint32, bitcast=True)
    lsb = (bits >> DROP) & 1
    normal = (((bits + ((1 << (DROP - 1)) - 1) + lsb) >> DROP) << DROP).to(tl.float32, bitcast=True)
    sub = (tl.abs(v) + SUB_MAGIC) - SUB_MAGIC
    # the sign from the sign bit, as a cast keeps it: of values that round to zero, and of -0.0
    # (a code 0 times a negative absmax; `v < 0` would lose it)
    sub = tl.where((bits >> 31) != 0, -sub, sub)
    r = tl.where(tl.abs(v) < MIN_NORMAL, sub, normal)
    return tl.minimum(tl.maximum(r, -FMAX), FMAX)


# M (the batch's token count) changes with packed batches: not specialised on (lora_dropout_kernels).
@triton.jit(do_not_specialize=["M"])
def quantize_rows_kernel(
    x_ptr,
    col_scale_ptr,
    q_ptr,
    scale_ptr,
    M,
    K,
    amax_floor,
    HAS_COL_SCALE: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    MBITS: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUB_MAGIC: tl.constexpr,
    FMAX: tl.constexpr,
    BK: tl.constexpr,
):
    # one row per program, held whole in registers (BK = K rounded up to a power of two)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BK)
    inside = cols < K
    v = tl.load(x_ptr + row * K + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        v = v * tl.load(col_scale_ptr + cols, mask=inside, other=0.0)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=0), amax_floor), FMAX)
    q = to_fp8_grid(tl.math.div_rn(v, scale), SOFT_ROUND, MBITS, MIN_NORMAL, SUB_MAGIC, FMAX)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(scale_ptr + row, scale)


@triton.jit
def nf4_tile_e4m3(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    row_scale_ptr,
    n,
    pid_k,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPAN: tl.constexpr,
):
    # The (BN, BK) tile of rows n ((BN, 1) int64) and columns from pid_k * BK of a bitsandbytes
    # 4-bit weight in e4m3, divided by their row's scale, from `nf4_tile_values` (one load of the
    # tile's bytes, one absmax per block: for a 14336 x 4096 weight 0.198 ms on an H200, against
    # 0.551 for a kernel reading each element's code byte and absmax on its own, now deleted)
    v = nf4_tile_values(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        absmax2_ptr,
        code2_ptr,
        offset,
        n,
        pid_k,
        N,
        K,
        BLOCKSIZE,
        BLOCKSIZE2,
        NESTED,
        BN,
        BK,
        SPAN,
    )
    v = tl.math.div_rn(v, tl.load(row_scale_ptr + n, mask=n < N, other=1.0))
    return to_fp8_grid(v, SOFT_ROUND, 3, 0.015625, 24576.0, 448.0).to(tl.float8e4nv)  # e4m3: see fp8.FP8_GRID


@triton.jit
def nf4_to_fp8_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    row_scale_ptr,
    out_ptr,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPAN: tl.constexpr,
):
    # the (N, K) e4m3 weight, a (BN, BK) tile per program (nf4_tile_e4m3)
    n = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)[:, None]
    k = (tl.program_id(1) * BK + tl.arange(0, BK))[None, :]
    inside = (n < N) & (k < K)
    q = nf4_tile_e4m3(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        absmax2_ptr,
        code2_ptr,
        offset,
        row_scale_ptr,
        n,
        tl.program_id(1),
        N,
        K,
        BLOCKSIZE,
        BLOCKSIZE2,
        NESTED,
        SOFT_ROUND,
        BN,
        BK,
        SPAN,
    )
    tl.store(out_ptr + n * K + k, q, mask=inside)


@triton.jit
def nf4_to_fp8_t_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    row_scale_ptr,
    out_ptr,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPAN: tl.constexpr,
):
    # the transposed (K, N) e4m3 weight, the (BN, BK) weight tile per program stored as its (BK, BN)
    # transpose: the rows tile transposed in registers (tl.trans) so that both the loads and the
    # stores run along contiguous memory (0.194 ms for 14336 x 4096 on an H200, against 0.37 ms
    # for torch's transpose of the rows).
    # One kernel writing both layouts (the (BN, BK) tile also stored transposed) was bit-exact
    # alone on the GPU, yet 1B/8B runs using it blew their gradients up (not explained), so each
    # layout has its own kernel and store.
    n = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)[:, None]
    q = nf4_tile_e4m3(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        absmax2_ptr,
        code2_ptr,
        offset,
        row_scale_ptr,
        n,
        tl.program_id(1),
        N,
        K,
        BLOCKSIZE,
        BLOCKSIZE2,
        NESTED,
        SOFT_ROUND,
        BN,
        BK,
        SPAN,
    )
    q = tl.trans(q)
    n = tl.trans(n)  # (1, BN)
    k = (tl.program_id(1) * BK + tl.arange(0, BK)).to(tl.int64)[:, None]
    inside = (n < N) & (k < K)
    tl.store(out_ptr + k * N + n, q, mask=inside)

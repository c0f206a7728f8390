"""Triton kernels of peftchat.model.fp8 (imported only where Triton is installed).

Two memory-bound passes the FP8 base matmuls need, each one read and one write:

- `quantize_rows_kernel`: an (M, K) bf16 matrix to fp8 with one scale per row, optionally
  multiplied first by one factor per column (the weight's per-channel scales, folded into the
  incoming gradient so that one fp8 weight serves forward and backward).
- `nf4_to_fp8_kernel`: a bitsandbytes NF4 weight straight to fp8, rows (N, K) and/or transposed
  (K, N), with no bf16 copy in between.

On the GPU the cast to fp8 is the hardware's (`cvt.rn.satfinite`: nearest even). In Triton's
CPU interpreter (the tests) it is not: it mis-rounds values that carry into the next power of two
(7.88 -> 4 instead of 8 in e4m3), so with SOFT_ROUND the kernels round to the fp8 grid themselves
(`round_to_fp8`, nearest even too) and the cast is then exact. check_fp8.py compares the GPU's
bits with torch's casts.
"""

import triton
import triton.language as tl


@triton.jit
def to_fp8_grid(v, SOFT_ROUND: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                SUB_MAGIC: tl.constexpr, FMAX: tl.constexpr):
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
    sub = tl.where(v < 0, -sub, sub)  # keeps the sign of values that round to zero, as a cast does
    r = tl.where(tl.abs(v) < MIN_NORMAL, sub, normal)
    return tl.minimum(tl.maximum(r, -FMAX), FMAX)


# M (the batch's token count) changes with packed batches: not specialised on (lora_dropout_kernels).
@triton.jit(do_not_specialize=["M"])
def quantize_rows_kernel(x_ptr, col_scale_ptr, q_ptr, scale_ptr, M, K, amax_floor,
                         HAS_COL_SCALE: tl.constexpr, SOFT_ROUND: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                         SUB_MAGIC: tl.constexpr, FMAX: tl.constexpr, BK: tl.constexpr):
    # one row per program, held whole in registers (BK = K rounded up to a power of two)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BK)
    inside = cols < K
    v = tl.load(x_ptr + row * K + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        v = v * tl.load(col_scale_ptr + cols, mask=inside, other=0.0)
    scale = tl.maximum(tl.max(tl.abs(v), axis=0), amax_floor) / FMAX
    q = to_fp8_grid(v / scale, SOFT_ROUND, MBITS, MIN_NORMAL, SUB_MAGIC, FMAX)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(scale_ptr + row, scale)


@triton.jit
def nf4_to_fp8_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, row_scale_ptr,
                      out_ptr, out_t_ptr, N, K,
                      BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                      WRITE_ROWS: tl.constexpr, WRITE_T: tl.constexpr, SOFT_ROUND: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr):
    # bitsandbytes' NF4 layout: the (N, K) weight flattened row-major, two codes a byte (the even
    # element in the high nibble), one absmax per BLOCKSIZE elements; with NESTED (double
    # quantization) each absmax is itself a uint8 code into code2, times absmax2 per BLOCKSIZE2
    # absmax values, plus offset. Element (n, k) = code[nibble] * absmax, here divided by its
    # row's fp8 scale. K is a multiple of BLOCKSIZE (the caller checks), so rows start on a byte.
    # Each element loads its own byte (the pair's second load hits the cache): a tl.join of the
    # two nibbles, exact in the interpreter, gave a weight under which the 8B run stopped
    # learning on the GPU (r23; not isolated further).
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    n64 = n.to(tl.int64)
    inside = (n[:, None] < N) & (k[None, :] < K)
    byte = tl.load(packed_ptr + n64[:, None] * (K // 2) + k[None, :] // 2, mask=inside, other=0)
    nibble = (byte >> ((1 - k[None, :] % 2) * 4).to(tl.uint8)) & 15  # the even element is the high nibble
    block = (n64[:, None] * K + k[None, :]) // BLOCKSIZE
    if NESTED:
        absmax_code = tl.load(absmax_ptr + block, mask=inside, other=0)
        absmax = (tl.load(code2_ptr + absmax_code.to(tl.int32)) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=inside, other=0.0)
                  + offset)
    else:
        absmax = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    v = tl.load(code_ptr + nibble.to(tl.int32)) * absmax
    v = v / tl.load(row_scale_ptr + n, mask=n < N, other=1.0)[:, None]
    q = to_fp8_grid(v, SOFT_ROUND, 3, 0.015625, 24576.0, 448.0).to(tl.float8e4nv)  # e4m3: see fp8.FP8_GRID
    if WRITE_ROWS:
        tl.store(out_ptr + n64[:, None] * K + k[None, :], q, mask=inside)
    if WRITE_T:
        tl.store(out_t_ptr + k[None, :].to(tl.int64) * N + n[:, None], q, mask=inside)

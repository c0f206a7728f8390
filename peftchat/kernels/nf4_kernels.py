"""Triton kernels that read a bitsandbytes 4-bit (NF4 or FP4) weight from its codes: the decode
shared by the FP8 weight kernels (peftchat.kernels.fp8_kernels) and the dequantization to bf16 /
fp16 (`nf4_dequant_kernel`, peftchat.kernels.nf4).

The layout: the (N, K) weight flattened row-major, two codes a byte (the even element in the high
nibble), one absmax per BLOCKSIZE elements; with double quantization (NESTED) each absmax is
itself a uint8 code into code2, times absmax2 per BLOCKSIZE2 absmax values, plus an offset. An
element is code[nibble] * absmax, computed in fp32 as bitsandbytes computes it.
"""

import triton
import triton.language as tl


@triton.jit
def block_absmax(
    absmax_ptr, absmax2_ptr, code2_ptr, offset, block, mask, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr
):
    # The absmax of blocks `block`: stored as is, or with NESTED (double quantization) a uint8 code
    # into code2, times absmax2 per BLOCKSIZE2 absmax values, plus offset (can come out negative).
    if NESTED:  # a constexpr branch: only one is compiled, so one return (Triton types every return)
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0)
        absmax = (
            tl.load(code2_ptr + absmax_code.to(tl.int32))
            * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
            + offset
        )
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_tile_values(
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
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPAN: tl.constexpr,
):
    # The fp32 values of the (BN, BK) tile of rows n ((BN, 1) int64) and columns from pid_k * BK.
    # Per element, a thread of a per-element kernel (deleted) issued a byte load for its code and
    # three more (absmax code, its code2 entry, absmax2) for an absmax that 64 elements share:
    # compiled for sm_90, 128 one-byte and 192 four-byte loads per thread for a 64 x 128 tile (the
    # PTX, benchmarks/HISTORY.md). Here the codes come from one load of the tile's bytes, each
    # byte's two nibbles joined side by side (2.6x faster alone on an H200, gate/up 0.15 ms against
    # 0.40), and the absmax once per block (SPAN = min(BLOCKSIZE,
    # BK) columns), broadcast over its columns.
    half = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    byte = tl.load(packed_ptr + n * (K // 2) + half[None, :], mask=(n < N) & (half[None, :] < K // 2), other=0)
    nibble = tl.reshape(tl.join(byte >> 4, byte & 15), (BN, BK))  # the even element is the high nibble
    span = pid_k * BK + tl.arange(0, BK // SPAN) * SPAN  # first column of each block part in the tile
    block_ok = (n < N) & (span[None, :] < K)
    absmax = block_absmax(
        absmax_ptr, absmax2_ptr, code2_ptr, offset, (n * K + span[None, :]) // BLOCKSIZE, block_ok, BLOCKSIZE2, NESTED
    )  # (BN, BK // SPAN)
    absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (BN, BK // SPAN, SPAN)), (BN, BK))
    return tl.load(code_ptr + nibble.to(tl.int32)) * absmax


@triton.jit
def round_to_bf16(v):
    # fp32 v rounded to nearest even on the bf16 grid, in integer arithmetic, so that the cast
    # after it is exact: Triton's CPU interpreter casts fp32 to bf16 by truncating (the GPU's cast
    # rounds to nearest even); finite values only, which weights are
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def nf4_dequant_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset,
    out_ptr,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPAN: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    # the (N, K) weight in out_ptr's dtype, a (BN, BK) tile per program; one launch where
    # bitsandbytes' dequantize_4bit makes three for a double-quantized weight (the absmaxes, their
    # offset, the weight). SOFT_ROUND: bf16 in the interpreter (`round_to_bf16`).
    n = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)[:, None]
    k = (tl.program_id(1) * BK + tl.arange(0, BK))[None, :]
    v = nf4_tile_values(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        absmax2_ptr,
        code2_ptr,
        offset,
        n,
        tl.program_id(1),
        N,
        K,
        BLOCKSIZE,
        BLOCKSIZE2,
        NESTED,
        BN,
        BK,
        SPAN,
    )
    if SOFT_ROUND:
        v = round_to_bf16(v)
    tl.store(out_ptr + n * K + k, v.to(out_ptr.dtype.element_ty), mask=(n < N) & (k < K))

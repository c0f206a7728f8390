"""Triton kernels of peftchat.kernels.lora_dropout (imported only where Triton is installed).

Kept in a module of their own because Triton resolves the helpers a kernel calls (`keep_tile`)
from the kernel's module globals, and this module needs Triton at import time.
"""

import triton
import triton.language as tl


@triton.jit
def keep_tile(seed, rows, k0, K, thr, BM: tl.constexpr, BK: tl.constexpr):
    # (BM, BK) keep mask of rows `rows`, columns k0 .. k0 + BK (k0 a multiple of 8). Built as
    # (BM, BK / 8, 8), each Philox call's eight parts along the last axis, then merged, with no
    # tl.join shuffle of the four words: the way down and grad_a were measured at their TILES in
    # on the H200 (down 0.069 ms at K = 4096). keep_tile_joined draws the same bits the other way.
    G: tl.constexpr = BK // 8
    groups = k0 // 8 + tl.arange(0, G)
    counter = (rows[:, None, None].to(tl.int64) * (K // 8) + groups[None, :, None]).to(tl.uint32)  # (BM, G, 1)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    part = tl.arange(0, 8)[None, None, :]
    # element 8g + e takes 16 bits of word e // 2 of (r0, r2, r1, r3), the low half for even e
    word = tl.where(part < 4, tl.where(part < 2, r0, r2), tl.where(part < 6, r1, r3))
    bits = (word >> ((part % 2) * 16).to(tl.uint32)) & 0xFFFF
    return tl.reshape(bits >= thr, (BM, BK))


@triton.jit
def keep_tile_joined(seed, rows, k0, K, thr, BM: tl.constexpr, BK: tl.constexpr):
    # keep_tile's very bits, drawn as (BM, BK / 8) and spread by tl.join/reshape: where the mask
    # meets a tl.dot result (grad_input) rather than a loaded tile, this layout ran faster on the
    # H200 (K = 4096: 0.073 ms against 0.117 with keep_tile)
    groups = k0 // 8 + tl.arange(0, BK // 8)
    counter = (rows[:, None].to(tl.int64) * (K // 8) + groups[None, :]).to(tl.uint32)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    u = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BM, BK // 8, 4))  # words r0 r2 r1 r3
    bits = tl.reshape(tl.join(u & 0xFFFF, u >> 16), (BM, BK))  # element j takes part j % 8
    return bits >= thr


# The row count M changes with every packed batch: not specialised on (Triton would compile a new
# variant whenever M's divisibility by 16 changes; most likely what stalled a timed step of round
# 5's packed run for about 3 s). Nor the seed, a new int64 each call (lora_dropout.new_seed).
@triton.jit(do_not_specialize=["M", "seed"])
def lora_down_kernel(
    x_ptr, a_ptr, out_ptr, seed, M, K, R, thr, scale, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr
):
    # K is walked from 0 in steps of BK, so the compiler sees every column start 16-aligned: a
    # start at a runtime multiple (a K split, since removed) made it load x one bf16 per thread
    # with no cp.async pipelining in the sm_90 PTX
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
            mask=(rows[:, None] < M) & (cols[None, :] < K),
            other=0.0,
        )
        x = tl.where(keep_tile(seed, rows, k0, K, thr, BM, BK), x, tl.zeros_like(x))
        a_t = tl.load(
            a_ptr + rr[None, :] * K + cols[:, None], mask=(rr[None, :] < R) & (cols[:, None] < K), other=0.0
        )  # (BK, BR): A.T's tile
        acc += tl.dot(x, a_t.to(x.dtype))  # A in its own dtype (fp32 adapters): no cast kernel per call
    acc = acc * scale
    tl.store(
        out_ptr + rows[:, None] * R + rr[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (rr[None, :] < R),
    )


@triton.jit(do_not_specialize=["M", "rows_per_split", "seed"])
def lora_grad_a_kernel(
    x_ptr,
    g_ptr,
    part_ptr,
    seed,
    M,
    K,
    R,
    rows_per_split,
    thr,
    scale,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    # partial sums of G.T @ dropped x over one slice of rows; fp32 (split, K, BR) parts
    k0 = tl.program_id(0) * BK
    split = tl.program_id(1)
    cols = k0 + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BK, BR), dtype=tl.float32)
    first = split * rows_per_split
    for m0 in range(first, tl.minimum(first + rows_per_split, M), BM):
        rows = m0 + tl.arange(0, BM)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
            mask=(rows[:, None] < M) & (cols[None, :] < K),
            other=0.0,
        )
        x = tl.where(keep_tile(seed, rows, k0, K, thr, BM, BK), x, tl.zeros_like(x))
        g = tl.load(g_ptr + rows[:, None] * R + rr[None, :], mask=(rows[:, None] < M) & (rr[None, :] < R), other=0.0)
        acc += tl.dot(tl.trans(x), g)
    tl.store(
        part_ptr + (split * K + cols[:, None]).to(tl.int64) * BR + rr[None, :], acc * scale, mask=cols[:, None] < K
    )


@triton.jit(do_not_specialize=["M", "seed"])
def lora_grad_input_kernel(
    g_ptr, a_ptr, out_ptr, seed, M, K, R, thr, scale, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    g = tl.load(g_ptr + rows[:, None] * R + rr[None, :], mask=(rows[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
    out = tl.dot(g, a.to(g.dtype))
    out = tl.where(keep_tile_joined(seed, rows, k0, K, thr, BM, BK), out * scale, 0.0)
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (cols[None, :] < K),
    )


@triton.jit(do_not_specialize=["M", "seed"])
def lora_keep_mask_kernel(out_ptr, seed, M, K, thr, BM: tl.constexpr, BK: tl.constexpr, JOINED: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    if JOINED:
        keep = keep_tile_joined(seed, rows, k0, K, thr, BM, BK)
    else:
        keep = keep_tile(seed, rows, k0, K, thr, BM, BK)
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
        keep.to(tl.int8),
        mask=(rows[:, None] < M) & (cols[None, :] < K),
    )

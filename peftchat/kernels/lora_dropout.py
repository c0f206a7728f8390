"""LoRA's input dropout drawn inside its own matmuls (Triton), for the fused LoRA function.

Why by hand: at LoRA dropout > 0 the dropout of the layer input was the largest cost of LoRA in
an 8B QLoRA step. torch's dropout reads x and writes a dropped copy and a bool mask, and a
checkpointed layer draws it three times per step (forward, recompute, backward); the copies are
then read again by the LoRA matmuls. Profiled on the H200 (lean, 8B NF4, 4 x 2048):
66 of the 140 ms/step of LoRA kernels were `fused_dropout` and `masked_scale`. Neither torch,
liger-kernel nor peft has a matmul that drops its input on the fly; this module is three small
ones, each reading x (or writing the input gradient) once and drawing the mask in registers:

    down(x, A)          (x * keep * scale) @ A.T                  forward and recompute, (M, r)
    grad_a(x, G)        G.T @ (x * keep * scale)                  backward, LoRA A's gradient (r, K)
    grad_input(G, A)    (G @ A) * keep * scale                    backward, LoRA's part of x's gradient

The keep mask is a function of a seed and the element's place only, never of the tiling:
element (i, j) of an (M, K) input takes 16 bits of Philox-4x32-10 (Triton's `randint4x`) at
counter (i * K + j) // 8, part j % 8, and is kept when those bits are >= round(p * 65536). One
Philox call thus serves eight elements (a call per element would be eight times the Philox
work, in kernels that already run well above the bandwidth bound). The
drop probability is that threshold / 65536 (0.05 -> 0.0500031) and kept values are scaled by
65536 / (65536 - threshold), so the expectation is exact. The masks are other draws than torch's
dropout (peft's layers): same distribution, not the same bits.

The seed is an int64 taken from torch's CUDA generator on the host: its Philox offset, advanced
by 4 as a kernel drawing four numbers would (no device work: the first kernels drew it with a
`torch.randint` launch per LoRA call). A checkpointed layer's recompute restores that
generator's state, so it takes the same seed and draws the same masks.

The LoRA scaling goes into the kernels' scale too (x @ A.T is saved for backward with it), so no
separate kernel multiplies by it, and A is read in its own dtype (fp32 adapters are cast in
the kernel, not by a copy per call).

Measured (8B NF4 4 x 2048 on an H200, one run): lean 8B NF4 10,583 tok/s against 10,030
with torch's dropout, peak 7.64 GiB against 7.86; loss within 0.025 % of peft's layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

PHILOX_BITS = 16  # bits of a Philox output per element: eight elements per call
THRESHOLD_SCALE = 1 << PHILOX_BITS
GROUP = 8  # elements sharing one Philox call: K must be a multiple of it
MAX_ELEMENTS = 1 << 32  # counters (elements / 8) stay below 2**29 in uint32 arithmetic
TARGET_PROGRAMS = 264  # two per multiprocessor on the H200 (132)


@functools.cache
def _triton():
    try:
        import triton
    except ImportError:
        return None
    return triton


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA with Triton installed."""
    return device.type == "cuda" and _triton() is not None


def usable(x: torch.Tensor, lora_a: torch.Tensor, p: float) -> bool:
    """Whether an (M, K) `x` with LoRA A (r, K) can take the kernels at dropout `p`."""
    m, k = x.shape
    # under torch.compile (training.compile with fused_lora: true) torch's dropout stays: the
    # kernels' launches are not traced or checked there
    return (
        0 < p < 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and lora_a.shape[0] <= 128
        and k % GROUP == 0
        and m * k < MAX_ELEMENTS
        and x.is_contiguous()
        and available(x.device)
        and not torch.compiler.is_compiling()
    )


def threshold(p: float) -> int:
    """16-bit threshold below which an element is dropped (at least 1, at most 65535)."""
    return min(THRESHOLD_SCALE - 1, max(1, round(p * THRESHOLD_SCALE)))


def keep_scale(p: float) -> float:
    """What kept values are multiplied by: 1 / (1 - the drop probability `threshold` gives)."""
    return THRESHOLD_SCALE / (THRESHOLD_SCALE - threshold(p))


SEED_TAG = 1 << 62  # every seed >= 2**32: Triton types the argument int64 every call (one compiled variant)


def new_seed(device: torch.device) -> int:
    """A seed for one LoRA call's masks, from torch's generator on `device` (restored by
    checkpointing, so a recompute gets the same one). CUDA: the generator's Philox offset, which
    this advances by 4, with its initial seed; no device work. CPU (Triton's interpreter, tests):
    a draw from torch's CPU generator."""
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return SEED_TAG | ((gen.initial_seed() & 0x3FFFFFFF) << 32) | ((offset // 4) & 0xFFFFFFFF)
    return SEED_TAG | int(torch.randint(0, 2**31 - 1, (1,)).item())


def block_r(r: int) -> int:
    """The kernels' tile width for LoRA rank `r` (a multiple of 16)."""
    return max(16, 1 << (r - 1).bit_length())  # tl.dot wants every dimension >= 16


@functools.cache
def _kernels():
    from peftchat.kernels import lora_dropout_kernels as k

    return _triton(), k.lora_down_kernel, k.lora_grad_a_kernel, k.lora_grad_input_kernel, k.lora_keep_mask_kernel


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: BM rows by BK columns per program (BK a multiple of GROUP, so
    every tile starts on a Philox group; the mask does not depend on them), warps, pipeline stages."""

    bm: int = 64
    bk: int = 128
    warps: int = 4
    stages: int = 3


# The fastest of ten launch shapes per kernel in a sweep on the H200 (M = 8192, r = 16; ms at
# K = 4096 / 14336; the sweep's numbers in benchmarks/HISTORY.md): down 32 x 128, 4 warps, 4
# stages 0.074 / 0.158 (64 x 128: 0.094 / 0.234); grad_a 64 x 128, 8 warps 0.084 /
# 0.175 (0.090 / 0.195); grad_input kept at 64 x 128, 4 warps, 2 stages, 0.073 / 0.173. Splitting
# down's K over two or four programs (fp32 partial sums) was no faster (0.118-0.134 at 4096).
TILES = {"down": Tiles(bm=32, stages=4), "grad_a": Tiles(warps=8), "grad_input": Tiles(stages=2)}


def down(
    x: torch.Tensor, lora_a: torch.Tensor, seed: int, p: float, scale: float = 1.0, tiles: Optional[Tiles] = None
) -> torch.Tensor:
    """(x * keep * keep_scale) @ lora_a.T * scale for (M, K) x and (r, K) lora_a, in x's dtype.
    `tiles`: the launch shape (by default the measured `TILES`; the draws do not depend on it)."""
    triton, kernel, *_ = _kernels()
    m, k = x.shape
    r = lora_a.shape[0]
    t = tiles or TILES["down"]
    out = torch.empty(m, r, device=x.device, dtype=x.dtype)
    kernel[(triton.cdiv(m, t.bm),)](
        x,
        lora_a.contiguous(),
        out,
        seed,
        m,
        k,
        r,
        threshold(p),
        keep_scale(p) * scale,
        BM=t.bm,
        BK=t.bk,
        BR=block_r(r),
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return out


def grad_a(
    x: torch.Tensor, grad_xa: torch.Tensor, seed: int, p: float, scale: float = 1.0, tiles: Optional[Tiles] = None
) -> torch.Tensor:
    """grad_xa.T @ (x * keep * keep_scale) * scale: LoRA A's gradient (r, K), in fp32."""
    triton, _, kernel, *_ = _kernels()
    m, k = x.shape
    r = grad_xa.shape[1]
    t = tiles or TILES["grad_a"]
    col_blocks = triton.cdiv(k, t.bk)
    # rows are split across programs so that a narrow K (4096 / 128 = 32 blocks) still fills the GPU
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, col_blocks), triton.cdiv(m, t.bm)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), t.bm) * t.bm
    splits = triton.cdiv(m, rows_per_split)
    br = block_r(r)
    parts = torch.empty(splits, k, br, device=x.device, dtype=torch.float32)
    kernel[(col_blocks, splits)](
        x,
        grad_xa.contiguous(),
        parts,
        seed,
        m,
        k,
        r,
        rows_per_split,
        threshold(p),
        keep_scale(p) * scale,
        BM=t.bm,
        BK=t.bk,
        BR=br,
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return (parts[0] if splits == 1 else parts.sum(0))[:, :r].t()


def grad_input(
    grad_xa: torch.Tensor, lora_a: torch.Tensor, seed: int, p: float, scale: float = 1.0, tiles: Optional[Tiles] = None
) -> torch.Tensor:
    """(grad_xa @ lora_a) * keep * keep_scale * scale: LoRA's part of the layer input's gradient
    (M, K), in grad_xa's dtype."""
    triton, _, _, kernel, _ = _kernels()
    m, r = grad_xa.shape
    k = lora_a.shape[1]
    out = torch.empty(m, k, device=grad_xa.device, dtype=grad_xa.dtype)
    t = tiles or TILES["grad_input"]
    kernel[(triton.cdiv(m, t.bm), triton.cdiv(k, t.bk))](
        grad_xa.contiguous(),
        lora_a.contiguous(),
        out,
        seed,
        m,
        k,
        r,
        threshold(p),
        keep_scale(p) * scale,
        BM=t.bm,
        BK=t.bk,
        BR=block_r(r),
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return out


def keep_mask(
    seed: int,
    m: int,
    k: int,
    p: float,
    tiles: Tiles = Tiles(),
    joined: bool = False,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """The (m, k) bool keep mask the kernels draw from `seed` on `device` (for tests and checks);
    `joined`: through grad_input's way of drawing it (the same bits)."""
    triton, *_, kernel = _kernels()
    out = torch.empty(m, k, device=device, dtype=torch.int8)
    kernel[(triton.cdiv(m, tiles.bm), triton.cdiv(k, tiles.bk))](
        out, seed, m, k, threshold(p), BM=tiles.bm, BK=tiles.bk, JOINED=joined
    )
    return out.bool()

"""Do the NF4 -> e4m3 weight kernels store only inside their outputs, and leave their inputs alone?

Round 7's fault 2 (RESULTS.md): the kernel that stored both weight layouts from one tile matched
the reference bit for bit when checked alone on the GPU, yet every run that used its transposed
store blew the LoRA gradients up ~1e7-fold, even when that copy was never read (probe
`rec_keep`). A store outside its tensor fits that evidence, and a check of the output's values
alone cannot see one. Here each kernel writes into a view in the middle of a buffer filled with
a sentinel byte, and the check counts bytes changed outside the view, bytes inside never written,
values unlike the reference, and changed input bytes (codes, absmaxes, tables, row scales).

Kernels: `rows`, `transposed`, `rows_tiled`, `transposed_tiled` (peftchat.model.fp8_kernels:
what the tree runs, the `+fp8tk` and `+fp8tiles` ablations) and `both` (round 7's kernel, rebuilt below from
commit baa9780^ so that the suspect itself is checked; delete it once fault 2 is settled).

    python3 -m benchmarks.fp8_store_bounds --out $OUT/bounds                   # 1B and 8B linears, CUDA
    python -m benchmarks.fp8_store_bounds --out /tmp/b --device cpu --shapes 96x320   # interpreter

Writes `fp8_store_bounds.json`; prints one line per shape and kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # Triton decides interpreted or compiled as it decorates
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from peftchat.model import fp8, nf4  # noqa: E402
from peftchat.model.fp8_kernels import nf4_codes, nf4_e4m3  # noqa: E402

# (out features N, in features K) of the 1B and 8B Llama shapes' linears (benchmarks/shapes.py)
SHAPES = {"1b_q_o": (2048, 2048), "1b_k_v": (512, 2048), "1b_gate_up": (8192, 2048), "1b_down": (2048, 8192),
          "8b_q_o": (4096, 4096), "8b_k_v": (1024, 4096), "8b_gate_up": (14336, 4096), "8b_down": (4096, 14336)}
SENTINEL = 0x7F  # e4m3fn NaN: the kernels clamp, so they never store it
GUARD = 1 << 16  # sentinel bytes on each side of an output


@triton.jit
def both_layouts_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, row_scale_ptr,
                        out_ptr, out_t_ptr, N, K, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                        NESTED: tl.constexpr, SOFT_ROUND: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # round 7's kernel: one (BN, BK) tile stored to the rows and, transposed, to out_t, its index
    # arithmetic as it was (int32 n and k, widened where multiplied); the element values come
    # from nf4_e4m3, the same loads and arithmetic, factored out of this kernel in baa9780
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    n64 = n.to(tl.int64)
    inside = (n[:, None] < N) & (k[None, :] < K)
    q = nf4_e4m3(nf4_codes(packed_ptr, n64[:, None], k[None, :], inside, K), absmax_ptr, code_ptr, absmax2_ptr,
                 code2_ptr, offset, row_scale_ptr, n64[:, None], k[None, :], inside, K, BLOCKSIZE, BLOCKSIZE2, NESTED,
                 SOFT_ROUND)
    tl.store(out_ptr + n64[:, None] * K + k[None, :], q, mask=inside)
    tl.store(out_t_ptr + k[None, :].to(tl.int64) * N + n[:, None], q, mask=inside)


def guarded(numel: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a sentinel-filled uint8 buffer, the e4m3 view of `numel` bytes in its middle)."""
    buf = torch.full((GUARD + numel + GUARD,), SENTINEL, dtype=torch.uint8, device=device)
    return buf, buf[GUARD:GUARD + numel].view(fp8.E4M3)


def nf4_weight(n: int, k: int, device: str, seed: int = 0):
    """(packed codes, quant state, exact fp32 (N, K) weight) of a random NF4 weight with double
    quantization, as the bench models hold it."""
    import bitsandbytes.functional as bf

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(device)
    packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    nibbles = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()
    absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    exact = (state.code[nibbles] * absmax.float().repeat_interleave(64)).view(n, k)
    return packed, state, exact


def _launch(kernel: str, args: tuple, meta: dict, views: dict[str, torch.Tensor], n: int, k: int) -> None:
    from peftchat.model import fp8_kernels

    bn, bk = nf4.TILE
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    tiled = kernel.endswith("_tiled")
    meta = {**meta, "TILED": tiled, "enable_fp_fusion": False}  # as fp8.nf4_to_fp8 launches them
    if kernel.startswith("rows"):
        fp8_kernels.nf4_to_fp8_kernel[grid](*args, views["rows"], n, k, **meta)
    elif kernel.startswith("transposed"):
        fp8_kernels.nf4_to_fp8_t_kernel[grid](*args, views["transposed"], n, k, **meta)
    else:
        meta = {key: v for key, v in meta.items() if key not in ("TILED", "SPAN")}
        both_layouts_kernel[grid](*args, views["rows"], views["transposed"], n, k, **meta)


def check(n: int, k: int, kernel: str, device: str) -> dict[str, Any]:
    """Counts for one kernel on one (N, K) weight: bytes written outside the outputs, output bytes
    never written, values unlike the reference, input bytes changed."""
    packed, state, exact = nf4_weight(n, k, device)
    rest, meta = fp8.nf4_kernel_args(packed, state)
    args = (packed, *rest)
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    before = [a.clone() for a in inputs]
    layouts = ["rows", "transposed"] if kernel == "both" else [kernel.removesuffix("_tiled")]
    buffers = {name: guarded(n * k, device) for name in layouts}
    views = {"rows": None, "transposed": None}
    views.update({name: view.view(n, k) if name == "rows" else view.view(k, n) for name, (_, view) in buffers.items()})
    _launch(kernel, args, meta, views, n, k)
    ref = fp8.quantize(exact, 1)[0].view(torch.uint8)
    row: dict[str, Any] = {"n": n, "k": k, "kernel": kernel, "outside_written": 0, "inside_unwritten": 0, "mismatch": 0}
    for name, (buf, view) in buffers.items():
        guard = torch.cat([buf[:GUARD], buf[GUARD + n * k:]])
        row["outside_written"] += int((guard != SENTINEL).sum())
        row["inside_unwritten"] += int((view.view(torch.uint8) == SENTINEL).sum())
        got = view.view(torch.uint8).view(n, k) if name == "rows" else view.view(torch.uint8).view(k, n).t()
        row["mismatch"] += int((got != ref).sum())
    row["inputs_changed"] = sum(int((a.view(torch.uint8) != b.view(torch.uint8)).sum()) for a, b in zip(inputs, before))
    return row


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    """`--shapes`: names from SHAPES, or NxK (out x in features), comma-separated."""
    shapes = {}
    for item in text.split(","):
        if item in SHAPES:
            shapes[item] = SHAPES[item]
        else:
            n, k = item.lower().split("x")
            shapes[item] = (int(n), int(k))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--kernels", default="rows,transposed,rows_tiled,transposed_tiled,both")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (n, k) in parse_shapes(args.shapes).items():
        for kernel in args.kernels.split(","):
            rows.append({"shape": name, **check(n, k, kernel, args.device)})
            print(json.dumps(rows[-1]), flush=True)
            (out / "fp8_store_bounds.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What peftchat's Triton kernels compile to, without a GPU: each kernel of
peftchat.model.lora_dropout_kernels (at the launch shapes in `lora_dropout.TILES`) and of
peftchat.model.fp8_kernels (the NF4 -> e4m3 weight kernels per element and tiled, at the 8B
shapes' meta-parameters) compiled by Triton for a CUDA target (default sm_90, the H200), and the
instructions that decide its speed counted in the PTX:

  cp.async     16-byte asynchronous global->shared copies (pipelined tile loads)
  ld.global.*  register loads by width (ld.global.b16: one bf16 per thread, unvectorised)
  st.global.*  register stores by width
  st.shared.*  shared-memory stores by width (layout conversions go through shared memory)
  mma          tensor-core instructions (mma.sync / wgmma)
  div.*.f32    fp32 divisions: div.rn is IEEE (torch's), div.full / div.approx are not

Round 6 found this way that a K split starting at a runtime offset had turned `down`'s x loads
into scalar 2-byte loads with no cp.async (benchmarks/RESULTS.md); tests/test_kernel_ptx.py keeps
that from coming back. The counts are per thread and static (no loop here runs more than once
per program), so for the weight kernels they are the loads each thread issues per tile.

Needs Triton's compiler and its bundled ptxas, no GPU and no CUDA driver; run with
TRITON_INTERPRET unset (under the interpreter, @triton.jit gives functions that cannot be compiled).

    python -m benchmarks.kernel_ptx [--arch 90] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from typing import Any

_COUNTED = re.compile(r"\b(cp\.async\.c[ag]\.shared\.global|ld\.global(?:\.[a-z0-9]+)*|st\.shared(?:\.[a-z0-9]+)*|"
                      r"st\.global(?:\.[a-z0-9]+)*|div\.(?:full|approx|rn)\.f32|"
                      r"wgmma\.mma_async|mma\.sync|ldmatrix)")

# per kernel: argument types in order (constexprs are given at compile time) and which pointers
# and sizes Triton would see as 16-aligned at a real launch (bf16 activations, fp32 adapters,
# K a multiple of 16 on every model this runs for)
SIGNATURES = {
    "down": ("lora_down_kernel", {"x_ptr": "*bf16", "a_ptr": "*fp32", "out_ptr": "*bf16", "seed": "i64", "M": "i32",
                                  "K": "i32", "R": "i32", "thr": "i32", "scale": "fp32"},
             ("x_ptr", "a_ptr", "out_ptr", "K")),
    "grad_a": ("lora_grad_a_kernel", {"x_ptr": "*bf16", "g_ptr": "*bf16", "part_ptr": "*fp32", "seed": "i64",
                                      "M": "i32", "K": "i32", "R": "i32", "rows_per_split": "i32", "thr": "i32",
                                      "scale": "fp32"},
               ("x_ptr", "g_ptr", "part_ptr", "K")),
    "grad_input": ("lora_grad_input_kernel", {"g_ptr": "*bf16", "a_ptr": "*fp32", "out_ptr": "*bf16", "seed": "i64",
                                              "M": "i32", "K": "i32", "R": "i32", "thr": "i32", "scale": "fp32"},
                   ("g_ptr", "a_ptr", "out_ptr", "K")),
}


def instruction_counts(ptx: str) -> dict[str, int]:
    """Counts of the instructions listed in the module docstring in one kernel's PTX."""
    counts = Counter(m.group(1) for m in _COUNTED.finditer(ptx))
    out = dict(sorted(counts.items()))
    out["cp.async"] = sum(n for k, n in counts.items() if k.startswith("cp.async"))
    out["mma"] = counts["mma.sync"] + counts["wgmma.mma_async"]
    return out


# the NF4 -> e4m3 weight kernels: the arguments `fp8.nf4_kernel_args` passes for a double-quantized
# bitsandbytes weight (blocksize 64, nested 256), then the output and (N, K)
NF4_SIGNATURE = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
                 "code2_ptr": "*fp32", "offset": "fp32", "row_scale_ptr": "*fp32", "out_ptr": "*fp8e4nv",
                 "N": "i32", "K": "i32"}
WEIGHT_KERNELS = {"nf4_rows": ("nf4_to_fp8_kernel", False), "nf4_rows_tiled": ("nf4_to_fp8_kernel", True),
                  "nf4_transposed": ("nf4_to_fp8_t_kernel", False),
                  "nf4_transposed_tiled": ("nf4_to_fp8_t_kernel", True),
                  "nf4_dequant": ("nf4_dequant_kernel", True)}
# fp8.quantize_rows_triton of a bf16 gradient with the weight's row scales folded in (K = 4096)
QUANTIZE_SIGNATURE = {"x_ptr": "*bf16", "col_scale_ptr": "*fp32", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                      "M": "i32", "K": "i32", "amax_floor": "fp32"}
KERNELS = [*SIGNATURES, *WEIGHT_KERNELS, "quantize_rows"]


def _lora_source(name: str, r: int) -> tuple[Any, dict, dict, list, dict, str]:
    from peftchat.model import lora_dropout, lora_dropout_kernels

    fn_name, signature, aligned = SIGNATURES[name]
    t = lora_dropout.TILES[name]
    constexprs = {"BM": t.bm, "BK": t.bk, "BR": lora_dropout.block_r(r)}
    return (getattr(lora_dropout_kernels, fn_name), signature, constexprs, list(aligned),
            {"num_warps": t.warps, "num_stages": t.stages}, str(t))


def _weight_source(name: str) -> tuple[Any, dict, dict, list, dict, str]:
    from peftchat.model import fp8_kernels, nf4, nf4_kernels

    fn_name, tiled = WEIGHT_KERNELS[name]
    bn, bk = nf4.TILE
    constexprs = {"BLOCKSIZE": 64, "BLOCKSIZE2": 256, "NESTED": True, "BN": bn, "BK": bk, "SPAN": min(64, bk),
                  "SOFT_ROUND": False}
    if name == "nf4_dequant":  # the bf16 weight (frozen_linear.TRITON_DEQUANT): no row scales
        module = nf4_kernels
        signature = {k: ("*bf16" if k == "out_ptr" else v) for k, v in NF4_SIGNATURE.items() if k != "row_scale_ptr"}
    else:
        module, signature = fp8_kernels, NF4_SIGNATURE
        constexprs["TILED"] = tiled
    aligned = [a for a in signature if a != "offset"]
    return getattr(module, fn_name), signature, constexprs, aligned, {"num_warps": 4, "enable_fp_fusion": False}, f"{bn}x{bk}"


def _quantize_source() -> tuple[Any, dict, dict, list, dict, str]:
    from peftchat.model import fp8, fp8_kernels

    mbits, min_normal, sub_magic, fmax = fp8.FP8_GRID[fp8.E4M3]
    constexprs = {"HAS_COL_SCALE": True, "SOFT_ROUND": False, "MBITS": mbits, "MIN_NORMAL": min_normal,
                  "SUB_MAGIC": sub_magic, "FMAX": fmax, "BK": 4096}
    aligned = ["x_ptr", "col_scale_ptr", "q_ptr", "scale_ptr", "K"]  # M is not specialised
    return fp8_kernels.quantize_rows_kernel, QUANTIZE_SIGNATURE, constexprs, aligned, {"num_warps": 4}, "1x4096"


def _source(name: str, r: int):
    """(Triton ASTSource, launch options, tile description) of kernel `name`."""
    from triton.compiler import ASTSource

    if name in WEIGHT_KERNELS:
        fn, signature, constexprs, aligned, options, tiles = _weight_source(name)
    elif name == "quantize_rows":
        fn, signature, constexprs, aligned, options, tiles = _quantize_source()
    else:
        fn, signature, constexprs, aligned, options, tiles = _lora_source(name, r)
    names = list(signature) + list(constexprs)
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs, attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return src, options, tiles


def compile_kernel(name: str, arch: int = 90, r: int = 16) -> dict:
    """Compile one kernel (a name of KERNELS) for sm_`arch`; its instruction counts and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, options, tiles = _source(name, r)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return {"kernel": name, "tiles": tiles, "arch": arch, "shared_bytes": compiled.metadata.shared,
            "convert_layouts": compiled.asm["ttgir"].count("convert_layout"),
            "instructions": instruction_counts(compiled.asm["ptx"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [compile_kernel(name, args.arch) for name in KERNELS]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['kernel']} {row['tiles']} sm_{row['arch']}: {row['shared_bytes']} B shared, "
                  f"{row['convert_layouts']} layout conversions, {row['instructions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

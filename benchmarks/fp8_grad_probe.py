"""First-step LoRA gradients of a real lean run with `training.fp8`, one ablation per process:
which FP8 piece, if any, breaks training in the model (where a single-layer check passes).

Written in round 7, when 8B runs with FP8 input gradients stopped learning (loss flat at 12.54)
while `check_fp8 --sections numerics` found every layer's error at the e4m3 bound: the gradients
were finite but ~1e7 too large, so clipping shrank every update to nothing. Builds the 1B bench
model, trains 3 steps through `peftchat_variants.run` and records, before the first optimizer
step, each LoRA parameter's gradient norm and largest |value|.

    python3 -m benchmarks.fp8_grad_probe --out $OUT bf16 fp8 rec rec_keep   # one process each

Modes: bf16 (lean, no fp8), fp8 (the recipe's fp8), generic (no Triton passes), nocache (x
quantized per call), rec (FP8 in the recompute only: r24's healthy 8B fp8rec row, the control
for rec_keep at 1B), nokeep (the recompute's transposed weight not kept), noscalecache,
rec_keep (fp8 recompute keeping the transposed weight, bf16 input gradient), torchquant (torch's
quantization of x and gradients), torchweight (the e4m3 weight from bitsandbytes' dequant),
tk (`fp8.TRANSPOSE_KERNEL`), tiles (`fp8.WEIGHT_TILES`), tiles_tk (both flags), both (round 7's
one kernel storing both layouts in the recompute, as r25 ran it: does fault 2 come back with
today's code?). Writes probe_<mode>.json under --out;
prints one line per mode.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

MODES = ("bf16", "fp8", "rec", "generic", "nocache", "nokeep", "noscalecache", "rec_keep", "torchquant", "torchweight", "tk", "tiles",
         "tiles_tk", "both")


class _Discard(dict):
    """A cache that keeps nothing."""

    def __setitem__(self, key, value) -> None:
        pass

    def get(self, key, default=None):
        return default


def _weight_from_bitsandbytes(weight, quant_state, rows: bool = True, transposed: bool = False):
    import bitsandbytes.functional as bf

    from peftchat.model import fp8

    row_scale = fp8.nf4_row_scales(weight, quant_state)
    q = (bf.dequantize_4bit(weight, quant_state).float() / row_scale[:, None]).clamp(-448, 448).to(fp8.E4M3)
    return (q if rows else None), (q.t().contiguous() if transposed else None), row_scale


def _weight_from_both_layouts_kernel(tree_nf4_to_fp8, weight, quant_state, rows: bool = True,
                                     transposed: bool = False):
    """Both layouts from round 7's one-kernel store (`fp8_store_bounds.both_layouts_kernel`) where a
    recompute asks for both, as r25 ran; the tree's `nf4_to_fp8` otherwise."""
    import torch
    import triton

    from benchmarks.fp8_store_bounds import both_layouts_kernel
    from peftchat.model import fp8, nf4

    if not (rows and transposed):
        return tree_nf4_to_fp8(weight, quant_state, rows, transposed)
    n, k = quant_state.shape
    rest, meta = fp8.nf4_kernel_args(weight, quant_state)
    meta = {key: v for key, v in meta.items() if key != "SPAN"}
    out = torch.empty((n, k), dtype=fp8.E4M3, device=weight.device)
    out_t = torch.empty((k, n), dtype=fp8.E4M3, device=weight.device)
    grid = (triton.cdiv(n, nf4.TILE[0]), triton.cdiv(k, nf4.TILE[1]))
    both_layouts_kernel[grid](weight, *rest, out, out_t, n, k, **meta, enable_fp_fusion=False)
    return out, out_t, rest[-1]


def ablate(mode: str) -> None:
    """Monkey-patch this process for `mode` (one process per mode)."""
    import peftchat.model.frozen_linear as fl
    from peftchat.model import fp8

    if mode == "generic":
        fp8.kernels_on = lambda t: False
    elif mode == "nocache":
        fl._LAST_INPUT.quantize = lambda x: fp8.quantize_rows(x)
    elif mode == "nokeep":
        fl._RECOMPUTED_WEIGHTS = _Discard()
    elif mode == "noscalecache":
        fp8._NF4_ARGS = _Discard()
    elif mode == "rec":
        fl.FP8_PASSES = fp8.Fp8Passes(recompute=True, grad_input=False)
    elif mode == "rec_keep":
        # backward has already popped what the recompute kept (`kept`): the input gradient in bf16
        fl._fp8_input_grad = lambda ctx, grad, dtype, kept: grad @ fl.base_weight(ctx.base, ctx.kind, dtype)
    elif mode == "torchquant":
        fp8.quantize_rows = lambda t, dt=fp8.E4M3, col_scale=None: fp8.quantize(
            t.float() * col_scale if col_scale is not None else t, 1, dt)
    elif mode == "torchweight":
        fp8.nf4_to_fp8 = _weight_from_bitsandbytes
    elif mode == "tk":
        fp8.TRANSPOSE_KERNEL = True
    elif mode == "tiles":
        fp8.WEIGHT_TILES = True
    elif mode == "tiles_tk":
        fp8.WEIGHT_TILES = fp8.TRANSPOSE_KERNEL = True
    elif mode == "both":
        fp8.nf4_to_fp8 = functools.partial(_weight_from_both_layouts_kernel, fp8.nf4_to_fp8)


def probe(mode: str, out: Path) -> dict:
    from benchmarks import peftchat_variants
    from benchmarks.shapes import bench_model
    import peftchat.train.loop as loop

    model_dir = str(bench_model("1b", "/tmp/fp8_probe_models", "cuda"))
    ablate(mode)
    record: dict = {}
    optimizer_step = loop.optimizer_step

    def spy(optimizer, scheduler, params, *args, **kwargs):
        if "norms" not in record:
            record["norms"] = [p.grad.float().norm().item() for p in params if p.grad is not None]
            record["maxabs"] = [p.grad.float().abs().max().item() for p in params if p.grad is not None]
        return optimizer_step(optimizer, scheduler, params, *args, **kwargs)

    loop.optimizer_step = spy
    spec = {"job": "train", "shape": "1b", "mode": "nf4", "variant": "peftchat:lean" + ("" if mode == "bf16" else "+fp8"),
            "batch": 4, "seq": 2048, "warmup": 1, "steps": 2, "device": "cuda", "model_dir": model_dir,
            "vocab_size": 128256, "scenario": "dense", "work_dir": f"/tmp/fp8_probe_work/{mode}"}
    record["losses"] = peftchat_variants.run(spec)["losses"]
    record["total_norm"] = math.sqrt(sum(n * n for n in record["norms"]))
    (out / f"probe_{mode}.json").write_text(json.dumps(record))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("modes", nargs="+", choices=MODES)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        r = probe(args.modes[0], out)
        print(args.modes[0], r["losses"], "total grad norm", round(r["total_norm"], 4), "max", max(r["maxabs"]))
        return 0
    for mode in args.modes:  # a process each: the ablations are monkey patches
        subprocess.run([sys.executable, "-m", "benchmarks.fp8_grad_probe", "--out", str(out), "--child", mode], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

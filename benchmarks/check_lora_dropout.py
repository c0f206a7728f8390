"""LoRA dropout inside the LoRA matmuls (peftchat.model.lora_dropout) on the GPU: each kernel
against torch with the very mask the kernels drew (bf16 inputs, fp32 reference), the share of
dropped elements, and the time of one LoRA layer's dropout-touching work both ways at the 8B
shapes (M = 4 x 2048 tokens, K = 4096 or 14336, r = 16):

  torch   forward: native dropout, dropped x @ A.T; backward: dropout drawn again, G.T @ dropped x,
          (G @ A) through native_dropout_backward (what frozen_linear does with KERNEL_DROPOUT off)
  kernel  forward: down(x, A); backward: grad_a(x, G) and grad_input(G, A)

    python3 -m benchmarks.check_lora_dropout --out $OUT/lora_dropout.jsonl
    python3 -m benchmarks.check_lora_dropout --out $OUT/ld.jsonl --sweep 64x128x4x3,128x128x8x3,32x256x4x4

`--sweep BMxBKxWARPSxSTAGES,...` times each kernel under each launch shape (lora_dropout.TILES);
every row also carries the host time to enqueue one call on a tiny input (launch-bound: Triton's
Python launcher against torch's ops), the cost that makes a step host-bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _time_ms(fn) -> float:
    from benchmarks.check_fp8 import cuda_time

    return cuda_time(fn, warmup=3, iters=20) * 1e3


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm().clamp(min=1e-30)).item()


def check(m: int, k: int, r: int, p: float) -> dict:
    from peftchat.model import lora_dropout as ld

    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    a = torch.randn(r, k, device=dev, dtype=torch.bfloat16) * 0.02
    g = torch.randn(m, r, device=dev, dtype=torch.bfloat16)
    seed = ld.new_seed(dev)
    keep = ld.keep_mask(seed, m, k, p, device=dev)
    dropped = x.float() * keep * ld.keep_scale(p)
    row = {"m": m, "k": k, "r": r, "p": p, "dropped_share": 1 - keep.float().mean().item(),
           "down_rel_err": _rel(ld.down(x, a, seed, p), dropped @ a.float().t()),
           "grad_a_rel_err": _rel(ld.grad_a(x, g, seed, p), g.float().t() @ dropped),
           "grad_input_rel_err": _rel(ld.grad_input(g, a, seed, p), (g.float() @ a.float()) * keep * ld.keep_scale(p))}
    del dropped, keep

    def torch_fwd():
        lora_in, _ = torch.native_dropout(x, p, True)
        return lora_in @ a.t()

    def torch_bwd():
        lora_in, mask = torch.native_dropout(x, p, True)
        ga = g.t() @ lora_in
        del lora_in
        return ga, torch.ops.aten.native_dropout_backward(g @ a, mask, 1.0 / (1.0 - p))

    row.update(torch_fwd_ms=_time_ms(torch_fwd), torch_bwd_ms=_time_ms(torch_bwd),
               kernel_fwd_ms=_time_ms(lambda: ld.down(x, a, seed, p)),
               kernel_grad_a_ms=_time_ms(lambda: ld.grad_a(x, g, seed, p)),
               kernel_grad_input_ms=_time_ms(lambda: ld.grad_input(g, a, seed, p)),
               x_read_ms_at_4tb=m * k * 2 / 4.0e9)
    return row


def parse_sweep(text: str) -> list:
    """"64x128x4x3,128x128x8x3" -> [Tiles(64, 128, 4, 3), Tiles(128, 128, 8, 3)]."""
    from peftchat.model.lora_dropout import GROUP, Tiles

    out = []
    for item in filter(None, text.split(",")):
        bm, bk, warps, stages = (int(v) for v in item.split("x"))
        if bk % GROUP or bm < 16:
            raise ValueError(f"{item}: BK must be a multiple of {GROUP} and BM at least 16")
        out.append(Tiles(bm, bk, warps, stages))
    return out


def host_us_per_call(fn, calls: int = 200) -> float:
    """Host microseconds to enqueue one call (timed before the device is waited for)."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def launch_costs(p: float = 0.05) -> dict:
    from peftchat.model import lora_dropout as ld

    dev = torch.device("cuda")
    x = torch.randn(64, 4096, device=dev, dtype=torch.bfloat16)
    a = torch.randn(16, 4096, device=dev, dtype=torch.bfloat16)
    g = torch.randn(64, 16, device=dev, dtype=torch.bfloat16)
    seed = ld.new_seed(dev)
    return {"host_us_seed": host_us_per_call(lambda: ld.new_seed(dev)),
            "host_us_down": host_us_per_call(lambda: ld.down(x, a, seed, p)),
            "host_us_grad_a": host_us_per_call(lambda: ld.grad_a(x, g, seed, p)),
            "host_us_grad_input": host_us_per_call(lambda: ld.grad_input(g, a, seed, p)),
            "host_us_torch_dropout_mm": host_us_per_call(lambda: torch.native_dropout(x, p, True)[0] @ a.t())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--sweep", default="", help="launch shapes BMxBKxWARPSxSTAGES, comma-separated")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from peftchat.model import lora_dropout as ld

    sweep = parse_sweep(args.sweep) if args.sweep else [None]
    with out.open("w") as f:
        row = launch_costs()
        print(json.dumps(row), flush=True)
        f.write(json.dumps(row) + "\n")
        for tiles in sweep:
            if tiles is not None:
                ld.TILES = {name: tiles for name in ld.TILES}
            for k in (4096, 14336):
                for r in (16, 64) if tiles is None else (16,):
                    row = {**check(args.tokens, k, r, 0.05), "tiles": str(tiles or ld.TILES)}
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

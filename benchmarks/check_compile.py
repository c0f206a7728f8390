"""Does `training.compile` train the same model as eager at LoRA dropout > 0? Two checks.

1. Masks (`mask_check`): a dropout inside a checkpointed, compiled region, on an all-ones input,
   so the forward's mask is readable from the output (kept = 1/(1-p), dropped = 0) and the mask the
   backward differentiated from the input gradient (upstream gradient of ones). Two patterns (a
   plain contiguous input and a transposed-then-contiguous one, the layout that trips inductor's
   random kernels), two checkpoint flavours (torch's non-reentrant checkpoint compiled with the
   layer, as `training.compile` does without offload; peftchat's offloaded checkpoint around a
   compiled body), with inductor's own random (`eager_random=False`, the path before the fix) and
   with `fallback_random` (`eager_random=True`, what `kernels.compile_decoder_layers` uses).
   Reported: the share of elements whose forward and backward masks differ (must be 0).
2. Trajectories (`trajectory`): a small random Llama with LoRA on every linear (B non-zero, so
   step 1 already depends on the masks), bf16 autocast, every layer but the last `--skip`
   checkpointed, dropout `--dropout`, `--steps` AdamW steps; paths eager, compile (inductor
   random), compile_fix (eager random), offload_compile_fix (offloaded checkpoint + compiled body,
   not in the default `--paths`: its two compiled graphs would double the run time).
   Reported per path: the losses, their max relative difference from eager, and the first-step
   LoRA gradients' relative error against eager (the fix draws eager's very masks, so this is
   bf16 rounding only; inductor's random draws other masks, so it is large either way).

    python -m benchmarks.check_compile --device cuda --out DIR          # masks + eager/compile/compile_fix
    python -m benchmarks.check_compile --device cuda --no-masks --paths eager,offload_compile_fix
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PATHS = ("eager", "compile", "compile_fix", "offload_compile_fix")


def _region(x: torch.Tensor, p: float) -> torch.Tensor:
    """x: (2, ...) ones; dropout of x[0] as is and of x[1] transposed-then-contiguous (back in x's layout)."""
    import torch.nn.functional as F

    plain = F.dropout(x[0] * 1.0, p, training=True)
    transposed = F.dropout(x[1].transpose(-1, -2).contiguous(), p, training=True).transpose(-1, -2)
    return torch.stack((plain, transposed))


def mask_check(device: str, flavour: str, eager_random: bool, p: float = 0.3, shape=(4, 64, 256)) -> dict:
    """Share of elements whose forward mask differs from the one the backward used (see above)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from peftchat.model import offload

    torch._dynamo.reset()
    options = {"fallback_random": True} if eager_random else None
    x = torch.ones((2, *shape), device=device, requires_grad=True)
    region = partial(_region, p=p)
    if flavour == "checkpoint":
        out = torch.compile(lambda t: checkpoint(region, t, use_reentrant=False), options=options)(x)
    else:
        out = offload.offloaded_checkpoint(region, x, body=torch.compile(offload.run_layer, options=options))
    out.backward(torch.ones_like(out))
    row = {"flavour": flavour, "eager_random": eager_random}
    for i, name in enumerate(("contiguous", "transposed")):
        fwd, bwd = out[i] != 0, x.grad[i] != 0
        row[f"{name}_mismatch"] = (fwd != bwd).float().mean().item()
        row[f"{name}_keep"] = round(fwd.float().mean().item(), 4)
    return row


def trajectory(device: str, path: str, dropout: float, shape: dict, batch: int, seq: int, steps: int,
               skip: int, quant: str = "none") -> dict:
    from benchmarks.check_grads import build
    from peftchat.config import TrainingConfig
    from peftchat.model import kernels

    torch._dynamo.reset()
    model = build(device, torch.bfloat16, shape, quant="nf4" if quant == "nf4" else "bf16", dropout=dropout)
    cfg = TrainingConfig(gradient_checkpointing=True, checkpoint_skip_layers=skip,
                         checkpoint_offload=path.startswith("offload"), fused_kernels=False)
    kernels.apply_checkpoint_policy(model, cfg)
    if path != "eager":
        kernels.compile_decoder_layers(model, eager_random=path.endswith("fix"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)
    losses, first_grads, t0 = [], None, time.perf_counter()
    torch.manual_seed(3)
    for _ in range(steps):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if first_grads is None:
            first_grads = torch.cat([p.grad.float().flatten() for p in params]).cpu()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"path": path, "dropout": dropout, "losses": [round(x, 5) for x in losses], "grads": first_grads,
            "wall_s": round(time.perf_counter() - t0, 1)}


def compare(rows: list[dict]) -> list[dict]:
    """Each row's max relative loss difference and first-step gradient error against eager."""
    ref = next((r for r in rows if r["path"] == "eager"), None)
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k != "grads"}
        if ref is not None:
            row["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
            row["grad_rel_err_vs_eager"] = ((r["grads"] - ref["grads"]).norm() / ref["grads"].norm()).item()
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--paths", default="eager,compile,compile_fix", help=f"comma list of {', '.join(PATHS)}")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=None, help="default 1024 on CUDA, 128 on CPU")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default 512 on CUDA, 64 on CPU")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=0, help="last layers not checkpointed (one more compiled graph)")
    p.add_argument("--quant", choices=("none", "nf4"), default="none")
    p.add_argument("--no-masks", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    hidden = args.hidden or (1024 if cuda else 128)
    shape = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=args.layers,
                 num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 256),
                 vocab_size=32000 if cuda else 2000)
    report: dict = {"device": args.device, "torch": torch.__version__, "shape": shape, "masks": [], "paths": []}
    t0 = time.perf_counter()
    if not args.no_masks:
        for flavour, eager_random in (("checkpoint", False), ("checkpoint", True), ("offload", True)):
            report["masks"].append(mask_check(args.device, flavour, eager_random))
            print(json.dumps(report["masks"][-1]), flush=True)
    rows = [trajectory(args.device, path, args.dropout, shape, args.batch, args.seq or (512 if cuda else 64),
                       args.steps, args.skip, args.quant) for path in args.paths.split(",")]
    report["paths"] = compare(rows)
    for row in report["paths"]:
        print(json.dumps(row), flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"total {report['wall_s']} s", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "check_compile.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

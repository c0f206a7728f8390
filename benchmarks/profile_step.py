"""Where does a training step's GPU time go? A few steps of a peftchat setting (default `lean` on
the 8B NF4 shape, 4 x 2048) through the real loop, under torch.profiler, and a table of kernel
time per category:

  matmul        base-weight GEMMs (forward, recompute, input-gradient backward) and the LM head's
  dequant       bitsandbytes NF4/int8 dequantization (each base weight, every time it is used)
  lora          LoRA's own GEMMs (an operand of width r), its dropout, the lora_* Triton kernels
  norm/rope/swiglu  RMSNorm, rotary embedding, gated MLP activation (liger's or torch's)
  attention     scaled-dot-product attention kernels
  loss          the (fused linear) cross-entropy's own kernels
  copies        memcpy/memset and copy kernels: offloaded checkpoint inputs, dtype casts
  optimizer     AdamW and gradient clipping (foreach kernels)
  other         everything else (elementwise adds, casts, residuals, ...)

Each kernel is classified by its name and by the torch ops that launched it (names and input
shapes, `record_shapes`). Per category: ms per step and share of the summed kernel time; also
the wall time per profiled step, so the part of the step with the GPU idle (or the sum exceeding
it, where copies overlap compute) is visible. Writes profile.json and profile.md to --out.

    python3 -m benchmarks.profile_step --out $OUT/prof [--setting lean] [--variant-opts compile]
    python -m benchmarks.profile_step --device cpu --shape tiny --out /tmp/prof   # plumbing only
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

CATEGORIES = ("matmul", "dequant", "lora", "norm/rope/swiglu", "attention", "loss", "copies", "optimizer", "other")
_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|gemv|sm\d+_.*(?:tensorop|hmma)|wgmma|matmul", re.I)
_MM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}


def classify(kernel: str, ops: list[str], shapes: Optional[list] = None, lora_r: int = 16) -> str:
    """Category of one kernel: `kernel` its name, `ops` the launching op then its ancestors
    (innermost first), `shapes` the launching op's input shapes."""
    k = kernel.lower()
    chain = " ".join(ops).lower()
    if "memcpy" in k or "memset" in k or "copy_kernel" in k or (ops and ops[0] in ("aten::copy_", "aten::_to_copy")):
        return "copies"
    if "adam" in k or "adam" in chain or "optimizer" in chain or "_foreach" in chain or "multi_tensor" in k:
        return "optimizer"
    if "dequant" in k or "dequant" in chain or "bitsandbytes" in chain or "4bit" in k or "kgemm_4bit" in k:
        return "dequant"
    if "flash" in k or "fmha" in k or "attention" in k or "scaled_dot_product" in chain or "efficient_attention" in chain:
        return "attention"
    if "cross_entropy" in k or "crossentropy" in chain or "cross_entropy" in chain or "liger_fused_linear" in chain:
        return "loss"
    if any(w in k for w in ("rms", "rope", "swiglu", "geglu", "silu", "rotary")) or \
            any(w in chain for w in ("rms_norm", "rmsnorm", "rope", "swiglu", "silu", "rotary")):
        return "norm/rope/swiglu"
    if "dropout" in k or "bernoulli" in k or "dropout" in chain or "bernoulli" in chain or k.startswith("lora_"):
        return "lora"  # lora_*: peftchat.model.lora_dropout's Triton kernels
    if _GEMM.search(k) or (ops and ops[0] in _MM_OPS):
        dims = [d for s in (shapes or []) if isinstance(s, (list, tuple)) for d in s if isinstance(d, int)]
        return "lora" if lora_r in dims else "matmul"
    return "other"


def kernel_records(events: Iterable[Any], cuda: bool) -> list[tuple[str, list[str], list, float]]:
    """(kernel name, launching op then ancestors, op input shapes, microseconds) of each kernel.

    CUDA: the kernels each CPU op launched (the profiler links them by correlation id). CPU (no
    kernels): each aten op's own (self) CPU time stands for a kernel, so the plumbing runs anywhere.
    """
    out = []
    for evt in events:
        if cuda:
            kernels = [(k.name, k.duration) for k in getattr(evt, "kernels", [])]
        elif evt.name.startswith("aten::"):
            kernels = [(evt.name, evt.self_cpu_time_total)]
        else:
            kernels = []
        if not kernels:
            continue
        chain, parent = [evt.name], evt.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        for name, us in kernels:
            out.append((name, chain, list(evt.input_shapes or []), float(us)))
    return out


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time the GPU ran anything at all (copies on
    their own stream overlap compute, so the summed kernel time overstates it)."""
    total, cur = 0.0, None
    for start, end in sorted(intervals):
        if cur is None or start > cur[1]:
            total += (cur[1] - cur[0]) if cur else 0.0
            cur = [start, end]
        else:
            cur[1] = max(cur[1], end)
    return total + ((cur[1] - cur[0]) if cur else 0.0)


def device_intervals_ms(prof) -> list[tuple[float, float]]:
    """(start, end) in ms of every GPU activity (kernels, copies) the profiler recorded; [] where
    this torch's profiler does not expose them."""
    try:
        events = prof.profiler.kineto_results.events()
        cuda = torch.autograd.DeviceType.CUDA
        return [(e.start_ns() / 1e6, e.end_ns() / 1e6) for e in events if e.device_type() == cuda]
    except Exception:  # noqa: BLE001 - a private profiler API: a diagnostic line is not worth the profile
        return []


def summarize(records: list[tuple[str, list[str], list, float]], steps: int, wall_s_per_step: float,
              lora_r: int = 16) -> dict[str, Any]:
    per_cat = {c: 0.0 for c in CATEGORIES}
    per_kernel: dict[tuple[str, str], float] = {}
    for name, chain, shapes, us in records:
        cat = classify(name, chain, shapes, lora_r)
        per_cat[cat] += us
        per_kernel[(cat, name)] = per_kernel.get((cat, name), 0.0) + us
    total = sum(per_cat.values()) or 1.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return {
        "steps": steps, "wall_ms_per_step": wall_s_per_step * 1e3,
        "kernel_ms_per_step": total / 1e3 / steps,
        "categories": {c: {"ms_per_step": us / 1e3 / steps, "share": us / total} for c, us in per_cat.items()},
        "top_kernels": [{"category": c, "kernel": n[:120], "ms_per_step": us / 1e3 / steps} for (c, n), us in top],
    }


def markdown(summary: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "",
             f"wall {summary['wall_ms_per_step']:.1f} ms/step, summed kernel time {summary['kernel_ms_per_step']:.1f} "
             f"ms/step ({summary['steps']} profiled steps)", ""]
    busy = summary.get("gpu_busy_ms_per_step")
    if busy:
        lines += [f"GPU busy {busy:.1f} ms/step ({100 * busy / summary['wall_ms_per_step']:.0f} % of wall): the rest "
                  "of the step the GPU waited for the host (the profiler's own host cost included)", ""]
    lines += ["| category | ms/step | share of kernel time |", "|---|---:|---:|"]
    for cat, v in sorted(summary["categories"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        lines.append(f"| {cat} | {v['ms_per_step']:.1f} | {100 * v['share']:.1f} % |")
    lines += ["", "| top kernels | category | ms/step |", "|---|---|---:|"]
    lines += [f"| `{k['kernel']}` | {k['category']} | {k['ms_per_step']:.2f} |" for k in summary["top_kernels"]]
    return "\n".join(lines) + "\n"


def add_run_args(p: argparse.ArgumentParser, setting: str, steps: int) -> None:
    """The arguments naming the run a step tool watches (this one and host_lag.py)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="8b")
    p.add_argument("--mode", default="nf4")
    p.add_argument("--setting", default=setting, help="peftchat setting, with +OPTS as in peftchat:SETTING+OPTS")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "peftchat_bench_models"))
    p.add_argument("--out", required=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    add_run_args(p, setting="lean", steps=2)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    from benchmarks import peftchat_variants
    from benchmarks.shapes import bench_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(args.device).type == "cuda"
    t0 = time.perf_counter()
    model_dir = str(bench_model(args.shape, args.models_dir, args.device))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=0, warmup=args.warmup - 1, active=args.steps, repeat=1, skip_first=1)
    step_times: list[float] = []
    spec = {"shape": args.shape, "mode": args.mode, "variant": f"peftchat:{args.setting}", "batch": args.batch,
            "seq": args.seq, "warmup": args.warmup, "steps": args.steps, "device": args.device,
            "model_dir": model_dir, "dropout": args.dropout,
            "work_dir": str(Path(tempfile.gettempdir()) / "peftchat_profile_step")}  # the run's adapter stays out of --out
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=True) as prof:
        def after_step(run) -> None:
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())
            prof.step()

        row = peftchat_variants.run(spec, after_step=after_step)
    deltas = [b - a for a, b in zip(step_times, step_times[1:])][-args.steps:]
    records = kernel_records(prof.events(), cuda)
    summary = summarize(records, args.steps, sum(deltas) / max(1, len(deltas)))
    intervals = device_intervals_ms(prof)
    summary["gpu_busy_ms_per_step"] = busy_ms(intervals) / args.steps if intervals else None
    summary.update(setting=args.setting, shape=args.shape, mode=args.mode, batch=args.batch, seq=args.seq,
                   device=args.device, applied=row.get("applied"), tokens_per_s=row.get("tokens_per_s"),
                   peak_alloc_gib=row.get("peak_alloc_gib"), wall_s=round(time.perf_counter() - t0, 1))
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    title = f"peftchat {args.setting}, {args.shape} {args.mode}, {args.batch} x {args.seq} ({args.device})"
    (out / "profile.md").write_text(markdown(summary, title))
    print(markdown(summary, title), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

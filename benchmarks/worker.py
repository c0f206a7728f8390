"""One benchmark job in this process: a model build, the matmul ceiling, or one training variant.

Run by bench.py as ``python -m benchmarks.worker '<json spec>'`` so each variant gets a fresh
process (clean allocator, its own peak memory, no monkey patch leaking into the next variant).
The result is printed as the last line, prefixed with RESULT_TAG.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch

RESULT_TAG = "BENCH_RESULT "
GIB = 1024 ** 3


def matmul_ceiling(device: str, n: int = 8192, iters: int = 20) -> dict[str, Any]:
    """bf16 n^3 matmul rate on random data (median of `iters` event-timed products)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    t = statistics.median(times)
    return {"matmul_n": n, "matmul_s": t, "ceiling_tflops": 2 * n ** 3 / t / 1e12,
            "gpu": torch.cuda.get_device_name(device)}


def random_batches(vocab: int, batch: int, seq: int, device: str, n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g).to(device)} for _ in range(n)]


def time_steps(step: Callable[[dict], torch.Tensor], batches: list[dict], warmup: int, steps: int,
               device: str) -> dict[str, Any]:
    """Run warm-up then timed steps; peak memory covers both (optimizer state appears in step 1)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(warmup):
        losses.append(step(batches[i % len(batches)]))
    times: list[float] = []
    if cuda:
        torch.cuda.synchronize()
        events = []
        for i in range(steps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            losses.append(step(batches[i % len(batches)]))
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for i in range(steps):
            t0 = time.perf_counter()
            losses.append(step(batches[i % len(batches)]))
            times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "step_s_median": statistics.median(times) if times else None,
        "step_s_mean": statistics.fmean(times) if times else None,
        "losses": [round(float(x), 4) for x in losses],
    }
    if cuda:
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return out


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    kind, _, name = spec["variant"].partition(":")
    device = spec["device"]
    t0 = time.perf_counter()
    applied: list[str] = []
    if kind == "peer":
        from benchmarks import peer_variants

        if name.startswith("tuned_liger") and not device.startswith("cuda"):
            return {"skipped": "liger-kernel needs CUDA"}
        model = peer_variants.build_peer(name, spec["mode"], spec["model_dir"], device)
        step = peer_variants.peer_step_fn(model)
    elif kind == "probe":
        from benchmarks import probe_variants

        if {"liger", "fce"} & set(name.split("+")) and not device.startswith("cuda"):
            return {"skipped": "liger-kernel needs CUDA"}
        model, step, applied = probe_variants.build_probe(name, spec["mode"], spec["model_dir"], device)
    elif kind == "peftchat":
        from benchmarks import peftchat_variants

        return peftchat_variants.run(spec)
    else:
        raise ValueError(f"unknown variant kind {kind!r}")
    load_s = time.perf_counter() - t0
    if torch.device(device).type == "cuda":
        static_gib = torch.cuda.memory_allocated() / GIB
    else:
        static_gib = None
    batches = random_batches(spec["vocab_size"], spec["batch"], spec["seq"], device)
    res = time_steps(step, batches, spec["warmup"], spec["steps"], device)
    if "compile" in name.split("+"):
        from torch._dynamo.utils import counters

        applied.append("dynamo:" + json.dumps({k: dict(v) for k, v in counters.items()
                                              if k in ("stats", "graph_break", "recompiles")})[:300])
    res.update(load_s=load_s, static_gib=static_gib, applied=applied)
    return res


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    job = spec["job"]
    try:
        if job == "build":
            from benchmarks.shapes import build_random_model

            t0 = time.perf_counter()
            build_random_model(spec["shape"], spec["model_dir"], spec["device"], spec.get("vocab_size"))
            result: dict[str, Any] = {"build_s": time.perf_counter() - t0}
        elif job == "ceiling":
            result = matmul_ceiling(spec["device"])
        elif job == "train":
            result = run_train(spec)
        else:
            raise ValueError(f"unknown job {job!r}")
    except torch.OutOfMemoryError as e:
        result = {"error": "OOM", "detail": str(e).splitlines()[0][:300]}
    except Exception as e:  # reported in the table, the other variants still run
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))

"""One benchmark job in this process: a model build, the matmul ceiling, or one training variant.

Run by bench.py as ``python -m benchmarks.worker '<json spec>'`` so each variant gets a fresh
process (clean allocator, its own peak memory, nothing compiled or patched leaking into the next variant).
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
VARIANT_KINDS = ("peer", "peftchat")  # `run_train` runs `KIND:NAME` variants of these kinds
GIB = 1024**3


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
    return {
        "matmul_n": n,
        "matmul_s": t,
        "ceiling_tflops": 2 * n**3 / t / 1e12,
        "gpu": torch.cuda.get_device_name(device),
    }


def random_batches(vocab: int, batch: int, seq: int, device: str, n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g).to(device)} for _ in range(n)]


def time_steps(
    step: Callable[[dict], torch.Tensor], batches: list[dict], warmup: int, steps: int, device: str
) -> dict[str, Any]:
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
        "step_s_all": times,
        "step_s_median": statistics.median(times) if times else None,
        "step_s_mean": statistics.fmean(times) if times else None,
        "losses": [round(float(x), 4) for x in losses],
    }
    if cuda:
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return out


def split_dropout(variant: str) -> tuple[str, float | None]:
    """`peer:unsloth@dropout0.05` -> (`peer:unsloth`, 0.05); no `@dropout` suffix -> (variant, None)."""
    base, _, suffix = variant.partition("@")
    if not suffix:
        return base, None
    if not suffix.startswith("dropout"):
        raise ValueError(f"unknown variant suffix {suffix!r} (expected @dropoutX)")
    return base, float(suffix[len("dropout") :])


def chat_batches(spec: dict[str, Any], n: int, device: str) -> list[dict]:
    """The first `n` dynamically padded batches of the shared sessions file (see chat_sessions)."""
    from benchmarks.chat_sessions import padded_batches, sessions_recipe, tokenized_samples

    recipe = sessions_recipe(spec)
    batches = padded_batches(tokenized_samples(recipe), spec["batch"], n, pad_id=spec.get("pad_id", 0))
    keep = ("input_ids", "labels", "attention_mask")
    return [
        {**{k: b[k].to(device) for k in keep}, "real_tokens": b["real_tokens"], "label_tokens": b["label_tokens"]}
        for b in batches
    ]


def chat_throughput(res: dict[str, Any], batches: list[dict], warmup: int) -> dict[str, Any]:
    """Real and label tokens/s over the timed steps (batches after warm-up, in order)."""
    timed = batches[warmup : warmup + len(res["step_s_all"])]
    t = sum(res["step_s_all"])
    real = sum(b["real_tokens"] for b in timed)
    padded = sum(b["input_ids"].numel() for b in timed)
    return {
        "tokens_per_s": real / t,
        "label_tokens_per_s": sum(b["label_tokens"] for b in timed) / t,
        "padded_tokens_per_s": padded / t,
        "real_tokens_timed": real,
    }


def copy_tokenizer(model_dir: str) -> None:
    """Put the shipped tokenizer beside the weights: peers that load the model dir as users do
    (unsloth's from_pretrained) load the tokenizer from it too, with the hub off."""
    import shutil
    from pathlib import Path

    from peftchat.demo_assets import demo_tokenizer_dir

    for f in Path(demo_tokenizer_dir()).iterdir():
        if f.is_file() and not (Path(model_dir) / f.name).exists():
            shutil.copy(f, Path(model_dir) / f.name)


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    variant, dropout = split_dropout(spec["variant"])
    kind, _, name = variant.partition(":")
    device = spec["device"]
    t0 = time.perf_counter()
    applied: list[str] = []
    if dropout is not None:
        spec = {**spec, "dropout": dropout}
    if kind == "peer" and name in ("unsloth", "unsloth_sft"):
        from benchmarks import unsloth_variant

        why_not = unsloth_variant.unsloth_available()
        if why_not:
            return {"skipped": why_not}
        if name == "unsloth_sft" and not spec.get("sessions_file"):
            return {"skipped": "peer:unsloth_sft packs variable-length sessions: chat and real-data scenarios only"}
        model = unsloth_variant.build_unsloth(
            spec["mode"], spec["model_dir"], spec["seq"], 0.0 if dropout is None else dropout
        )
        if name == "unsloth_sft":
            from benchmarks.chat_sessions import sessions_recipe, tokenized_samples

            samples = tokenized_samples(sessions_recipe(spec))
            res = unsloth_variant.run_unsloth_sft(spec, samples, model)
            res.update(
                load_s=time.perf_counter() - t0,
                applied=["unsloth SFTTrainer(packing=True) " + json.dumps(unsloth_variant.unsloth_versions())],
            )
            return res
        from benchmarks import peer_variants

        step = peer_variants.peer_step_fn(model)
        applied.append("unsloth " + json.dumps(unsloth_variant.unsloth_versions()))
    elif kind == "peer":
        from benchmarks import peer_variants

        if name.startswith("tuned_liger") and not device.startswith("cuda"):
            return {"skipped": "liger-kernel needs CUDA"}
        model = peer_variants.build_peer(
            name, spec["mode"], spec["model_dir"], device, 0.05 if dropout is None else dropout
        )
        step = peer_variants.peer_step_fn(model)
    elif kind == "peftchat":
        from benchmarks import peftchat_variants

        return peftchat_variants.run({**spec, "variant": variant})
    else:
        raise ValueError(f"unknown variant kind {kind!r}")
    load_s = time.perf_counter() - t0
    if torch.device(device).type == "cuda":
        static_gib = torch.cuda.memory_allocated() / GIB
    else:
        static_gib = None
    if spec.get("sessions_file"):  # chat and real-data scenarios
        batches = chat_batches(spec, spec["warmup"] + spec["steps"], device)
        res = time_steps(step, batches, spec["warmup"], spec["steps"], device)
        res.update(chat_throughput(res, batches, spec["warmup"]))
    else:
        batches = random_batches(spec["vocab_size"], spec["batch"], spec["seq"], device)
        res = time_steps(step, batches, spec["warmup"], spec["steps"], device)
    if "compile" in name.split("+"):
        from torch._dynamo.utils import counters

        applied.append(
            "dynamo:"
            + json.dumps({k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")})[:300]
        )
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
            copy_tokenizer(spec["model_dir"])
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

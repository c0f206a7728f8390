"""DPO benchmark: peftchat's DPO against TRL's `DPOTrainer` + PEFT + bitsandbytes and unsloth's
patched DPO (`PatchDPOTrainer`), on one random-init NF4 base (`shapes.bench_model`, 8B Llama shape
by default), the same pairs for all: prompt and each reply drawn from the demo corpus to about
`--prompt-tokens` / `--reply-tokens` (a pair side ~1,024 tokens by default), LoRA r 16 / alpha 32
on the seven projections, dropout 0 (unsloth's setting), beta 0.1, reference = the adapter off,
gradient checkpointing on, batch `--batch` pairs, lr 2e-4 constant, AdamW.

Per variant (each in a process of its own: unsloth patches transformers on import): pairs/s and
tokens/s of the timed steps (after `--warmup`), peak GPU memory (max allocated and reserved), the
per-step losses. Loss gate: every variant's first loss is ln 2 (the policy starts as the
reference: LoRA B = 0) within 0.01, and its later losses stay finite and within 0.05 of
peftchat's at the same step (same data order; LoRA A inits differ by library).

    python -m benchmarks.dpo_bench --tiny --out /tmp/dpo.json           # CPU smoke (unsloth skipped)
    python -m benchmarks.dpo_bench --out $OUT/dpo_bench.json             # the GPU run (8B NF4)

Hand-written rather than part of bench.py because TRL's and unsloth's DPO run inside their own
trainers (timed per optimizer step by a callback, as `unsloth_variant.run_unsloth_sft`), while
peftchat's runs its own loss through the same step the training loop takes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_TAG = "DPO_BENCH_RESULT "
VARIANTS = ("peftchat", "peftchat_offload", "trl", "unsloth")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024**3


# ------------------------------------------------------------------------------ data


def make_pairs(n: int, prompt_tokens: int, reply_tokens: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` text pairs {prompt, chosen, rejected} cut from the demo corpus at token counts of the
    shipped tokenizer (TRL tokenizes the text itself; peftchat's pairs are those same ids)."""
    import random

    from transformers import AutoTokenizer

    from peftchat.demo_assets import asset_path, demo_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    words = asset_path("demo/corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)

    def text(k: int) -> str:
        out: list[str] = []
        while len(tok.encode(" ".join(out), add_special_tokens=False)) < k:
            out += rng.sample(words, min(len(words), max(8, k // 4)))
        ids = tok.encode(" ".join(out), add_special_tokens=False)[:k]
        return tok.decode(ids)

    return [
        {"prompt": text(prompt_tokens), "chosen": " " + text(reply_tokens), "rejected": " " + text(reply_tokens)}
        for _ in range(n)
    ]


def pair_batches(pairs: list[dict[str, str]], batch: int, tokenizer) -> list[tuple[dict, int]]:
    """peftchat's concatenated pair batches of the same pairs, in the same order as TRL takes them
    (shuffle off): (tensors, real tokens). Replies end in EOS, as TRL adds it."""
    from peftchat.data.preference import collate_pairs, pair_tensors

    out = []
    eos = [tokenizer.eos_token_id]
    for b in range(0, len(pairs) - batch + 1, batch):
        chosen, rejected = [], []
        for p in pairs[b : b + batch]:
            prompt = tokenizer.encode(p["prompt"], add_special_tokens=False)
            for side, into in (("chosen", chosen), ("rejected", rejected)):
                reply = tokenizer.encode(p["prompt"] + p[side], add_special_tokens=False)[len(prompt) :] + eos
                into.append({"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply})
        tokens = sum(len(s["input_ids"]) for s in chosen + rejected)
        out.append((pair_tensors(collate_pairs(chosen, rejected, tokenizer.pad_token_id)), tokens))
    return out


# ------------------------------------------------------------------------------ variants


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _memory(device: str) -> dict[str, float]:
    import torch

    if device != "cuda":
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def run_peftchat(spec: dict[str, Any]) -> dict[str, Any]:
    """peftchat's DPO step: the loop's model setup (NF4, LoRA, speed-ups), `PreferenceLoss`, AdamW."""
    import torch
    from transformers import AutoTokenizer

    from peftchat.config import recipe_from_dict
    from peftchat.train.loop import setup_model
    from peftchat.train.optim import build_optimizer, build_scheduler
    from peftchat.train.run import TrainHooks
    from peftchat.train.step import mixed_precision, optimizer_step, to_device

    device = spec["device"]
    recipe = recipe_from_dict(
        {
            "model": {
                "path": spec["model_dir"],
                "dtype": spec["dtype"],
                "compute_dtype": spec["dtype"],
                "quantization": spec["quantization"],
            },
            "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
            "data": {"train": "unused.jsonl", "max_length": spec["prompt_tokens"] + spec["reply_tokens"] + 8},
            "training": {
                "device": device,
                "output_dir": spec["work_dir"],
                "objective": "dpo",
                "beta": 0.1,
                "lr": 2e-4,
                "lr_scheduler": "constant",
                "gradient_checkpointing": True,
                "batch_size": spec["batch"],
                "checkpoint_offload": spec["variant"] == "peftchat_offload",
                "seed": 0,
            },
        }
    )
    torch.manual_seed(0)
    model, loss_fn, _ = setup_model(recipe, torch.device(device), TrainHooks())
    optimizer = build_optimizer(model, recipe.training, torch.device(device))
    scheduler = build_scheduler(optimizer, recipe.training, 1 << 20)
    autocast, _ = mixed_precision(recipe, torch.device(device))
    params = [p for p in model.parameters() if p.requires_grad]
    batches = pair_batches(spec["pairs"], spec["batch"], AutoTokenizer.from_pretrained(spec["model_dir"]))
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times, tokens = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        tensors, n_tokens = batches[i % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        with autocast():
            loss = loss_fn(model, to_device(tensors, torch.device(device)), normalizer=spec["batch"])
        loss.backward()
        optimizer_step(optimizer, scheduler, params, 1.0)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(round(float(loss), 5))
        tokens.append(n_tokens)
    return _result(spec, times, tokens, losses)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's `DPOTrainer` on PEFT + bitsandbytes (`trl`), or the same after unsloth's
    `PatchDPOTrainer` on unsloth's own NF4 model (`unsloth`), timed per optimizer step."""

    device, variant = spec["device"], spec["variant"]
    if variant == "unsloth":
        from benchmarks.unsloth_variant import build_unsloth

        model = build_unsloth("nf4", spec["model_dir"], spec["prompt_tokens"] + spec["reply_tokens"] + 8, 0.0)
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()
    else:
        model = _peft_bnb_model(spec)
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from benchmarks.unsloth_variant import TRL_TIMING_ARGS, step_clock

    times: list[float] = []
    losses: list[float] = []

    n = spec["warmup"] + spec["steps"]
    config = DPOConfig(
        output_dir=str(Path(spec["work_dir"]) / variant),
        per_device_train_batch_size=spec["batch"],
        max_steps=n,
        bf16=spec["dtype"] == "bf16",
        beta=0.1,
        max_length=None,
        gradient_checkpointing=True,
        use_cpu=device != "cuda",
        precompute_ref_log_probs=False,
        **TRL_TIMING_ARGS,
    )
    if hasattr(config, "shuffle_dataset"):
        config.shuffle_dataset = False
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = DPOTrainer(
        model=model,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(spec["pairs"] * math.ceil(n * spec["batch"] / len(spec["pairs"]))),
        callbacks=[step_clock(device, times, losses)],
    )
    trainer.train()
    ours = pair_batches(spec["pairs"], spec["batch"], tokenizer)  # the same pairs: their token counts
    tokens = [ours[i % len(ours)][1] for i in range(n)]
    return _result(spec, times, tokens, losses)


def _peft_bnb_model(spec: dict[str, Any]):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    quant = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        if spec["quantization"] == "4bit"
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=dtype, quantization_config=quant, device_map={"": spec["device"]}
    )
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    )


def _result(spec: dict[str, Any], times: list[float], tokens: list[int], losses: list[float]) -> dict[str, Any]:
    w = spec["warmup"]
    timed, counted = times[w:], tokens[w : len(times)]
    t = sum(timed)
    return {
        "variant": spec["variant"],
        "pairs_per_s": spec["batch"] * len(timed) / t,
        "tokens_per_s": sum(counted) / t,
        "step_s_median": statistics.median(timed),
        "step_s_all": timed,
        "losses": losses,
        **_memory(spec["device"]),
    }


def skip_reason(variant: str, device: str) -> str | None:
    import importlib.util

    if variant == "unsloth":
        if device != "cuda":
            return "unsloth needs CUDA (skipped on CPU)"
        if importlib.util.find_spec("unsloth") is None:
            return "unsloth is not installed (benchmarks/pack_unsloth.sh)"
    if variant in ("trl", "unsloth") and importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    if variant == "peftchat_offload" and device != "cuda":
        return "checkpoint_offload needs CUDA"
    return None


def worker(spec: dict[str, Any]) -> None:
    run = run_peftchat if spec["variant"].startswith("peftchat") else run_trl
    print(RESULT_TAG + json.dumps(run(spec)), flush=True)


# ------------------------------------------------------------------------------ the run


def loss_gate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """First loss = ln 2 (policy = reference at LoRA B = 0), every loss finite and near peftchat's."""
    ref = next((r["losses"] for r in rows if r["variant"] == "peftchat" and "losses" in r), None)
    out: dict[str, Any] = {}
    for r in rows:
        if "losses" not in r:
            continue
        first_ok = bool(r["losses"]) and abs(r["losses"][0] - math.log(2)) < 0.01
        finite = all(math.isfinite(x) for x in r["losses"])
        near = ref is None or all(abs(a - b) < 0.05 for a, b in zip(r["losses"], ref))
        out[r["variant"]] = {
            "first_loss_ln2": first_ok,
            "finite": finite,
            "near_peftchat": near,
            "pass": first_ok and finite and near,
        }
    return out


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    path = Path(spec["work_dir"]) / f"spec-{spec['variant']}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.dpo_bench", "--worker", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    return {"variant": spec["variant"], "error": (proc.stderr or proc.stdout)[-2000:]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="results JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny shape, short pairs, fp32")
    p.add_argument("--shape", default="8b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 2; tiny 2)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 512 (tiny 24)")
    p.add_argument("--reply-tokens", type=int, default=None, help="default 512 (tiny 12)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; tiny 2)")
    p.add_argument("--timeout-s", type=float, default=540, help="per variant")
    p.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "peftchat_bench_models"))
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or 2
    args.prompt_tokens = args.prompt_tokens or (24 if tiny else 512)
    args.reply_tokens = args.reply_tokens or (12 if tiny else 512)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.steps = args.steps or (2 if tiny else 6)
    args.device = "cpu" if tiny else "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    if not args.out:
        raise SystemExit("--out is required")
    from benchmarks.shapes import bench_model

    shape = "tiny" if args.tiny else args.shape
    model_dir = str(bench_model(shape, args.models_dir, args.device))
    n_pairs = args.batch * (args.warmup + args.steps)
    work = Path(tempfile.mkdtemp(prefix="dpo_bench-"))
    base = {
        "device": args.device,
        "model_dir": model_dir,
        "work_dir": str(work),
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "prompt_tokens": args.prompt_tokens,
        "reply_tokens": args.reply_tokens,
        "dtype": "fp32" if args.tiny else "bf16",
        "quantization": "4bit",
        "pairs": make_pairs(n_pairs, args.prompt_tokens, args.reply_tokens),
    }
    rows: list[dict[str, Any]] = []
    for variant in args.variants.split(","):
        reason = skip_reason(variant, args.device)
        row = (
            {"variant": variant, "skipped": reason} if reason else _spawn({**base, "variant": variant}, args.timeout_s)
        )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("step_s_all",)}), flush=True)
        _write(args, rows, shape)
    print(f"results written to {args.out}")
    return 0


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], shape: str) -> None:
    speed = {r["variant"]: r for r in rows if "pairs_per_s" in r}
    ratios = {}
    if "unsloth" in speed:
        for name, r in speed.items():
            ratios[name] = {
                "pairs_per_s_vs_unsloth": r["pairs_per_s"] / speed["unsloth"]["pairs_per_s"],
                "peak_alloc_vs_unsloth": (
                    r["peak_alloc_gib"] / speed["unsloth"]["peak_alloc_gib"] if r["peak_alloc_gib"] else None
                ),
            }
    doc = {
        "shape": shape,
        "batch_pairs": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "reply_tokens": args.reply_tokens,
        "warmup": args.warmup,
        "steps": args.steps,
        "rows": rows,
        "loss_gate": loss_gate(rows),
        "vs_unsloth": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())

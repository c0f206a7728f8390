"""peftchat through its normal recipe path: a Recipe from `recipe_from_dict`, driven by
`peftchat.train.loop.train` with `max_steps`, on chat data tokenized by peftchat's own pipeline.

Data (scenario `dense`): one-turn conversations (a short user line, a long assistant answer)
written as messages JSONL; `data.max_length` cuts each to exactly `seq` tokens, so every row is
full, unpadded, and nearly every position carries loss: the same work per step as the peer's
random tokens with loss on all positions. Scenario `chat`: the seeded long-tailed sessions of
benchmarks/chat_sessions.py (the same file the peers read).

Timing: `max_steps = warmup + steps`, `log_steps = 1` (one metrics row per step, so the loss gate
gets every step's loss); tokens/s = real tokens of the timed steps / their time, both from the
loop's own rows (its clock: collation, copies and all). Peak memory: torch's allocator peaks,
reset by the loop once the model and optimizer are built.

Setting `ref` is the eager bf16 reference of the loss gate (bench.py): no compile, no fused
kernels, no offload, every layer checkpointed, packed rows through sdpa's mask
(`model.attn_implementation: sdpa_masked`, no varlen); each peftchat row's `loss_max_rel_diff` is
measured against the `ref` row of the same shape, mode, scenario, packing and dropout in the same run.

Settings (recipe overrides on top of the recipe defaults; SETTINGS below):
  fast  fastest setting whose peak stays within the tuned peer's
  lean  smallest memory at no less than the tuned peer's speed
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

GIB = 1024**3
QUANT = {"nf4": "4bit", "int8": "8bit", "bf16": "none"}

# Per (shape, mode) overrides; "*" applies to every shape. checkpoint_skip_layers is sized so the
# un-checkpointed layers' activations fit under the tuned peer's peak (benchmarks/HISTORY.md).
# training.compile is kept out of every setting: its loss curve left the eager one by > 1 % on the
# 8B shape (benchmarks/HISTORY.md, loss gate) before compiled layers drew eager's dropout masks
# (kernels.compile_decoder_layers); `+compile` runs it for the gate to measure (lean+compile too).
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {
        "*": {"training.compile": False, "training.checkpoint_skip_layers": 0},
        # the most layers out of checkpointing measured under the tuned peer's 21.67 GiB: skip 12
        # 12,395 tok/s at 20.28 GiB against skip 8's 11,896 at 16.27 (skip 13, 21.28 GiB, ran
        # unevenly)
        "8b/nf4": {"training.checkpoint_skip_layers": 12},
        "8b/bf16": {"training.checkpoint_skip_layers": 8},
        # a full-checkpointing probe was faster than skip 6 (benchmarks/HISTORY.md): skip 0 is next to try
        "8b/int8": {"training.checkpoint_skip_layers": 6},
        "1b/nf4": {"training.checkpoint_skip_layers": 10},
        "1b/bf16": {"training.checkpoint_skip_layers": 14},
        "1b/int8": {"training.checkpoint_skip_layers": 10},  # not measured
    },
    "lean": {
        "*": {"training.checkpoint_offload": True},
    },
    "ref": {
        "*": {
            "training.compile": False,
            "training.fused_kernels": False,
            "training.checkpoint_skip_layers": 0,
            "training.checkpoint_offload": False,
            "training.fused_lora": False,  # peft's own LoRA layers
            "model.attn_implementation": "sdpa_masked",
        },
    },
}


# Name suffixes of a variant (peftchat:SETTING+OPT+...) and the recipe override each one means.
OPTION_KEYS: dict[str, tuple[str, Any]] = {
    "compile": ("training.compile", True),
    "nocompile": ("training.compile", False),
    "offload": ("training.checkpoint_offload", True),
    "nofused": ("training.fused_kernels", False),
    "noautocast": ("training.autocast", False),
    "packing": ("data.packing", True),
    "flex": ("model.attn_implementation", "flex_attention"),
    "fp8": ("training.fp8", True),
    "fusedlora": ("training.fused_lora", True),
    "novarlen": ("model.attn_implementation", "sdpa_masked"),  # ablation: packed rows through sdpa's mask
    "nofusedlora": ("training.fused_lora", False),
}


def setting_overrides(setting: str, shape: str, mode: str) -> dict[str, Any]:
    table = SETTINGS[setting]
    return {**table.get("*", {}), **table.get(f"{shape}/{mode}", {})}


def write_chat_data(path: Path, tokenizer, seq: int, n_records: int) -> Path:
    """`n_records` one-turn conversations whose assistant answer alone is longer than `seq` tokens."""
    from peftchat.demo_assets import asset_path

    corpus = asset_path("demo/corpus.txt").read_text(encoding="utf-8")
    per_copy = max(1, len(tokenizer(corpus, add_special_tokens=False)["input_ids"]))
    copies = seq // per_copy + 2
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_records):
            answer = f"Answer {i}. " + corpus * copies
            rec = {
                "messages": [
                    {"role": "user", "content": f"Question {i}: tell me everything."},
                    {"role": "assistant", "content": answer},
                ]
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def build_recipe(spec: dict[str, Any], setting: str, data_file: Path, out_dir: Path, cache_dir: Optional[Path] = None):
    from peftchat.config import recipe_from_dict
    from peftchat.demo_assets import demo_tokenizer_dir

    batch, micro = spec["batch"], spec.get("micro_batch") or spec["batch"]
    d: dict[str, Any] = {
        "name": f"bench-{spec['shape']}-{spec['mode']}-{setting}",
        "model": {
            "path": spec["model_dir"],
            "tokenizer": str(demo_tokenizer_dir()),
            "dtype": "bf16",
            "quantization": QUANT[spec["mode"]],
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bf16",
            "attn_implementation": "sdpa",
        },
        "adapter": {"r": 16, "alpha": 32, "dropout": spec.get("dropout", 0.05), "target_modules": "all-linear"},
        "data": {
            "train": str(data_file),
            "format": spec.get("sessions_format", "messages"),
            "collator": spec.get("sessions_collator", "chat_template"),
            "max_length": spec["seq"],
            "packing": False,
            "shuffle": False,
            "cache_dir": str(cache_dir or out_dir.parent / "hf_cache"),
        },
        "training": {
            "output_dir": str(out_dir),
            "batch_size": micro,
            "gradient_accumulation_steps": batch // micro,
            "max_steps": spec["warmup"] + spec["steps"],
            "log_steps": 1,
            "save_steps": 0,
            "eval_steps": 0,
            "lr": 2e-4,
            "warmup_steps": 0,
            "device": spec["device"],
            "tensorboard": False,
            "gradient_checkpointing": True,
        },
    }
    for key, value in {**setting_overrides(setting, spec["shape"], spec["mode"]), **spec.get("overrides", {})}.items():
        _set(d, key, value)
    return recipe_from_dict(d)


def timed_throughput(rows: list[dict[str, Any]], warmup: int, summary: dict[str, Any]) -> dict[str, Any]:
    """Real tokens/s over the steps after `warmup`, from per-step metrics rows (`tokens` is the
    running total of real tokens, `tokens_per_s` that step's rate); label tokens/s scales it by the
    run's label share (training_summary.json)."""
    timed = [r for i, r in enumerate(rows) if r["step"] > warmup and i > 0] or rows[-1:]
    prev = {r["step"]: p for p, r in zip(rows, rows[1:])}
    tokens = time_s = 0.0
    for r in timed:
        n = r["tokens"] - (prev[r["step"]]["tokens"] if r["step"] in prev else 0)
        tokens += n
        time_s += n / r["tokens_per_s"]
    tokens_per_s = tokens / time_s
    share = (summary.get("label_tokens") or 0) / max(1, summary.get("tokens") or 0)
    return {
        "tokens_per_s": tokens_per_s,
        "label_tokens_per_s": tokens_per_s * share if share else None,
        "timed_steps": len(timed),
        "step_s_median": time_s / len(timed),
        "real_tokens_timed": tokens,
    }


# Kernel variants: other `KernelOptions` than the recipe's (`TrainHooks.kernel_options`), never a
# module flag. `fp8rec`: FP8 in the recompute only (8B NF4 lean: 11,952 tok/s at 7.65 GiB against
# lean + fp8's 12,203 at 7.99). The other passes lost on the loss and were dropped as variants
# (benchmarks/HISTORY.md: forward 1.65 % off eager in 6 steps, input gradient only +4.2 % at 1B).
FP8_PASS_TOKENS = {"fp8rec": dict(forward=False, recompute=True, grad_input=False)}


def apply_options(spec: dict[str, Any], options: str) -> dict[str, Any]:
    """The spec with a setting's `+`-joined options applied (`fast+compile+skip6` -> "compile+skip6"):
    recipe overrides go into spec["overrides"], kernel variants into spec["fp8_passes"] (turned
    into the run's `KernelOptions` by `run`)."""
    overrides = dict(spec.get("overrides", {}))
    for tok in filter(None, options.split("+")):  # e.g. peftchat:fast+compile+skip6, peftchat:lean+mb2
        if tok.startswith("mb"):
            spec = {**spec, "micro_batch": int(tok[2:])}
        elif tok.startswith("skip"):
            overrides["training.checkpoint_skip_layers"] = int(tok[4:])
        elif tok.startswith("mem"):  # e.g. peftchat:lean+mem16: training.max_memory_gib 16 picks the policy
            overrides["training.max_memory_gib"] = float(tok[3:])
        elif tok in FP8_PASS_TOKENS:
            overrides["training.fp8"] = True
            spec = {**spec, "fp8_passes": tok}
        elif tok in OPTION_KEYS:
            key, value = OPTION_KEYS[tok]
            overrides[key] = value
        else:
            raise ValueError(f"unknown peftchat option {tok!r}")
    return {**spec, "overrides": overrides}


def kernel_variant(spec: dict[str, Any]) -> Optional[Callable]:
    """`TrainHooks.kernel_options` for the spec's kernel variant, or None (the recipe's options)."""
    if not spec.get("fp8_passes"):
        return None
    import dataclasses

    from peftchat.kernels.fp8 import Fp8Passes

    passes = Fp8Passes(**FP8_PASS_TOKENS[spec["fp8_passes"]])
    return lambda options: dataclasses.replace(options, fused_lora=True, fp8=passes)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the spec's setting through peftchat.train.loop.train; return the bench row."""
    from peftchat.model.tokenizer import load_tokenizer
    from peftchat.train import loop

    _, _, name = spec["variant"].partition(":")
    setting, _, options = name.partition("+")
    spec = apply_options(spec, options)
    if setting not in SETTINGS:
        raise ValueError(f"unknown peftchat setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    work = Path(spec["work_dir"])
    out_dir = work / "run"
    shutil.rmtree(out_dir, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(spec["device"]).type == "cuda"
    if spec.get("sessions_file"):  # chat, real-*: the one sessions file every variant reads
        data_file = Path(spec["sessions_file"])
        # tokenized once per run: the peers' cache (chat_sessions.sessions_recipe), not one per job
        recipe = build_recipe(spec, setting, data_file, out_dir, cache_dir=work.parent / "hf_cache")
    else:
        data_file = work / "chat.jsonl"
        recipe = build_recipe(spec, setting, data_file, out_dir)
        n_records = spec["batch"] * (spec["warmup"] + spec["steps"]) + spec["batch"]
        write_chat_data(data_file, load_tokenizer(recipe), spec["seq"], n_records)

    # Instrumentation through the loop's public hooks: reset the allocator peaks once the base
    # model is in memory (as the peer does after loading) and record what speed-ups were applied.
    applied: list[str] = []

    def reset_peaks(model) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    loop.train(
        recipe,
        hooks=loop.TrainHooks(
            after_model_load=reset_peaks, speedups_applied=applied.extend, kernel_options=kernel_variant(spec)
        ),
    )
    wall = time.perf_counter() - t0

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    summary = json.loads((out_dir / "training_summary.json").read_text())
    res: dict[str, Any] = {
        **timed_throughput(rows, spec["warmup"], summary),
        "losses": [round(r["loss"], 5) for r in rows],
        "applied": applied,
        "overrides": {**setting_overrides(setting, spec["shape"], spec["mode"]), **spec.get("overrides", {})},
        "micro_batch": spec.get("micro_batch") or spec["batch"],
        "summary_peak_memory_gb": summary.get("peak_memory_gb"),
        "summary_tokens_per_s": summary.get("tokens_per_s"),
        "run_wall_s": wall,
    }
    estimate = next((a for a in applied if a.startswith("memory estimate ")), None)
    if estimate:  # `memN` rows: training.max_memory_gib's estimated peak beside the measured one
        res["estimated_peak_gib"] = float(estimate.split()[2])
    if cuda:
        res["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        # Near its memory peak the caching allocator may free its cache and retry a cudaMalloc,
        # a device-wide synchronisation: a suspect, with garbage collection, for uneven steps
        # (8B fast at skip 13). Counted over the whole run (warm-up included).
        stats = torch.cuda.memory_stats()
        res["allocator"] = {key: stats.get(key) for key in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
    return res

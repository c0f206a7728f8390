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
kernels, no offload, every layer checkpointed, packed rows through sdpa's mask (no varlen); each peftchat row's `loss_max_rel_diff` is measured
against the `ref` row of the same shape, mode, scenario, packing and dropout in the same run.

`fit_only` specs (the longest-sequence search) run one step and report whether it fit.

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

GIB = 1024 ** 3
QUANT = {"nf4": "4bit", "int8": "8bit", "bf16": "none"}

# Per (shape, mode) overrides; "*" applies to every shape. checkpoint_skip_layers is sized so the
# un-checkpointed layers' activations fit under the tuned peer's peak (benchmarks/RESULTS.md).
# training.compile is kept out of every setting: its loss curve left the eager one by > 1 % on the
# 8B shape (benchmarks/RESULTS.md, loss gate) before compiled layers drew eager's dropout masks
# (kernels.compile_decoder_layers); `+compile` runs it for the gate to measure (lean+compile too).
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {
        "*": {"training.compile": False, "training.checkpoint_skip_layers": 0},
        # the most layers out of checkpointing measured under the tuned peer's 21.67 GiB: r21 skip 12
        # 12,395 tok/s at 20.28 GiB against skip 8's 11,896 at 16.27 (skip 13, 21.28 GiB, ran
        # unevenly in r22); "fast" was skip 8 until round 8
        "8b/nf4": {"training.checkpoint_skip_layers": 12},
        "8b/bf16": {"training.checkpoint_skip_layers": 8},
        # a full-checkpointing probe was faster than skip 6 (benchmarks/RESULTS.md): skip 0 is next to try
        "8b/int8": {"training.checkpoint_skip_layers": 6},
        "1b/nf4": {"training.checkpoint_skip_layers": 10},
        "1b/bf16": {"training.checkpoint_skip_layers": 14},
        "1b/int8": {"training.checkpoint_skip_layers": 10},  # not measured
    },
    "lean": {
        "*": {"training.checkpoint_offload": True},
    },
    "ref": {
        "*": {"training.compile": False, "training.fused_kernels": False, "training.checkpoint_skip_layers": 0,
              "training.checkpoint_offload": False, "training.fused_lora": False},  # peft's own LoRA layers
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
            rec = {"messages": [{"role": "user", "content": f"Question {i}: tell me everything."},
                                {"role": "assistant", "content": answer}]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def build_recipe(spec: dict[str, Any], setting: str, data_file: Path, out_dir: Path):
    from peftchat.config import recipe_from_dict
    from peftchat.demo_assets import demo_tokenizer_dir

    batch, micro = spec["batch"], spec.get("micro_batch") or spec["batch"]
    d: dict[str, Any] = {
        "name": f"bench-{spec['shape']}-{spec['mode']}-{setting}",
        "model": {"path": spec["model_dir"], "tokenizer": str(demo_tokenizer_dir()), "dtype": "bf16",
                  "quantization": QUANT[spec["mode"]], "quant_type": "nf4", "double_quant": True,
                  "compute_dtype": "bf16", "attn_implementation": "sdpa"},
        "adapter": {"r": 16, "alpha": 32, "dropout": spec.get("dropout", 0.05), "target_modules": "all-linear"},
        "data": {"train": str(data_file), "format": "messages", "collator": "chat_template",
                 "max_length": spec["seq"], "packing": False, "shuffle": False,
                 "cache_dir": str(out_dir.parent / "hf_cache")},
        "training": {"output_dir": str(out_dir), "batch_size": micro, "gradient_accumulation_steps": batch // micro,
                     "max_steps": 1 if spec.get("fit_only") else spec["warmup"] + spec["steps"],
                     "log_steps": 1, "save_steps": 0, "eval_steps": 0,
                     "lr": 2e-4, "warmup_steps": 0, "device": spec["device"], "tensorboard": False,
                     "gradient_checkpointing": True},
    }
    for key, value in {**setting_overrides(setting, spec["shape"], spec["mode"]),
                       **spec.get("overrides", {})}.items():
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
    return {"tokens_per_s": tokens_per_s, "label_tokens_per_s": tokens_per_s * share if share else None,
            "timed_steps": len(timed), "step_s_median": time_s / len(timed), "real_tokens_timed": tokens}


# FP8 experiments: which base matmuls run in FP8 (the recipe's `training.fp8` runs FP8_PASSES).
FP8_PASS_TOKENS = {
    "fp8all": dict(forward=True, recompute=True, grad_input=True),
    "fp8fwd": dict(forward=True, recompute=True, grad_input=False),  # both forwards, bf16 input gradient
    "fp8grad": dict(forward=False, recompute=False, grad_input=True),
    "fp8grad5": dict(forward=False, recompute=False, grad_input=True, grad_dtype=torch.float8_e5m2),
    "fp8e5": dict(forward=False, recompute=True, grad_input=True, grad_dtype=torch.float8_e5m2),  # the recipe's, e5m2 gradients
    "fp8rec": dict(forward=False, recompute=True, grad_input=False),
}


def set_fp8_passes(tok: str) -> None:
    """`training.fp8` with the passes of `FP8_PASS_TOKENS[tok]` (benchmarks/fp8_drift.py asks the same
    on small models); one process per variant (worker.py)."""
    import peftchat.kernels.frozen_linear as fl
    from peftchat.kernels.fp8 import Fp8Passes

    fl.FP8_PASSES = Fp8Passes(**FP8_PASS_TOKENS[tok])


def _no_varlen() -> None:
    """Packed training keeps sdpa (no `sdpa_varlen`); one process per variant (worker.py)."""
    from peftchat.model import load

    load.flash_varlen_available = lambda device: False


def apply_options(spec: dict[str, Any], options: str) -> dict[str, Any]:
    """The spec with a setting's `+`-joined options applied (`fast+compile+skip6` -> "compile+skip6"):
    recipe overrides go into spec["overrides"]; experiment flags are set on their modules, which is
    why each variant runs in its own process (worker.py)."""
    overrides = dict(spec.get("overrides", {}))
    for tok in filter(None, options.split("+")):  # e.g. peftchat:fast+compile+skip6, peftchat:lean+mb2
        if tok.startswith("mb"):
            spec = {**spec, "micro_batch": int(tok[2:])}
        elif tok.startswith("skip"):
            overrides["training.checkpoint_skip_layers"] = int(tok[4:])
        elif tok == "memsnap":  # diagnostic: what is alive at the memory peak (benchmarks/memory_peak.py)
            spec = {**spec, "memsnap": True}
        elif tok.startswith("mem"):  # e.g. peftchat:lean+mem16: training.max_memory_gib 16 picks the policy
            overrides["training.max_memory_gib"] = float(tok[3:])
        elif tok == "noprefetch":  # ablation: offloaded inputs come back synchronously (no double buffer)
            from peftchat.model import offload

            offload.PREFETCH_NEXT_INPUT = False  # one process per variant (worker.py)
        elif tok in FP8_PASS_TOKENS:  # experiment: FP8 in other passes than the recipe's
            overrides["training.fp8"] = True
            set_fp8_passes(tok)
        elif tok == "bnbdq":  # ablation: NF4 bases dequantized by bitsandbytes (frozen_linear.TRITON_DEQUANT off)
            from peftchat.model import frozen_linear

            frozen_linear.TRITON_DEQUANT = False
        elif tok == "fp8elem":  # ablation: r24's per-element FP8 weight kernels, torch's transpose
            from peftchat.model import fp8

            overrides["training.fp8"] = True
            fp8.WEIGHT_TILES = fp8.TRANSPOSE_KERNEL = False
        elif tok == "tdq":  # the default since round 9 (r26 rows): frozen_linear.TRITON_DEQUANT
            from peftchat.model import frozen_linear

            frozen_linear.TRITON_DEQUANT = True
        elif tok == "keepw":  # experiment: a recompute's dequantized weight kept for its backward
            from peftchat.model import frozen_linear

            frozen_linear.KEEP_RECOMPUTED_WEIGHT = True
        elif tok == "fp8tk":  # the default since round 9 (r26 rows): fp8.TRANSPOSE_KERNEL
            from peftchat.model import fp8

            overrides["training.fp8"] = True
            fp8.TRANSPOSE_KERNEL = True
        elif tok == "fp8tiles":  # the default since round 9 (r26 rows): fp8.WEIGHT_TILES
            from peftchat.model import fp8

            overrides["training.fp8"] = True
            fp8.WEIGHT_TILES = True
        elif tok == "fp8mlp":  # experiment: FP8 only in the MLP's base linears
            from peftchat.model import frozen_linear

            overrides["training.fp8"] = True
            frozen_linear.FP8_ONLY = ("gate_proj", "up_proj", "down_proj")
        elif tok == "novarlen":  # ablation: packed rows through sdpa's block-diagonal mask
            _no_varlen()
        elif tok == "torchdropout":  # ablation: LoRA dropout by torch's kernel, not inside the LoRA matmuls
            from peftchat.model import frozen_linear

            frozen_linear.KERNEL_DROPOUT = False  # one process per variant (worker.py)
        elif tok == "basefirst":  # ablation: forward base GEMM first, LoRA term added onto it
            from peftchat.model import frozen_linear

            frozen_linear.LORA_TERM_FIRST = False
        elif tok in OPTION_KEYS:
            key, value = OPTION_KEYS[tok]
            overrides[key] = value
        else:
            raise ValueError(f"unknown peftchat option {tok!r}")
    return {**spec, "overrides": overrides}


def run(spec: dict[str, Any], after_step: Optional[Callable] = None,
        after_model_load: Optional[Callable] = None) -> dict[str, Any]:
    """Train the spec's setting through peftchat.train.loop.train; return the bench row.
    `after_step`: the loop's hook after each optimizer step (profile_step.py steps its profiler);
    `after_model_load(model)`: called with the base model once loaded (host_lag.py's hooks)."""
    from peftchat.model.tokenizer import load_tokenizer
    from peftchat.train import loop

    _, _, name = spec["variant"].partition(":")
    setting, _, options = name.partition("+")
    spec = apply_options(spec, options)
    if setting == "ref":  # the gate's reference: plain sdpa, packed rows through its mask
        _no_varlen()
    if setting not in SETTINGS:
        raise ValueError(f"unknown peftchat setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    work = Path(spec["work_dir"])
    out_dir = work / "run"
    shutil.rmtree(out_dir, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(spec["device"]).type == "cuda"
    if spec.get("scenario") == "chat":  # the shared sessions file bench.py wrote once for every variant
        data_file = Path(spec["sessions_file"])
        recipe = build_recipe(spec, setting, data_file, out_dir)
    else:
        data_file = work / "chat.jsonl"
        recipe = build_recipe(spec, setting, data_file, out_dir)
        n_records = spec["batch"] * (1 if spec.get("fit_only") else spec["warmup"] + spec["steps"]) + spec["batch"]
        write_chat_data(data_file, load_tokenizer(recipe), spec["seq"], n_records)

    # Instrumentation through the loop's public hooks: reset the allocator peaks once the base
    # model is in memory (as the peer does after loading) and record what speed-ups were applied.
    applied: list[str] = []

    def reset_peaks(model) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            if spec.get("memsnap"):
                torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
        if after_model_load is not None:
            after_model_load(model)

    t0 = time.perf_counter()
    loop.train(recipe, hooks=loop.TrainHooks(after_model_load=reset_peaks, speedups_applied=applied.extend,
                                             after_step=after_step))
    wall = time.perf_counter() - t0

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    summary = json.loads((out_dir / "training_summary.json").read_text())
    res: dict[str, Any] = {
        **timed_throughput(rows, 0 if spec.get("fit_only") else spec["warmup"], summary),
        "losses": [round(r["loss"], 5) for r in rows],
        "applied": applied,
        "overrides": {**setting_overrides(setting, spec["shape"], spec["mode"]), **spec.get("overrides", {})},
        "micro_batch": spec.get("micro_batch") or spec["batch"],
        "summary_peak_memory_gb": summary.get("peak_memory_gb"),
        "summary_tokens_per_s": summary.get("tokens_per_s"),
        "run_wall_s": wall,
    }
    if cuda:
        res["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        # Near its memory peak the caching allocator may free its cache and retry a cudaMalloc,
        # a device-wide synchronisation: a suspect, with garbage collection, for r22's uneven
        # fast+skip13 steps. Counted over the whole run (warm-up included).
        stats = torch.cuda.memory_stats()
        res["allocator"] = {key: stats.get(key) for key in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
    if cuda and spec.get("memsnap"):
        from benchmarks.memory_peak import report

        res["memory_peak_report"] = report(torch.cuda.memory._snapshot())
        torch.cuda.memory._record_memory_history(enabled=None)
    return res

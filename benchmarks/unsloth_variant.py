"""The unsloth peer: its documented QLoRA path, in a process of its own.

    FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True, max_seq_length=...)
    FastLanguageModel.get_peft_model(r=16, lora_alpha=32, all seven projections,
                                     use_gradient_checkpointing="unsloth")

then the same hand-written step as the other peers (plain AdamW, clipping, loss from the model's
own `labels` path). unsloth patches transformers when it is imported, so it must be imported
before transformers (the worker imports nothing of transformers before this module runs) and
never share a process with another variant (bench.py isolates every job). Hub access is off
(`HF_HUB_OFFLINE=1`); the tokenizer is the one bench.py copies into the model dir.

unsloth's documented setting is LoRA dropout 0 (`peer:unsloth`); `peer:unsloth@dropout0.05` runs
it at the dropout of the peftchat rows beside it. unsloth needs CUDA: on CPU the row is skipped.

`peer:unsloth_sft` (chat scenario) is unsloth's own path for variable-length data: TRL's
`SFTTrainer` with `packing=True` (best-fit-decreasing packing, padding-free batches), which unsloth
patches on import to run packed rows through varlen attention without cross-contamination. It
trains on the same tokenized sessions (input_ids + labels from peftchat's pipeline) and is timed
per optimizer step by a callback (CUDA synchronised at both ends); tokens are counted in the
collator, batch by batch, so tok/s is real (non-pad) tokens of the timed steps over their time.
"""

from __future__ import annotations

import os
from typing import Any

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def unsloth_available() -> str | None:
    """None when unsloth can run here, else why not (the row's `skipped` note)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "unsloth needs CUDA (skipped on CPU)"
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (benchmarks/pack_unsloth.sh)"
    return None


def build_unsloth(mode: str, model_dir: str, max_seq_length: int, dropout: float):
    """Load `model_dir` through FastLanguageModel in `mode` (nf4 or bf16) and add LoRA."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth import FastLanguageModel

    if mode not in ("nf4", "bf16"):
        raise ValueError(f"peer:unsloth runs nf4 or bf16, not {mode!r}")
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=max_seq_length, load_in_4bit=mode == "nf4", load_in_16bit=mode == "bf16", dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules=TARGET_MODULES,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        max_seq_length=max_seq_length,
    )
    model.train()
    return model


# The trainer settings every TRL-driven peer shares: constant lr, no accumulation, AdamW, a log
# row per step, nothing saved (the same optimizer work per step as peftchat's rows).
TRL_TIMING_ARGS: dict[str, Any] = dict(
    gradient_accumulation_steps=1,
    learning_rate=2e-4,
    lr_scheduler_type="constant",
    warmup_steps=0,
    optim="adamw_torch",
    max_grad_norm=1.0,
    weight_decay=0.0,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    dataloader_num_workers=0,
    seed=0,
)


def step_clock(device: str, times: list[float], losses: list[float]):
    """A transformers TrainerCallback appending each optimizer step's seconds (the device
    synchronised at both ends) to `times` and each logged loss to `losses`; it resets the CUDA
    memory peaks when training begins."""
    import time

    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 5))

    return StepClock()


def run_unsloth_sft(spec: dict[str, Any], samples: list[dict[str, list[int]]], model) -> dict[str, Any]:
    """`spec["warmup"] + spec["steps"]` optimizer steps of unsloth's SFTTrainer with packing on
    `samples`; the same result fields as the other peers (worker.time_steps + chat_throughput)."""
    import statistics

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    batches: list[tuple[int, int]] = []  # (real tokens, label tokens) per collated batch, in order
    times: list[float] = []
    losses: list[float] = []

    n_steps = spec["warmup"] + spec["steps"]
    config = SFTConfig(
        output_dir=str(spec["work_dir"]) + "/unsloth_sft",
        per_device_train_batch_size=spec["batch"],
        max_steps=n_steps,
        bf16=True,
        packing=True,
        max_length=spec["seq"],
        use_cpu=not torch.cuda.is_available(),
        **TRL_TIMING_ARGS,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = SFTTrainer(
        model=model,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(samples),
        callbacks=[step_clock("cuda", times, losses)],
    )
    collate = trainer.data_collator.torch_call

    def counting_collate(examples):
        batch = collate(examples)
        ids = batch["input_ids"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        batches.append((real, int((batch["labels"] != -100).sum())))
        return batch

    trainer.data_collator.torch_call = counting_collate
    trainer.train()
    w = spec["warmup"]
    timed, counted = times[w:n_steps], batches[w:n_steps]
    t = sum(timed)
    return {
        "step_s_all": timed,
        "step_s_median": statistics.median(timed),
        "step_s_mean": statistics.fmean(timed),
        "losses": losses,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 1024**3,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 1024**3,
        "tokens_per_s": sum(b[0] for b in counted) / t,
        "label_tokens_per_s": sum(b[1] for b in counted) / t,
        "real_tokens_timed": sum(b[0] for b in counted),
        "sft_batches_counted": len(batches),
    }


def unsloth_versions() -> dict[str, Any]:
    from importlib import metadata

    out = {}
    for name in ("unsloth", "unsloth_zoo", "trl", "datasets", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out

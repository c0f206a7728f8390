"""`training.max_memory_gib`: the fastest checkpoint/offload policy whose estimated peak fits.

A pure function of numbers (model shape, quantization, LoRA rank, micro-batch, sequence length,
budget) so the choice is testable without a GPU. The estimate (bytes, bf16 activations):

  weights     decoder linears at 0.53 B/param (NF4 + double-quant absmax), 1 (int8) or 2 (bf16);
              embedding and LM head in bf16
  LoRA        r * (in + out) per targeted linear, fp32 weight + grad + two AdamW moments (16 B)
  per layer   a checkpointed layer keeps its input (tokens * d * 2 B) on the GPU, or nothing with
              `checkpoint_offload` (two inputs in flight: the double buffer); a layer left out of
              checkpointing keeps all its activations: through peft's LoRA layers 2 B * (8 d + 4 ff)
              per token, through the fused LoRA function (`training.fused_lora`, on by default for
              CUDA training) 2 B * (7 d + 3 ff): it keeps no dropout copy or mask
  transient   the layer being recomputed in backward: 1.7 x one layer's activations. peft's
              layers: added to everything kept. Fused: the peak is the larger of the recompute
              (with only the inputs kept) and the end of the forward (all kept activations, plus
              the loss: 0.25 x one layer's activations)

Calibrated on the 8B Llama shape, NF4, 4 x 2048 (benchmarks/HISTORY.md, 2026-11-29, dropout
0.05): estimated 8.49 / 10.36 / 20.86 GiB for offload / checkpoint all / skip 8, measured 8.21
(lean) / 10.3 (ref: eager, every layer checkpointed) / 20.8 (fast); one more un-checkpointed layer
is estimated 1.375 GiB, measured 1.36-1.39. With the fused LoRA function (on by default for CUDA
training since round 3) lean measured 8.51 and the budgets 16 / 24 GiB peaked at 13.1 / 22.8. Since
round 4 the fused function keeps no dropout copy or mask for backward: lean measured 7.86, fast
(skip 8) 16.5, so an un-checkpointed layer costs about 0.9 GiB, not 1.375. Round 5 (LoRA dropout
drawn inside the LoRA matmuls): lean 7.64, fast 16.27 (skip 8) and 18.27 (skip 10), 1.0 GiB per
layer. Round 6 (r21, r22): skip 12 20.28, skip 13 21.28, lean 7.64 again. Round 8 fitted the
fused terms to those five peaks (lean, skip 8, 10, 12, 13): estimated 8.01 / 16.55 / 18.61 /
20.68 / 21.71, each 2-5 % above what was measured. Round 9 added `training.fp8`'s copies to the
recompute moment (fused path only, where FP8 runs): lean + fp8 estimated 8.34, measured 7.99;
skip 12 + fp8 20.68, measured 20.47 (r26). peft's terms stay round 2's. Without any checkpointing
it says 52 GiB where 57.9 was measured: budgets that large leave room anyway. At 4 x 2048 no checkpoint policy fits 8 GiB (the
weights, LoRA state and one layer's recompute already take ~7.7): the policy says so, and the
lever left is a smaller micro-batch (`training.batch_size` with `gradient_accumulation_steps`). Choices are
ranked by speed: fewer recomputed layers first (each one costs a forward), no offload before
offload at the same count (the copies cost a little); the first that fits within 95 % of the
budget wins. When none fits, the smallest is returned with `fits=False` for the caller to say so.

Preference objectives (`training.objective` dpo, orpo, simpo) forward a pair's chosen and
rejected rows together: twice the rows of an SFT micro-batch (`rows_per_sample` 2). DPO's default
reference (the adapter switched off on the same base, `train.preference.reference_logps`) is one
more forward, without gradients, after the policy's and before its backward: its working set
(counted as one layer's activations) adds to what the forward keeps, not to the recompute. A
precomputed reference adds nothing. Not calibrated on the GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from peftchat.config import Recipe, TrainingConfig

GIB = 2**30
HEADROOM = 0.95  # the allocator's fragmentation and whatever the estimate misses
WEIGHT_BYTES = {"4bit": 0.53, "8bit": 1.0, "none": 2.0}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        return cls(
            hidden=c.hidden_size,
            layers=c.num_hidden_layers,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class MemoryPolicy:
    checkpoint_skip_layers: int
    checkpoint_offload: bool
    estimated_gib: float
    fits: bool

    def describe(self, budget_gib: float) -> str:
        offload = ", inputs offloaded" if self.checkpoint_offload else ""
        verdict = (
            "fits"
            if self.fits
            else (
                "NOTHING FITS, smallest policy used; a smaller training.batch_size "
                "(with gradient_accumulation_steps) or data.max_length needs less"
            )
        )
        return (
            f"max_memory_gib {budget_gib:g}: checkpoint_skip_layers {self.checkpoint_skip_layers}{offload} "
            f"(estimated peak {self.estimated_gib:.1f} GiB; {verdict})"
        )


def _linears(s: ModelShape) -> list[tuple[int, int]]:
    head_dim = s.hidden // s.heads
    q, kv = s.heads * head_dim, s.kv_heads * head_dim
    return [
        (s.hidden, q),
        (s.hidden, kv),
        (s.hidden, kv),
        (q, s.hidden),
        (s.hidden, s.intermediate),
        (s.hidden, s.intermediate),
        (s.intermediate, s.hidden),
    ]


def estimate_gib(
    s: ModelShape,
    quantization: str,
    lora_r: int,
    tokens: int,
    skip: int,
    offload: bool,
    fused: bool = False,
    fp8: bool = False,
    reference_pass: bool = False,
) -> float:
    """Estimated peak GiB of one training step (see the module docstring for the terms); `fused`:
    the LoRA layers run through the fused LoRA function; `fp8`: `training.fp8` on; `reference_pass`:
    a no-grad reference forward between the forward and the backward (DPO)."""
    linears = _linears(s)
    base = s.layers * sum(i * o for i, o in linears) * WEIGHT_BYTES[quantization]
    embed = s.vocab * s.hidden * 2 * (1 if s.tied_embeddings else 2)
    lora = s.layers * sum(lora_r * (i + o) for i, o in linears) * 16
    layer_input = tokens * s.hidden * 2
    checkpointed = s.layers - skip
    kept_inputs = 2 * layer_input if offload else checkpointed * layer_input
    if fused:
        layer_acts = tokens * 2 * (7 * s.hidden + 3 * s.intermediate)
        # FP8 (recompute and input gradient only) adds e4m3 copies of the widest input and gradient
        # and of a weight during the recompute: 3 B x tokens x ff, 0.33 GiB at 8B 4 x 2048, where
        # r26 measured +0.35 on lean and +0.19 on skip 12 (whose peak is the forward's end)
        recompute_fp8 = 3 * tokens * s.intermediate if fp8 else 0
        forward_end = (0.25 + (1.0 if reference_pass else 0.0)) * layer_acts
        transient = max(skip * layer_acts + forward_end, 1.7 * layer_acts + recompute_fp8)
    else:
        layer_acts = tokens * 2 * (8 * s.hidden + 4 * s.intermediate)
        # the recompute (1.7 layers) outweighs the reference's one layer on top of the same kept set
        transient = skip * layer_acts + 1.7 * layer_acts
    return (base + embed + lora + kept_inputs + transient) / GIB


def choose_policy(
    s: ModelShape,
    quantization: str,
    lora_r: int,
    batch: int,
    seq: int,
    budget_gib: float,
    allow_offload: bool = True,
    fused: bool = False,
    fp8: bool = False,
    rows_per_sample: int = 1,
    reference_pass: bool = False,
) -> MemoryPolicy:
    """The fastest (skip, offload) whose estimate fits `HEADROOM * budget_gib`, else the smallest;
    `fused`, `fp8` and `reference_pass` as for `estimate_gib`; `rows_per_sample`: rows a sample
    puts in the forward (2 for a preference pair)."""
    if budget_gib <= 0:
        raise ValueError(f"budget must be > 0 GiB, got {budget_gib}")
    tokens = batch * rows_per_sample * seq
    ranked = [
        (skip, offload)
        for skip in range(s.layers, -1, -1)
        for offload in ((False, True) if allow_offload and skip < s.layers else (False,))
    ]

    def estimate(skip: int, offload: bool) -> float:
        return estimate_gib(s, quantization, lora_r, tokens, skip, offload, fused, fp8, reference_pass)

    for skip, offload in ranked:
        est = estimate(skip, offload)
        if est <= HEADROOM * budget_gib:
            return MemoryPolicy(skip, offload, est, True)
    smallest = min(ranked, key=lambda so: estimate(*so))
    return MemoryPolicy(smallest[0], smallest[1], estimate(*smallest), False)


def budget_applies(recipe: Recipe, device_type: str) -> bool:
    """Whether `training.max_memory_gib` picks the policy of a run on `device_type`; says in one
    line why not where it is set but ignored (the estimate is of GPU memory only)."""
    budget = recipe.training.max_memory_gib
    if budget and device_type != "cuda":
        print(
            f"max_memory_gib {budget:g}: a GPU memory budget, ignored on this {device_type} run "
            "(the recipe's checkpoint settings run as written)",
            flush=True,
        )
    return bool(budget) and device_type == "cuda"


def budgeted_training_config(model, recipe: Recipe) -> TrainingConfig:
    """`recipe.training` with the checkpoint policy `training.max_memory_gib` picks for `model`
    (printed as it is chosen); the recipe's own when no budget is set or checkpointing is off."""
    return with_policy(recipe.training, budget_policy(model, recipe))


def with_policy(cfg: TrainingConfig, policy: Optional[MemoryPolicy]) -> TrainingConfig:
    """`cfg` with a chosen policy's checkpoint settings (unchanged for None)."""
    if policy is None:
        return cfg
    return replace(
        cfg, checkpoint_skip_layers=policy.checkpoint_skip_layers, checkpoint_offload=policy.checkpoint_offload
    )


def budget_policy(model, recipe: Recipe) -> Optional[MemoryPolicy]:
    """The policy `training.max_memory_gib` picks for `model`, printed; None when no budget is set
    or checkpointing is off (there is nothing to pick)."""
    cfg = recipe.training
    if not cfg.max_memory_gib:
        return None
    if not cfg.gradient_checkpointing:
        print(
            f"max_memory_gib {cfg.max_memory_gib:g}: ignored, it picks a checkpointing policy and "
            "training.gradient_checkpointing is false",
            flush=True,
        )
        return None
    from peftchat.model.adapters import unwrap_peft
    from peftchat.train.preference import uses_precomputed_reference
    from peftchat.train.speedups import fused_lora_enabled

    budget = float(cfg.max_memory_gib)
    pairs = cfg.objective != "sft"
    policy = choose_policy(
        ModelShape.from_config(unwrap_peft(model).config),
        recipe.model.quantization,
        recipe.adapter.r,
        cfg.batch_size,
        recipe.data.max_length,
        budget,
        fused=fused_lora_enabled(model, cfg),
        fp8=bool(cfg.fp8),
        rows_per_sample=2 if pairs else 1,
        reference_pass=cfg.objective == "dpo" and not uses_precomputed_reference(recipe),
    )
    print(policy.describe(budget), flush=True)
    return policy

"""The peer: LoRA/QLoRA fine-tuning written by hand with plain transformers + peft + bitsandbytes.

Nothing from peftchat is used here; these are the setups a user would copy from a tutorial or
tune by hand, so the comparison says what peftchat adds on top of the libraries.

* tutorial: `prepare_model_for_kbit_training` (upcasts non-quantized weights to fp32) + its
  default (reentrant) gradient checkpointing; for bf16 LoRA, checkpointing + input grads.
* tuned: bf16 weights kept, non-reentrant checkpointing, `model.train()`.
* tuned_liger: tuned + `apply_liger_kernel_to_llama()` (RMSNorm, SwiGLU, RoPE, fused linear CE).
* tuned_liger_nockpt: tuned_liger without checkpointing (speed bound at any memory cost).
"""

from __future__ import annotations

from typing import Any

import torch

PEER_VARIANTS = ("tutorial", "tuned", "tuned_liger", "tuned_liger_nockpt")

LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


def quantization_config(mode: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "bf16":
        return None
    raise ValueError(f"unknown mode {mode!r}")


def build_peer(variant: str, mode: str, model_dir: str, device: str, dropout: float = 0.05) -> torch.nn.Module:
    """Load the saved model the way the variant's user would and wrap it with LoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if variant not in PEER_VARIANTS:
        raise ValueError(f"unknown peer variant {variant!r}")
    if variant.startswith("tuned_liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # class-level patch, before the model is built
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization_config(mode, torch.bfloat16),
        dtype=torch.bfloat16,
        device_map={"": device},
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    if variant == "tutorial":
        if mode in ("nf4", "int8"):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    elif variant != "tuned_liger_nockpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=dropout, **LORA))
    model.train()
    return model


def peer_step_fn(model: torch.nn.Module, lr: float = 2e-4, max_grad_norm: float = 1.0):
    """The hand-written training step: HF loss (`labels`, else every position), AdamW, clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels", batch["input_ids"]),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step

"""Ablation variants: the tuned peer plus one peftchat optimisation at a time.

Each probe loads the model exactly like the tuned peer (bf16 kept, non-reentrant checkpointing,
LoRA from peft) and then adds the options named in its spec, using the same functions
peftchat's engine uses (`peftchat.model.kernels`). A row per option set gives what each
optimisation buys on its own, independent of the rest of peftchat's loop.

Options (joined with '+', e.g. ``probe:liger+fce+ac+skip6+mb2``):
  liger    liger RMSNorm/SwiGLU/RoPE patched into the instance (apply_fused_kernels)
  fce      loss by liger's fused linear cross-entropy over label positions (no logits)
  chunk    loss by chunked CE over label positions (bf16 logits per chunk, never all at once)
  ac       forward under bf16 autocast: LoRA matmuls and inputs stay bf16 (peft otherwise casts
           each LoRA input to the fp32 adapter dtype)
  skipN    N last decoder layers not checkpointed
  nockpt   no checkpointing at all
  offload  checkpointed layer inputs parked in pinned host memory (kernels.offloaded_checkpoint)
  mbN      micro-batches of N rows, gradients accumulated to the same batch
  compile  torch.compile on each decoder layer
"""

from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace
from typing import Any

import torch


def parse_options(spec: str) -> dict[str, Any]:
    opts: dict[str, Any] = dict(liger=False, fce=False, chunk=False, ac=False, skip=0, nockpt=False, mb=0,
                                compile=False, offload=False)
    for tok in filter(None, spec.split("+")):
        m = re.fullmatch(r"(skip|mb)(\d+)", tok)
        if m:
            opts[m.group(1)] = int(m.group(2))
        elif tok in opts and isinstance(opts[tok], bool):
            opts[tok] = True
        else:
            raise ValueError(f"unknown probe option {tok!r} in {spec!r}")
    return opts


def chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Sum of CE over rows, logits formed `chunk` rows at a time and recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    def part(h, y):
        return torch.nn.functional.cross_entropy((h @ weight.t()).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(part, hidden[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
    return total


def build_probe(spec: str, mode: str, model_dir: str, device: str):
    """Return (model, step_fn, applied) for the probe options in `spec`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks import peer_variants
    from peftchat.model import kernels

    opts = parse_options(spec)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=peer_variants.quantization_config(mode, torch.bfloat16), dtype=torch.bfloat16,
        device_map={"": device}, attn_implementation="sdpa")
    model.config.use_cache = False
    recipe = SimpleNamespace(training=SimpleNamespace(
        fused_kernels=True if opts["liger"] else False, gradient_checkpointing=not opts["nockpt"],
        checkpoint_skip_layers=opts["skip"], checkpoint_offload=opts["offload"]))
    applied = kernels.apply_fused_kernels(model, recipe.training) if opts["liger"] else []
    n_ckpt = kernels.apply_checkpoint_policy(model, recipe.training)
    applied.append(f"checkpointed_layers={n_ckpt}" + (" offloaded" if opts["offload"] else ""))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.05, **peer_variants.LORA))
    model.train()
    causal_lm = model.get_base_model()
    if opts["compile"]:
        for layer in causal_lm.model.layers:
            layer.compile()
        applied.append("compile:layers")
    dev_type = torch.device(device).type
    amp = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if opts["ac"] else contextlib.nullcontext
    if opts["ac"]:
        applied.append("autocast:bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with amp():
            if not (opts["fce"] or opts["chunk"]):
                return model(input_ids=ids, labels=ids).loss
            hidden = causal_lm.model(input_ids=ids).last_hidden_state
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            y = ids[:, 1:].reshape(-1)
            w = causal_lm.lm_head.weight
            if opts["fce"]:
                return kernels.fused_linear_cross_entropy(h, w, y, reduction="mean")
            return chunked_ce(h, w, y) / y.numel()

    if opts["fce"]:
        applied.append("loss:fused_linear_ce")
    elif opts["chunk"]:
        applied.append("loss:chunked_ce")

    def step(batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"]
        parts = ids.split(opts["mb"]) if opts["mb"] else (ids,)
        total = ids.new_zeros((), dtype=torch.float32)
        for part in parts:
            loss = loss_of(part) * (part.shape[0] / ids.shape[0])
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return model, step, applied

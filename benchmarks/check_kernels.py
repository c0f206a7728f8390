"""Correctness of peftchat.model.kernels on a small random Llama: same loss and LoRA gradients
with every checkpoint policy (plain, skip, offloaded) and, on CUDA, with liger's kernels and
fused linear cross-entropy, against an un-checkpointed reference with the same dropout masks.

    python -m benchmarks.check_kernels --device cuda      # prints one JSON line per check
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import torch


def tiny_llama(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, use_cache=False)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def lora_grads(device: str, dtype: torch.dtype, ckpt: bool, skip: int = 0, offload: bool = False,
               fused: bool = False, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one step (dropout 0.1, same RNG seed each call)."""
    from peft import LoraConfig, get_peft_model

    from peftchat.model import kernels

    model = tiny_llama(device, dtype, seed)
    recipe = SimpleNamespace(training=SimpleNamespace(gradient_checkpointing=ckpt, checkpoint_skip_layers=skip,
                                                      checkpoint_offload=offload, fused_kernels=fused))
    if fused:
        kernels.apply_fused_kernels(model, recipe.training)
    kernels.apply_checkpoint_policy(model, recipe.training)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    model.train()
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the gradients non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(device=p.device).manual_seed(1))
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, 1000, (2, 64), generator=g).to(device)
    torch.manual_seed(seed + 3)
    base = model.get_base_model()
    hidden = base.model(input_ids=ids).last_hidden_state
    h, y = hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
    if fused:
        loss = kernels.fused_linear_cross_entropy(h, base.lm_head.weight, y, reduction="mean")
    else:
        loss = torch.nn.functional.cross_entropy(base.lm_head(h).float(), y)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def compare(ref: tuple[float, dict], got: tuple[float, dict]) -> dict[str, float]:
    num = sum(float((got[1][k] - ref[1][k]).norm() ** 2) for k in ref[1]) ** 0.5
    den = sum(float(ref[1][k].norm() ** 2) for k in ref[1]) ** 0.5
    missing = [k for k in ref[1] if got[1].get(k) is None]
    return {"loss_ref": ref[0], "loss": got[0], "grad_rel_err": num / den, "missing_grads": len(missing)}


def run_checks(device: str) -> list[dict]:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    ref = lora_grads(device, dtype, ckpt=False)
    cases = {"checkpoint_all": dict(ckpt=True), "checkpoint_skip2": dict(ckpt=True, skip=2),
             "checkpoint_offload": dict(ckpt=True, offload=True),
             "checkpoint_offload_skip1": dict(ckpt=True, offload=True, skip=1)}
    if device.startswith("cuda"):
        cases["liger_fused_ce_offload"] = dict(ckpt=True, offload=True, fused=True)
    out = []
    for name, kw in cases.items():
        out.append({"check": name, "device": device, **compare(ref, lora_grads(device, dtype, **kw))})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for row in run_checks(args.device):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

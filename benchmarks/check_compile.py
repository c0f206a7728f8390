"""Does `training.compile` train the same model as eager? Loss trajectories of a small random Llama
with LoRA (bf16, autocast as the loop runs it), eager vs torch.compile'd decoder layers, with and
without checkpointing, LoRA dropout 0 (must match closely) and 0.05 (same statistics).

    python -m benchmarks.check_compile --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import torch


def trajectory(device: str, compile_: bool, ckpt: bool, dropout: float, steps: int = 8) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftchat.model import kernels

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2000, use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    recipe = SimpleNamespace(training=SimpleNamespace(gradient_checkpointing=ckpt, checkpoint_skip_layers=0,
                                                      checkpoint_offload=False, fused_kernels=False, compile=compile_))
    kernels.apply_training_speedups(model, recipe.training)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    ids = torch.randint(0, 2000, (4, 128), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []
    for _ in range(steps):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for dropout in (0.0, 0.05):
        for compile_, ckpt in ((False, False), (False, True), (True, False), (True, True)):
            torch._dynamo.reset()
            row = {"dropout": dropout, "compile": compile_, "checkpoint": ckpt,
                   "losses": trajectory(args.device, compile_, ckpt, dropout)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

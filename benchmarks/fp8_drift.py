"""Which pass of FP8 moves the loss curve: a small bf16 Llama, every layer checkpointed, trained with
the fused LoRA function from the same init and data in bf16 and with FP8 in several passes (the
recipe's, all, both forwards, the input gradient, the recompute), and each curve's largest
relative distance from the bf16 one.

Written after round 3's 8B rows (benchmarks/RESULTS.md): lean + fp8 left the eager curve by 1.7 %
within 6 steps. Cheap enough for CPU (eager FP8 path, `torch._scaled_mm` runs there) and for the
GPU (compiled path), where `--layers 32 --hidden 4096` approaches the 8B shape. Round 4 answered
the question on the 8B bench itself (`peftchat:lean+fp8fwd` / `+fp8grad`, RESULTS.md): the forward
side (1.65 %); the input gradient alone stays at 0.05 %. Small CPU models show neither (< 0.1 %).

    python -m benchmarks.fp8_drift --steps 20                      # CPU: 4 layers, hidden 512
    python -m benchmarks.fp8_drift --steps 300 --modes bf16,peft,fp8,fp8grad,fp8rec   # round 9: a long run
    python3 -m benchmarks.fp8_drift --device cuda --layers 32 --hidden 2048 --seq 2048 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def train_curve(model_state: dict, cfg, data: list[torch.Tensor], mode: str, steps: int, lr: float,
                device: str) -> list[float]:
    """Losses of `steps` steps with every decoder layer checkpointed (so a recompute exists) and
    FP8 in the passes of `mode`: "bf16", "fp8" (the recipe's FP8_PASSES) or a FP8_PASS_TOKENS key;
    "peft" trains through peft's layers in bf16: how far rounding differences alone carry a curve."""
    import peftchat.model.frozen_linear as fl
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from benchmarks.peftchat_variants import FP8_PASS_TOKENS
    from peftchat.model.fp8 import Fp8Passes

    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    model.load_state_dict(model_state)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(2)  # the same LoRA init in every mode
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 adapter under bf16 autocast, as peftchat trains
    model.train()
    passes = Fp8Passes(**FP8_PASS_TOKENS[mode]) if mode in FP8_PASS_TOKENS else None
    if mode != "peft":  # "peft": peft's own LoRA layers in bf16, the same sums rounded otherwise (the noise floor)
        fl.fuse_lora_layers(model, fp8=mode != "bf16", passes=passes)
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        ids = data[step % len(data)].to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def main(argv: list[str] | None = None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--modes", default="bf16,fp8,fp8all,fp8fwd,fp8grad,fp8rec", help="bf16 first: the reference")
    p.add_argument("--out", default="", help="also write the report (JSON) here")
    args = p.parse_args(argv)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq)
    torch.manual_seed(0)
    state = copy.deepcopy(LlamaForCausalLM(cfg).to(torch.bfloat16).state_dict())
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g) for _ in range(8)]
    curves = {mode: train_curve(state, cfg, data, mode, args.steps, args.lr, args.device)
              for mode in args.modes.split(",")}
    ref = curves["bf16"]
    tail = max(1, args.steps // 10)  # the end of a long run, where round 9's 1B FP8 curve sat 2 % above bf16's

    def end_diff(c: list[float]) -> float:
        return (sum(c[-tail:]) - sum(ref[-tail:])) / sum(ref[-tail:])

    report = {"args": vars(args), "curves": curves,
              "max_rel_diff_vs_bf16": {m: max(abs(a - b) / abs(b) for a, b in zip(c, ref)) for m, c in curves.items()},
              "last_tenth_rel_diff_vs_bf16": {m: end_diff(c) for m, c in curves.items()}}
    print(json.dumps(report["max_rel_diff_vs_bf16"]))
    print(json.dumps(report["last_tenth_rel_diff_vs_bf16"]))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

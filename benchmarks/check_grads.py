"""Which loss curve is right? First-step LoRA gradients and a few-step loss trajectory of each
training path, against an fp32 reference on the same weights, data and seed.

Model: a random Llama (bf16 base weights, or with `--quant nf4` the same weights loaded NF4 as the
8B runs load them; the fp32 reference computes in fp32 from the very same values), LoRA
r16 on every linear with B drawn small and non-zero (so A has a gradient at step 1 too), dropout 0
(every path computes the same function), batch of random tokens, peftchat's own loss
(`causal_lm_loss`). Paths (kernels.apply_training_speedups with the recipe keys the settings use):

  eager    bf16 autocast, every layer checkpointed, no fused kernels (the loss gate's reference)
  compile  eager + training.compile (regional torch.compile of each decoder layer)
  fast     liger kernels + fused linear CE, last layer not checkpointed
  lean     liger kernels + fused linear CE + checkpoint_offload

compile runs before the liger paths: liger's RoPE patch is process-wide. Per path: relative error
‖g − g32‖ / ‖g32‖ over all LoRA gradients, cosine, share of gradient elements with the fp32 sign
(AdamW's first step moves each weight by ±lr along that sign), and the losses of `--steps` AdamW
steps next to the fp32 ones.

    python -m benchmarks.check_grads --device cuda [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PATHS = {
    "eager": dict(compile=False, fused_kernels=False, checkpoint_skip_layers=0, checkpoint_offload=False),
    "compile": dict(compile=True, fused_kernels=False, checkpoint_skip_layers=0, checkpoint_offload=False),
    "fast": dict(compile=False, fused_kernels="auto", checkpoint_skip_layers=1, checkpoint_offload=False),
    "lean": dict(compile=False, fused_kernels="auto", checkpoint_skip_layers=0, checkpoint_offload=True),
}


_SAVED: dict[str, str] = {}


def _nf4_model(device: str, compute_dtype: torch.dtype, shape: dict, seed: int):
    """The same random bf16 weights, saved once and loaded back NF4-quantized as users load them
    (the fp32 reference dequantizes the very same codes into fp32 compute)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    key = json.dumps([shape, seed])
    if key not in _SAVED:
        torch.manual_seed(seed)
        path = tempfile.mkdtemp(prefix="check_grads_")
        LlamaForCausalLM(LlamaConfig(**shape, use_cache=False)).to(torch.bfloat16).save_pretrained(path)
        _SAVED[key] = path
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(_SAVED[key], quantization_config=q, dtype=compute_dtype,
                                                device_map={"": device}, attn_implementation="sdpa")


def build(device: str, dtype: torch.dtype, shape: dict, seed: int = 0, quant: str = "bf16", dropout: float = 0.0):
    """A random Llama of `shape` (`quant` "nf4": its NF4 base) under LoRA r 16 on every linear, the
    same A and non-zero B on every call with the same seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if quant == "nf4":
        model = _nf4_model(device, dtype, shape, seed)
        model.config.use_cache = False
    else:
        torch.manual_seed(seed)
        cfg = LlamaConfig(**shape, use_cache=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).to(dtype).to(device)  # same values in every dtype
    torch.manual_seed(seed + 2)  # LoRA A is drawn from the global RNG: the same A for every path
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model


def run_path(name: str, device: str, shape: dict, ids: torch.Tensor, steps: int, lr: float, quant: str = "bf16"):
    from peftchat.config import TrainingConfig
    from peftchat.model import kernels
    from peftchat.train.loss import causal_lm_loss, make_loss

    fp32 = name == "fp32"
    model = build(device, torch.float32 if fp32 else torch.bfloat16, shape, quant=quant)
    loss_fn = causal_lm_loss
    if not fp32:
        cfg = TrainingConfig(gradient_checkpointing=True, autocast=True, **PATHS[name])
        loss_fn = make_loss(kernels.apply_training_speedups(model, cfg).head_loss)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=lr)
    batch = {"input_ids": ids, "labels": ids}
    losses, first_grads = [], None
    for _ in range(steps):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=not fp32):
            loss = loss_fn(model, batch)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().float().flatten().cpu() for n, p in params.items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    del model, opt
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return first_grads, losses


def compare(grads: dict, ref: dict) -> dict:
    g = torch.cat([grads[n] for n in ref])
    r = torch.cat([ref[n] for n in ref]).double()
    g = g.double()
    nz = r != 0
    return {"rel_err": float((g - r).norm() / r.norm()), "cosine": float(g @ r / (g.norm() * r.norm())),
            "sign_agree": float(((g.sign() == r.sign()) & nz).sum() / nz.sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--paths", default="eager,compile,fast,lean")
    p.add_argument("--quant", default="bf16", choices=("bf16", "nf4"), help="base weights (the 8B runs are nf4)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    shape = dict(hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512),
                 vocab_size=32000)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(2)).to(args.device)
    ref_grads, ref_losses = run_path("fp32", args.device, shape, ids, args.steps, args.lr, args.quant)
    rows = [{"path": "fp32", "losses": ref_losses}]
    print(json.dumps(rows[0]), flush=True)
    for name in args.paths.split(","):
        if name == "compile" and args.device == "cpu":
            continue
        torch._dynamo.reset()
        grads, losses = run_path(name, args.device, shape, ids, args.steps, args.lr, args.quant)
        row = {"path": name, **compare(grads, ref_grads), "losses": losses,
               "loss_max_rel_diff_vs_fp32": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "check_grads.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The LoRA model the model-layer tests train: peft LoRA r 4 on every linear, B non-zero."""

import torch


def with_lora(model, dropout: float = 0.2, b_scale: float = 0.05):
    """`model` under peft LoRA (r 4, alpha 8, all linears; A from seed 0), in train mode. LoRA B
    starts at zero in peft; here it is random, so every LoRA gradient (and with dropout, every
    mask) shows in the loss."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # LoRA A is initialised from the global RNG
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    return model.train()


def loss_and_grads(model, vocab: int = 200):
    """(loss, {name: gradient} of the trainable parameters) of one forward/backward on fixed ids,
    with the same dropout masks for every model (the global RNG is reseeded)."""
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def nf4_lora_layer(k: int, n: int, dropout: float, device: str, seed: int = 0, rank: int = 16):
    """A peft LoRA Linear (rank `rank`, random non-zero B, fp32 adapter as peftchat keeps it) over
    an NF4 bitsandbytes base of shape k -> n, on `device`."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora import bnb as lora_bnb

    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    base.load_state_dict(dense.state_dict())
    base = base.to(device)
    kw = dict(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, init_lora_weights=False)
    layer = lora_bnb.Linear4bit(base, "default", config=LoraConfig(**kw), **kw).to(device)
    return layer.train()

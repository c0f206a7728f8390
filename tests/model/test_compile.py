"""training.compile at LoRA dropout > 0 (CPU inductor): with eager random ops the compiled layers
draw eager's very dropout masks, in forward and checkpoint recompute, so loss and LoRA gradients
equal eager's; this holds for torch's checkpoint compiled with the layer and for the offloaded
checkpoint around a compiled body (the combination config.py used to refuse)."""

import pytest
import torch
from lora_helpers import with_lora

from peftchat.config import TrainingConfig, recipe_from_dict
from peftchat.train import speedups as kernels


def _loss_and_grads(compiled: bool, **policy):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        )
    )
    model = with_lora(model, dropout=0.3, b_scale=0.2)  # the loss and every LoRA gradient depend on the masks
    kernels.apply_checkpoint_policy(model, TrainingConfig(gradient_checkpointing=True, **policy))
    if compiled:
        kernels.compile_decoder_layers(model, eager_random=True)
    model.train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


# one decoder layer each (compile time on CPU): torch's checkpoint compiled with the layer (the
# fast setting), and the offloaded checkpoint around a compiled body (lean + compile)
@pytest.mark.parametrize("policy", [dict(), dict(checkpoint_offload=True)], ids=["torch-checkpoint", "offload"])
def test_compiled_layers_draw_eager_dropout_masks(policy):
    ref_loss, ref = _loss_and_grads(False, **policy)
    loss, got = _loss_and_grads(True, **policy)
    assert loss == pytest.approx(ref_loss, rel=1e-5)  # same forward masks
    # same masks in the recompute: other masks would move these by tens of percent
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_compile_and_offload_combine():
    r = recipe_from_dict(
        {
            "model": {"path": "m"},
            "data": {"train": "x.jsonl"},
            "training": {"compile": True, "checkpoint_offload": True},
        }
    )
    assert r.training.compile and r.training.checkpoint_offload

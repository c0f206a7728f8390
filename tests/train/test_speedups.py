"""peftchat.train.speedups on CPU: typed recipe keys, the checkpoint policy, and the offloaded
checkpoint's recompute path (same loss and LoRA gradients as no checkpointing, dropout included)."""

import pytest
import torch
from lora_helpers import loss_and_grads, with_lora

from peftchat.config import TrainingConfig, recipe_from_dict
from peftchat.errors import ConfigError
from peftchat.train import speedups as kernels


def _training(**kw):
    return TrainingConfig(**{"gradient_checkpointing": True, **kw})


def _lora_model(tiny_llama_dir, recipe, dropout=0.2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    kernels.apply_checkpoint_policy(model, recipe)
    return with_lora(model, dropout)


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (True, True), ("false", False), ("True", True)])
def test_fused_kernels_is_typed_by_the_config(value, expected):
    r = recipe_from_dict({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "training": {"fused_kernels": value}})
    assert r.training.fused_kernels == expected and type(r.training.fused_kernels) is type(expected)


@pytest.mark.parametrize(
    "training,match",
    [({"fused_kernels": "fast"}, "training.fused_kernels"), ({"checkpoint_skip_layers": -1}, "checkpoint_skip_layers")],
)
def test_config_rejects_bad_speed_keys(training, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "training": training})


def test_fused_kernels_off_on_cpu(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    assert kernels.apply_fused_kernels(model, _training(fused_kernels="auto")) == []
    assert kernels.apply_fused_kernels(model, _training(fused_kernels=False)) == []
    with pytest.raises(ConfigError, match="training.fused_kernels"):
        kernels.apply_fused_kernels(model, _training(fused_kernels=True))
    done = kernels.apply_training_speedups(model, _training(fused_kernels="auto"))
    assert done.head_loss is None and done.applied == ["loss:chunked", "checkpointed 2/2 layers"]


def test_checkpoint_policy_skips_the_last_layers(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir, _training(checkpoint_skip_layers=1))
    flags = [layer.gradient_checkpointing for layer in kernels.decoder_layers(model)]
    assert flags == [True, False]
    # inputs carry grad, for remote code that still checkpoints with the reentrant variant
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad
    assert kernels.apply_checkpoint_policy(model, _training(checkpoint_skip_layers=5)) == 0
    assert kernels.apply_checkpoint_policy(model, _training(gradient_checkpointing=False)) == 0
    assert not any(layer.gradient_checkpointing for layer in kernels.decoder_layers(model))


@pytest.mark.parametrize(
    "policy", [dict(checkpoint_offload=True), dict(checkpoint_offload=True, checkpoint_skip_layers=1), dict()]
)
def test_checkpointed_gradients_equal_uncheckpointed(tiny_llama_dir, policy):
    ref_loss, ref = loss_and_grads(_lora_model(tiny_llama_dir, _training(gradient_checkpointing=False)))
    model = _lora_model(tiny_llama_dir, _training(**policy))
    if policy.get("checkpoint_offload"):
        assert all(
            layer._gradient_checkpointing_func.func is kernels.offloaded_checkpoint
            for layer in kernels.decoder_layers(model)
        )
    loss, got = loss_and_grads(model)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert set(got) == set(ref) and len(ref) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7)

"""Periodic evaluation must not change what is trained: the same recipe with `eval_steps` > 0
and = 0 gives bit-identical adapters, for a bf16, an 8-bit and a 4-bit base.

On CPU, bitsandbytes repacks a 4-bit layer's weight for its AVX512-BF16 inference kernel at the
layer's first eval-mode forward and never unpacks it; training would then backpropagate through
`gemv_4bit`, which has no autograd kernel (issue 13). `load_base_model` switches that repack off
for training models."""

import os

import pytest
import torch
from safetensors.torch import load_file

from peftchat.config import load_recipe
from peftchat.train.loop import train

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def _run(tiny_llama_dir, out, quantization, eval_steps):
    dtype = "bf16" if quantization == "none" else "fp32"
    recipe = load_recipe(
        os.path.join(RECIPES, "demo.yaml"),
        [
            f"model.path={tiny_llama_dir}",
            f"training.output_dir={out}",
            "training.device=cpu",
            "training.tensorboard=false",
            f"model.quantization={quantization}",
            f"model.dtype={dtype}",
            "model.compute_dtype=bf16",
            "data.eval_split=1",
            "data.max_length=96",
            "training.max_steps=3",
            "adapter.modules_to_save=null",
            f"training.eval_steps={eval_steps}",
            "training.save_steps=0",
            "training.log_steps=1",
            "training.batch_size=2",
            "training.gradient_checkpointing=false",
        ],
    )
    train(recipe)
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_periodic_eval_leaves_the_adapter_bit_identical(tiny_llama_dir, tmp_path, quantization):
    with_eval = _run(tiny_llama_dir, tmp_path / "eval", quantization, eval_steps=1)
    without = _run(tiny_llama_dir, tmp_path / "plain", quantization, eval_steps=0)
    assert with_eval.keys() == without.keys()
    for name, tensor in with_eval.items():
        assert torch.equal(tensor, without[name]), name

"""Base-model loading: local dirs, dtypes, 4-bit, attention kernels, training set-up, errors."""

import pytest
import torch

from peftchat.cli import main
from peftchat.config import recipe_from_dict
from peftchat.errors import UserError
from peftchat.model.load import load_base_model, resolve_device


def _recipe(path, **model):
    return recipe_from_dict(
        {"model": {"path": str(path), **model}, "data": {"train": "x.jsonl"}, "training": {"device": "cpu"}}
    )


def test_fp32_training_setup(tiny_llama_dir):
    model = load_base_model(_recipe(tiny_llama_dir, dtype="fp32"))
    assert model.training  # from_pretrained returns eval mode, where checkpointing is skipped
    assert model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False
    # checkpointing is apply_training_speedups' alone (after LoRA), never the loader's
    assert not model.model.layers[0].gradient_checkpointing
    assert model.config._attn_implementation == "sdpa"


def test_bf16_and_inference_mode(tiny_llama_dir):
    r = _recipe(tiny_llama_dir, dtype="bf16")
    r.training.gradient_checkpointing = False
    model = load_base_model(r, for_training=False)
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert not model.model.layers[0].gradient_checkpointing


def test_4bit_nf4_keeps_other_weights_in_model_dtype(tiny_llama_dir):
    import bitsandbytes as bnb

    model = load_base_model(
        _recipe(
            tiny_llama_dir, dtype="fp32", quantization="4bit", quant_type="nf4", double_quant=True, compute_dtype="fp32"
        )
    )
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_type == "nf4" and q.weight.quant_state.nested  # double quant
    assert q.compute_dtype == torch.float32
    # no prepare_model_for_kbit_training: norms and embeddings keep the model dtype
    assert model.model.norm.weight.dtype == torch.float32
    assert model.training


def test_missing_local_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model not found"):
        load_base_model(_recipe(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_base_model(_recipe(tmp_path / "empty"))


def test_flash_attention_without_package_or_gpu(tiny_llama_dir):
    with pytest.raises(UserError, match="flash_attention_2"):
        load_base_model(_recipe(tiny_llama_dir, attn_implementation="flash_attention_2"))


def test_resolve_device():
    r = _recipe("/x")
    assert resolve_device(r) == torch.device("cpu")
    r.training.device = "auto"
    assert resolve_device(r).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        r.training.device = "cuda"
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device(r)
    r.training.device = "tpu"
    with pytest.raises(UserError, match="training.device"):
        resolve_device(r)


def test_cli_train_missing_model_exits_2_with_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{path: {tmp_path / 'missing-model'}}}\n"
        "data: {train: '${asset:demo/moss_demo.jsonl}', format: moss, collator: moss}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, device: cpu}}\n"
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftchat: error: model not found:")
    assert "Traceback" not in err[0]


def test_sdpa_masked_loads_as_plain_sdpa(tiny_llama_dir):
    """`sdpa_masked` is a recipe value, not a transformers name: the model gets sdpa."""
    model = load_base_model(_recipe(tiny_llama_dir, dtype="fp32", attn_implementation="sdpa_masked"))
    assert model.config._attn_implementation == "sdpa"

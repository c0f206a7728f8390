"""LoRA through peft from the recipe's adapter section."""

import pytest
import torch

from peftchat.config import recipe_from_dict
from peftchat.errors import UserError
from peftchat.model.adapters import apply_lora, count_parameters
from peftchat.model.load import load_base_model


def _recipe(path, **adapter):
    return recipe_from_dict(
        {
            "model": {"path": str(path), "dtype": "fp32"},
            "adapter": adapter,
            "data": {"train": "x.jsonl"},
            "training": {"device": "cpu"},
        }
    )


def _lora_targets(model):
    return sorted({name.split(".")[-1] for name, mod in model.named_modules() if hasattr(mod, "lora_A")})


def test_all_linear_targets_every_projection_not_lm_head(tiny_llama_dir, capsys):
    r = _recipe(tiny_llama_dir, r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    model = apply_lora(load_base_model(r), r)
    assert _lora_targets(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    trainable, total = count_parameters(model)
    # every trainable tensor is a LoRA A/B matrix, and they are float32
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.task_type) == (4, 8, 0.1, "CAUSAL_LM")
    assert f"trainable params: {trainable:,} of {total:,}" in capsys.readouterr().out


def test_named_targets_dora_rslora_modules_to_save(tiny_llama_dir):
    r = _recipe(
        tiny_llama_dir,
        r=2,
        alpha=4,
        target_modules=["q_proj", "v_proj"],
        use_dora=True,
        use_rslora=True,
        modules_to_save=["lm_head"],
        bias="lora_only",
    )
    model = apply_lora(load_base_model(r), r, verbose=False)
    assert _lora_targets(model) == ["q_proj", "v_proj"]
    cfg = model.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora and cfg.bias == "lora_only"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert any("lm_head.modules_to_save" in n for n in names)
    # rsLoRA scales by alpha / sqrt(r)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(4 / 2**0.5)


def test_unknown_target_module_is_a_user_error(tiny_llama_dir):
    r = _recipe(tiny_llama_dir, target_modules=["no_such_proj"])
    with pytest.raises(UserError, match="no_such_proj"):
        apply_lora(load_base_model(r), r)

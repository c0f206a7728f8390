"""Chat sources: a recipe (with or without a trained adapter), an adapter or checkpoint dir, a
merged model dir (with or without recipe.yaml)."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftchat.config import recipe_from_dict, save_recipe
from peftchat.errors import UserError
from peftchat.infer.loading import load_chat_model, resolve_source
from peftchat.merge import merge_adapter

PROBE = torch.tensor([[1, 40, 50, 600, 700, 8, 90]])


@torch.no_grad()
def _logits(model):
    return model(input_ids=PROBE).logits


def _recipe_file(tmp_path, data):
    path = tmp_path / "run.yaml"
    save_recipe(recipe_from_dict(data), path)
    return path


def test_recipe_without_adapter_is_the_base(tiny_llama_dir, infer_recipe_dict, tmp_path, capsys):
    path = _recipe_file(tmp_path, infer_recipe_dict(tiny_llama_dir, tmp_path / "not-trained-yet"))
    model, tok, recipe = load_chat_model(path, ["decoding.temperature=0.5"])
    assert not isinstance(model, PeftModel) and recipe.decoding.temperature == 0.5
    assert "no trained adapter" in capsys.readouterr().err


def test_recipe_finds_its_adapter_or_newest_complete_checkpoint(
    make_adapter, tiny_llama_dir, infer_recipe_dict, tmp_path, capsys
):
    adapter = make_adapter()
    source = resolve_source(_recipe_file(tmp_path, infer_recipe_dict(tiny_llama_dir, adapter)))
    assert source.kind == "recipe" and source.adapter_dir == adapter and source.tokenizer_dir == adapter

    out = tmp_path / "run"
    for step, complete in [(5, True), (10, False)]:  # checkpoint-10 is incomplete: not used
        shutil.copytree(adapter, out / f"checkpoint-{step}")
        if complete:
            (out / f"checkpoint-{step}" / "complete").touch()
    source = resolve_source(_recipe_file(tmp_path, infer_recipe_dict(tiny_llama_dir, out)))
    assert source.adapter_dir == out / "checkpoint-5"
    assert "newest checkpoint checkpoint-5" in capsys.readouterr().err


def test_checkpoint_dir_without_recipe_uses_its_run_recipe(make_adapter, tmp_path):
    adapter = make_adapter(collator="chatglm")
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "checkpoint-3")
    (run / "checkpoint-3" / "recipe.yaml").unlink()
    with pytest.raises(UserError, match="incomplete checkpoint"):  # not marked: a save that did not finish
        resolve_source(run / "checkpoint-3")
    (run / "checkpoint-3" / "complete").touch()
    shutil.copy(adapter / "recipe.yaml", run / "recipe.yaml")
    source = resolve_source(run / "checkpoint-3", ["decoding.max_new_tokens=3"])
    assert source.kind == "checkpoint" and source.recipe.data.collator == "chatglm"
    assert source.recipe.decoding.max_new_tokens == 3


def test_adapter_dir_loads_base_plus_adapter(make_adapter, tmp_path):
    adapter = make_adapter()
    model, _, recipe = load_chat_model(adapter)
    assert isinstance(model, PeftModel) and not model.training
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.path), str(adapter))
    assert torch.allclose(_logits(model), _logits(expected.eval()), atol=1e-6)

    # Without recipe.yaml: the base from adapter_config, the tokenizer's chat template as format.
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    (bare / "recipe.yaml").unlink()
    source = resolve_source(bare)
    assert (
        source.recipe.model.path == json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    assert source.recipe.data.collator == "chat_template"


def test_merged_dir_keeps_the_format_wherever_it_moves(make_adapter, tmp_path):
    adapter = make_adapter(collator="chatglm")
    merged = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=False)
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(merged, moved)
    shutil.rmtree(merged)
    model, tok, recipe = load_chat_model(moved)
    assert recipe.model.path == str(moved) and recipe.data.collator == "chatglm"
    assert recipe.model.quantization == "none" and not isinstance(model, PeftModel)
    adapter_model, _, _ = load_chat_model(adapter)
    assert torch.allclose(_logits(model), _logits(adapter_model), atol=1e-5)


def test_model_dir_without_recipe_uses_the_chat_template(tiny_llama_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama_dir, plain)
    _, tok, recipe = load_chat_model(plain)
    assert recipe.data.collator == "chat_template" and recipe.model.dtype == "fp32"

    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template")
    cfg_path.write_text(json.dumps(cfg))
    for p in plain.glob("chat_template.*"):
        p.unlink()
    with pytest.raises(UserError, match="no chat template"):
        load_chat_model(plain)

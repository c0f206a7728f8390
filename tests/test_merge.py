"""`peftchat merge`: parity of the merged model with the adapter on its base, k-bit merges onto the
dequantized base, the written dir, and the checks that fail before anything is written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftchat.cli import main
from peftchat.config import load_recipe
from peftchat.demo_assets import build_tiny_model
from peftchat.errors import UserError
from peftchat.infer.loading import load_adapter
from peftchat.merge import merge_adapter
from peftchat.model.load import load_base_model

PROBE = [[1, 20, 300, 500, 55, 66, 77, 1200, 9, 2100, 17, 18]]


@torch.no_grad()
def _logits(model, probes=PROBE):
    return torch.cat([model(input_ids=torch.tensor([p])).logits[0].float() for p in probes])


def _trained_logits(adapter_dir):
    """The adapter on its base exactly as training computes it: the recipe's base (quantized as in
    training), train mode (the k-bit layers' training path; dropout is 0 in these recipes)."""
    recipe = load_recipe(adapter_dir / "recipe.yaml")
    model = load_adapter(load_base_model(recipe, device="cpu", for_training=False), adapter_dir)
    model.train()
    return _logits(model)


def _merged_logits(out_dir):
    return _logits(AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval())


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fp32_merge_matches_adapter_on_base(make_adapter, tiny_llama_dir, tmp_path, use_dora):
    adapter = make_adapter(use_dora=use_dora)
    out = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=True)
    merged, trained = _merged_logits(out), _trained_logits(adapter)
    base = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval())
    assert (trained - base).abs().max() > 1e-2  # the adapter changes the model: the test can fail
    assert (merged - trained).abs().max() < 1e-5


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_kbit_adapter_merges_onto_dequantized_base(make_adapter, tmp_path, capsys, quantization):
    adapter = make_adapter(quantization=quantization)
    out = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=True)
    merged, trained = _merged_logits(out), _trained_logits(adapter)
    diff = (merged - trained).abs().max().item()
    # The NF4 training forward dequantizes with dequantize_4bit, and on CPU bitsandbytes trains
    # 8-bit layers with dequantize + matmul: merged and trained differ only in summation order
    # (measured ~4e-7). (On CUDA, 8-bit training quantizes activations too; merge allows for that.)
    assert diff < 1e-4, diff
    err = capsys.readouterr().err
    assert f"merged vs {quantization} base + adapter (as trained)" in err

    # Merging onto the original weights instead is further from what was trained.
    original = merge_adapter(adapter, tmp_path / "original", dtype="fp32", verify=True, onto_original=True)
    drift = (_merged_logits(original) - trained).abs().max().item()
    with capsys.disabled():  # the measured figures, shown with `pytest -s`
        print(f"\n{quantization}: max |merged - quantized base + adapter| = {diff:.3g}; onto original: {drift:.3g}")
    assert drift > diff
    assert "drift" in capsys.readouterr().err


def test_qlora_with_bf16_hidden_states_verifies_in_fp32(make_adapter, tmp_path, capsys):
    """A 4-bit model whose non-quantized parts are bf16 computes its hidden states in bf16, whatever
    its compute dtype: the check against the trained model allows for bf16, the merge check stays fp32."""
    adapter = make_adapter(quantization="4bit", dtype="bf16")
    merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=True)
    err = capsys.readouterr().err
    assert "dequantized fp32 base + unmerged adapter" in err and "(tolerance 0.0001)" in err
    assert "4bit base + adapter (as trained)" in err and "(tolerance 0.05)" in err


def test_bf16_export_verifies_and_writes_a_plain_model_dir(make_adapter, tmp_path):
    adapter = make_adapter()
    out = merge_adapter(adapter, tmp_path / "merged")  # defaults: bf16, verification on (tiny model)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")  # safetensors weights
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in out.iterdir()
    }  # shareable, as the umask allows
    gen = json.loads((out / "generation_config.json").read_text())
    eom = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    eom_id = next(t["id"] for t in eom if t["content"] == "<eom>")
    assert eom_id in gen["eos_token_id"]  # the moss format stops at <eom>
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.model.path == str(out.resolve()) and recipe.model.quantization == "none"
    assert recipe.model.dtype == "bf16" and recipe.data.collator == "moss"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    # A fresh interpreter that never imports peftchat loads it with plain transformers.
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"logits = m(input_ids=torch.tensor({PROBE!r})).logits.float()\n"
        "msgs = [{'role': 'user', 'content': 'hi'}]\n"
        "print(json.dumps({'dtype': str(m.dtype), 'peftchat': any(k.startswith('peftchat') for k in sys.modules),\n"
        "                  'template': t.apply_chat_template(msgs, tokenize=False), 'sum': logits.sum().item()}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16" and got["peftchat"] is False
    assert got["template"] == "<|im_start|>user\nhi<|im_end|>\n"
    in_process = (
        AutoModelForCausalLM.from_pretrained(str(out))(input_ids=torch.tensor(PROBE)).logits.float().sum().item()
    )
    assert got["sum"] == pytest.approx(in_process, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("kind", ["hidden_size", "architecture", "depth"])
def test_adapter_that_does_not_fit_the_base_fails_before_writing(make_adapter, tmp_path, kind):
    adapter = make_adapter()
    if kind == "hidden_size":
        base = build_tiny_model(tmp_path / "base", arch="llama", hidden_size=32, intermediate_size=64)
        match = "shape"
    elif kind == "architecture":
        base = build_tiny_model(tmp_path / "base", arch="qwen2")
        match = "Qwen2ForCausalLM"
    else:
        base = build_tiny_model(tmp_path / "base", arch="llama", num_layers=1)
        match = "layers.1"
    out = tmp_path / "merged"
    with pytest.raises(UserError, match=match):
        merge_adapter(adapter, out, base=str(base), dtype="fp32")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_non_empty_out_needs_force(make_adapter, tmp_path, capsys):
    adapter = make_adapter()
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["merge", "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32", "--no-verify"])
    assert rc == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    rc = main(["merge", "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32", "--no-verify", "--force"])
    assert rc == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # --force never replaces the adapter itself
    with pytest.raises(UserError, match="would overwrite"):
        merge_adapter(adapter, adapter, force=True)


def test_failed_verification_writes_nothing(make_adapter, tmp_path, monkeypatch):
    import peftchat.merge as merge

    monkeypatch.setitem(merge.PRECISION_TOLERANCE, torch.float32, 0.0)
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="verification failed"):
        merge_adapter(make_adapter(), out, dtype="fp32", verify=True)
    assert not out.exists()


def test_big_models_are_written_in_shards(make_adapter, tmp_path, monkeypatch):
    import peftchat.merge as merge

    monkeypatch.setattr(merge, "MAX_SHARD_SIZE", "400KB")  # the tiny fp32 model is ~2.4 MB
    adapter = make_adapter()
    out = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=False)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (_merged_logits(out) - _trained_logits(adapter)).abs().max() < 1e-5


def test_force_keeps_the_old_export_until_the_new_one_is_complete(make_adapter, tmp_path, monkeypatch):
    """A merge that dies while writing leaves the old export whole; the next one cleans the
    partial dir the dead one left and replaces the export."""
    import peftchat.merge as merge

    adapter = make_adapter()
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("the previous export")

    def dies_midway(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill while the tokenizer is written

    monkeypatch.setattr(merge, "_generation_config", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(adapter, out, dtype="fp32", verify=False, force=True)
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    stale = tmp_path / ".merged.partial-999999999"  # a pid no process has
    stale.mkdir()
    merge_adapter(adapter, out, dtype="fp32", verify=False, force=True)
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_an_adapter_trained_with_fp8_merges_with_the_same_parity(tiny_llama_dir, tmp_path, monkeypatch):
    """Issue 16: FP8 changes only how training computes the frozen base matmuls; the adapter it
    saves is an ordinary one, and its merge into the dequantized base keeps k-bit parity."""
    from pathlib import Path

    from peftchat.train import loop
    from peftchat.train import speedups as kernels

    monkeypatch.setattr(kernels, "check_fp8_device", lambda cfg, device: None)  # as on a Hopper GPU
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    out = tmp_path / "run"
    recipe = load_recipe(
        str(recipes / "demo_qlora.yaml"),
        [
            f"model.path={tiny_llama_dir}",
            f"training.output_dir={out}",
            "training.device=cpu",
            "training.max_steps=3",
            "training.lr=1e-2",
            "training.tensorboard=false",
            "adapter.dropout=0",
            "training.gradient_checkpointing=true",
            "training.fused_lora=true",
            "training.fp8=true",
        ],
    )
    applied: list[str] = []
    loop.train(recipe, hooks=loop.TrainHooks(speedups_applied=applied.extend))
    assert "fp8:base_linears 14" in applied
    merged_dir = merge_adapter(out, tmp_path / "merged", dtype="fp32", verify=True)
    merged, trained = _merged_logits(merged_dir), _trained_logits(out)
    base = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval())
    assert (trained - base).abs().max() > 1e-2  # three FP8 steps moved the adapter: the test can fail
    assert (merged - trained).abs().max() < 1e-4

"""Every supported model family through the ordinary CLI on its tiny random-init model: LoRA
training (the loss falls), 4-bit QLoRA training, merge with logit parity, chat; plus `all-linear`
target discovery and our chunked loss against the model's own loss.

One tiny model and one LoRA run per family per session (module fixtures), few steps, short rows.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftchat.cli import main
from peftchat.config import load_recipe
from peftchat.demo_assets import TINY_ARCHS, asset_path, demo_tokenizer_dir
from peftchat.infer.chat import ChatSession
from peftchat.infer.loading import load_chat_model
from peftchat.model.adapters import apply_lora
from peftchat.model.load import load_base_model
from peftchat.train import speedups as kernels
from peftchat.train.loss import causal_lm_loss

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
FAMILIES = list(TINY_ARCHS)
# The seven; gemma3 and glm4 (extras) skip the QLoRA run, whose 4-bit layers are the same
# bitsandbytes Linear4bit for every family, to keep the suite's time down.
CONTRACT_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "glm", "phi3"]
CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
SEPARATE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MLP = {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}
# What `all-linear` must wrap: every projection of every layer, the fused ones whole, never lm_head.
TARGETS = {
    **{f: SEPARATE for f in FAMILIES},
    "glm": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"},
    "glm4": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}
# A few steps of the demo recipes on the short ChatML records: enough for the trained head copy
# (modules_to_save: [lm_head]) to lower the loss.
QUICK = [
    f"data.train={asset_path('demo/messages_demo.jsonl')}",
    "data.format=messages",
    "data.collator=chat_template",
    "training.max_steps=5",
    "training.warmup_steps=1",
    "training.batch_size=2",
    "data.max_length=96",
    "training.log_steps=1",
    "training.save_steps=0",
    "training.eval_steps=0",
    "data.eval_split=0",
    "training.tensorboard=false",
    "training.device=cpu",
    "decoding.max_new_tokens=6",
]
PROBE = [[1, 20, 300, 500, 55, 66, 77, 1200, 9, 2100, 17, 18]]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """`f(arch)`: the tiny model of `arch`, built once through `peftchat tiny-model`."""
    built = {}

    def get(arch):
        if arch not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            assert main(["tiny-model", str(out), "--arch", arch]) == 0
            built[arch] = out
        return built[arch]

    return get


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, family_dir):
    """`f(arch)`: (run dir, training rows) of a short LoRA run of recipes/demo.yaml."""
    runs = {}

    def get(arch):
        if arch not in runs:
            out = tmp_path_factory.mktemp(f"lora-{arch}") / "run"
            assert (
                main(
                    [
                        "train",
                        str(RECIPES / "demo.yaml"),
                        f"model.path={family_dir(arch)}",
                        f"training.output_dir={out}",
                        *QUICK,
                    ]
                )
                == 0
            )
            runs[arch] = out, _loss_rows(out)
        return runs[arch]

    return get


def _loss_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _recipe(arch_dir, out, *overrides):
    return load_recipe(
        str(RECIPES / "demo.yaml"), [f"model.path={arch_dir}", f"training.output_dir={out}", *QUICK, *overrides]
    )


@torch.no_grad()
def _logits(model):
    return torch.cat([model(input_ids=torch.tensor([p])).logits[0].float() for p in PROBE])


@pytest.mark.parametrize("arch", FAMILIES)
def test_tiny_model_loads_with_transformers_alone(arch, family_dir):
    path = family_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == CLASSES[arch]
    assert len(tokenizer) == model.config.vocab_size == len(AutoTokenizer.from_pretrained(str(demo_tokenizer_dir())))
    assert tokenizer.chat_template and model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == arch.startswith("gemma")  # Gemma ties its embeddings, as the released models do


@pytest.mark.parametrize("arch", FAMILIES)
def test_all_linear_wraps_every_projection_of_the_family(arch, family_dir, tmp_path):
    recipe = _recipe(family_dir(arch), tmp_path, "adapter.modules_to_save=[]")
    model = apply_lora(load_base_model(recipe), recipe, verbose=False)
    wrapped = sorted(
        name.removeprefix("base_model.model.")
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and name.endswith("proj")
    )
    expected = sorted(
        f"model.layers.{i}.{'mlp' if t in MLP else 'self_attn'}.{t}" for i in range(2) for t in TARGETS[arch]
    )
    assert wrapped == expected


@pytest.mark.parametrize("arch", FAMILIES)
def test_chunked_loss_equals_the_models_own_loss(arch, family_dir):
    model = AutoModelForCausalLM.from_pretrained(str(family_dir(arch)), attn_implementation="eager")
    with torch.no_grad():  # logits big enough for Gemma 2's soft-capping at 30 to matter
        model.get_output_embeddings().weight.mul_(60)
    ids = torch.randint(4, 3000, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss
        ours = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, chunk_tokens=16)
    assert abs(ours.item() - reference.item()) < 1e-4 * max(1.0, reference.item())
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        with torch.no_grad():  # the soft-capping really matters here: without it the loss differs
            model.config.final_logit_softcapping = None
            uncapped = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
        assert abs(uncapped.item() - reference.item()) > 1.0


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_trains_merges_with_parity_and_chats(arch, family_dir, lora_run, tmp_path, capsys):
    run, rows = lora_run(arch)
    assert len(rows) == 5 and rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--out", str(merged), "--dtype", "fp32", "--verify"]) == 0
    trained, tokenizer, recipe = load_chat_model(run, ["decoding.max_new_tokens=6"])  # what `peftchat chat` loads
    reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(family_dir(arch))).eval()
    want = _logits(trained)
    assert (want - _logits(base)).abs().max() > 1e-2  # the adapter changed the model: parity can fail
    assert (_logits(reloaded) - want).abs().max() < 1e-5  # tests/model/test_merge.py's fp32 bound
    if arch.startswith("gemma"):  # tied embeddings stay tied: one trained matrix for both
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight

    # chat: the merged model's reply through the conversation format (CLI) is the adapter's
    session = ChatSession(trained, tokenizer, recipe)
    expected = session.reply("Hello! Who are you?")
    capsys.readouterr()
    assert main(["chat", str(merged), "--message", "Hello! Who are you?", "--no-stream", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n" and session.history


@pytest.mark.parametrize("arch", CONTRACT_FAMILIES)
def test_qlora_4bit_trains(arch, family_dir, tmp_path):
    out = tmp_path / "qlora"
    assert (
        main(
            [
                "train",
                str(RECIPES / "demo_qlora.yaml"),
                f"model.path={family_dir(arch)}",
                f"training.output_dir={out}",
                *QUICK,
                "training.max_steps=3",
            ]
        )
        == 0
    )
    rows = _loss_rows(out)
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def _liger_stand_in(calls, mlp_flag, rope_raises=False):
    """A function with the signature of liger-kernel 0.8's apply_liger_kernel_to_<family>
    (linkedin/Liger-Kernel, src/liger_kernel/transformers/monkey_patch.py); it records its flags."""
    if mlp_flag == "geglu":

        def apply(
            rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, geglu=True, model=None
        ):
            calls.append({"rope": rope, "rms_norm": rms_norm, "geglu": geglu, "flce": fused_linear_cross_entropy})
    else:

        def apply(
            rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=None
        ):
            if rope and rope_raises:  # as liger's GLM-4 function does
                raise NotImplementedError("liger_rotary_pos_emb is not available for Glm4 models.")
            calls.append({"rope": rope, "rms_norm": rms_norm, "swiglu": swiglu, "flce": fused_linear_cross_entropy})

    return apply


@pytest.mark.parametrize("arch", FAMILIES)
def test_liger_kernels_chosen_per_family(arch, family_dir, monkeypatch):
    """On CUDA, apply_fused_kernels calls liger's function of the family with the flags that family
    takes (GeGLU for Gemma, no RoPE for GLM-4, nothing for GLM-4-9B-chat); liger itself needs CUDA,
    so stand-ins with its signatures take the call here."""
    import sys
    import types

    calls = []
    table = {
        "llama": _liger_stand_in(calls, "swiglu"),
        "mistral": _liger_stand_in(calls, "swiglu"),
        "qwen2": _liger_stand_in(calls, "swiglu"),
        "qwen3": _liger_stand_in(calls, "swiglu"),
        "phi3": _liger_stand_in(calls, "swiglu"),
        "gemma2": _liger_stand_in(calls, "geglu"),
        "gemma3_text": _liger_stand_in(calls, "geglu"),
        "glm4": _liger_stand_in(calls, "swiglu", rope_raises=True),
    }
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = table
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr(kernels, "fused_kernels_enabled", lambda model, recipe: True)

    model = AutoModelForCausalLM.from_pretrained(str(family_dir(arch)))
    recipe = load_recipe(str(RECIPES / "demo.yaml"), [f"model.path={family_dir(arch)}", "adapter.modules_to_save=[]"])
    applied = kernels.apply_training_speedups(model, recipe.training).applied
    expected = {
        "gemma2": ["rms_norm", "geglu", "rope"],
        "gemma3": ["rms_norm", "geglu", "rope"],
        "glm": None,
        "glm4": ["rms_norm", "swiglu"],
    }.get(arch, ["rms_norm", "swiglu", "rope"])
    if expected is None:  # liger has no GLM-4-9B-chat function: no patches, the chunked loss
        assert not any(a.startswith("liger:") for a in applied) and calls == []
        assert "loss:chunked" in applied  # the summary says what runs in their place
        return
    assert sorted(k for k, on in calls[0].items() if on) == sorted(expected)  # never liger's loss forward
    # the fused CE can stand for the plain head (Gemma 2's soft-capping is done inside it) ...
    assert applied[: len(expected) + 1] == [f"liger:{k}" for k in expected] + ["liger:fused_linear_cross_entropy"]
    # ... but not for peft's wrapper of a trained head copy (the demo recipes' modules_to_save)
    with_head = load_recipe(str(RECIPES / "demo.yaml"), [f"model.path={family_dir(arch)}"])
    fresh = AutoModelForCausalLM.from_pretrained(str(family_dir(arch)))
    wrapped = kernels.apply_training_speedups(apply_lora(fresh, with_head, verbose=False), with_head.training).applied
    assert wrapped[len(expected)] == "loss:chunked"


@pytest.mark.parametrize("arch", FAMILIES)
def test_packed_rows_through_varlen_attention(arch, family_dir, packing_samples, monkeypatch):
    """`model.attn_implementation=sdpa_varlen` (what packed CUDA training gets; here its per-sample
    CPU path): a packed batch's summed loss is that of its samples alone, and the packed path runs
    in every layer that has no sliding window (Gemma 2 soft-caps: it gets eager, no varlen). The
    loss equality holds for the fallback layers too: they take sdpa's block-diagonal mask."""
    from peftchat.data.batching import collate, with_loss_targets
    from peftchat.kernels import varlen
    from peftchat.model.load import attention_for

    arch_dir = family_dir(arch)
    recipe = load_recipe(
        str(RECIPES / "demo.yaml"), [f"model.path={arch_dir}", "model.attn_implementation=sdpa_varlen"]
    )
    name = attention_for(str(arch_dir), recipe, torch.device("cpu"), for_training=True)
    calls = []
    reference = varlen._reference_varlen
    monkeypatch.setattr(varlen, "_reference_varlen", lambda *a: calls.append(1) or reference(*a))
    model = AutoModelForCausalLM.from_pretrained(str(arch_dir), dtype=torch.float32, attn_implementation=name)
    samples = packing_samples
    with torch.no_grad():
        alone = sum(
            causal_lm_loss(model, with_loss_targets(collate([[s]], 0, packing=False)), normalizer=1.0) for s in samples
        )
        packed = causal_lm_loss(
            model, with_loss_targets(collate([samples[:3], samples[3:]], 0, packing=True)), normalizer=1.0
        )
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    config = model.config
    # layers with a sliding window take sdpa's mask (the varlen call has no window): all of them
    # when a config sets `sliding_window` without `layer_types` (the tiny Mistral keeps 4096)
    every = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    layer_types = getattr(config, "layer_types", None) or [every] * config.num_hidden_layers
    expected = 0 if name == "eager" else sum(t == "full_attention" for t in layer_types)
    assert len(calls) == expected and (arch == "gemma2") == (name == "eager")

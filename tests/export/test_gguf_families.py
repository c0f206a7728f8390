"""GGUF export of every family peftchat trains (issue 32): the file holds each HF tensor under
llama.cpp's name with the family's quirks, and — where llama-cpp-python (extra `gguf-check`) is
installed — llama.cpp loads it and its logits follow the transformers model on a fixed prompt set."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from test_export import _read  # noqa: E402  (gguf's reader, tensors dequantized to float32)

from peftchat.cli import main  # noqa: E402
from peftchat.demo_assets import build_tiny_model  # noqa: E402
from peftchat.export.gguf import gguf_arch, gguf_tensor_name, rope_unpermute, write_gguf  # noqa: E402
from peftchat.export.gguf_parity import gguf_parity, llama_cpp_available  # noqa: E402

# tiny-model arch -> llama.cpp architecture its export must carry
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "glm": "chatglm",
    "glm4": "glm4",
    "phi3": "phi3",
}
needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_available(), reason="llama-cpp-python not installed (pip install 'peftchat[gguf-check]')"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = build_tiny_model(tmp_path_factory.mktemp(arch), arch=arch, seed=3)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """`f(family, outtype)`: the family's tiny model written as GGUF, once per module: the tensor
    test and the llama.cpp run of f16 read the same file."""
    made = {}

    def get(family, outtype):
        if (family, outtype) not in made:
            out = tmp_path_factory.mktemp(f"gguf-{family}-{outtype}") / f"{family}.gguf"
            made[family, outtype] = write_gguf(tiny(family), out, outtype, say=lambda _: None)
        return made[family, outtype]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_tensor_lands_where_llama_cpp_reads_it(family, tiny, exported):
    from safetensors.torch import load_file

    model_dir = tiny(family)
    out = exported(family, "f16")
    fields, tensors, _ = _read(out)
    assert fields["general.architecture"] == FAMILIES[family]
    hf = load_file(str(model_dir / "model.safetensors"))
    import json

    arch = gguf_arch(json.loads((model_dir / "config.json").read_text()))
    named = {k: gguf_tensor_name(k, arch, n_blocks=2) for k in hf}  # 2 blocks: the default 512 costs ~0.5 s a call
    assert set(tensors) == {n for n in named.values() if n is not None}
    for hf_name, name in named.items():
        if name is None:
            assert family == "gemma2" and hf_name == "lm_head.weight"
            continue
        want = hf[hf_name].float().numpy()
        got = tensors[name]
        if family in ("llama", "mistral") and (".q_proj." in hf_name or ".k_proj." in hf_name):
            got = rope_unpermute(got, 4 if ".q_proj." in hf_name else 2)
        if family == "gemma2" and hf_name.endswith("norm.weight"):
            want = want + 1  # llama.cpp's RMSNorm scales by w, Gemma's by 1 + w
        cast = want if want.ndim == 1 else want.astype(np.float16).astype(np.float32)
        assert np.array_equal(got, cast), (hf_name, name)
    if family == "qwen3":
        assert "blk.0.attn_q_norm.weight" in tensors and "blk.0.attn_k_norm.weight" in tensors
    if family == "phi3":
        assert tensors["blk.0.attn_qkv.weight"].shape == (64 + 2 * 32, 64)
        assert tensors["blk.0.ffn_up.weight"].shape == (2 * 128, 64)  # gate and up, fused as llama.cpp reads them
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 50 and fields["gemma2.final_logit_softcapping"] == 30
        assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    if family in ("glm", "glm4"):
        assert fields[f"{FAMILIES[family]}.rope.dimension_count"] == 8  # half of head_dim 16
    if family == "glm4":
        assert "blk.0.post_attention_norm.weight" in tensors and "blk.0.post_ffw_norm.weight" in tensors


def test_a_family_llama_cpp_cannot_take_is_refused_by_name(tiny, tmp_path, capsys):
    model_dir = tiny("gemma3")
    capsys.readouterr()  # building it may have drawn a progress bar
    assert main(["export", str(model_dir), "--gguf", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this model is Gemma3ForCausalLM" in err
    assert not (tmp_path / "g.gguf").exists()


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_the_export_like_transformers(family, outtype, tiny, exported):
    model_dir = tiny(family)
    out = exported(family, outtype)
    p = gguf_parity(model_dir, out)
    print(f"| {family} | {outtype} | loads | {p.top1_agree}/{p.positions} | {p.max_logit_diff:.2e} |")
    # qwen2: llama.cpp splits " 1" of the demo tokenizer as one token where transformers gives two
    # (the ids fed to both are transformers', so the logits still compare like for like)
    assert p.same_tokens or family == "qwen2"
    # f16 rounds each weight by 2^-11 relative, q8_0 by 1/254 of a block's largest; the logits of
    # these random models (|logit| < 1, init 0.02) lie close together, so a near-tie may flip:
    # measured (seed 0) f16 <= 1.1e-3 and 62-63/63 positions, q8_0 <= 3.3e-2 and 59-63/63
    assert p.max_logit_diff < (5e-3 if outtype == "f16" else 0.1)
    assert p.top1_agree >= (0.95 if outtype == "f16" else 0.85) * p.positions


@needs_llama_cpp
def test_export_prints_the_parity_line(make_adapter, tmp_path, capsys):
    assert main(["export", str(make_adapter("moss")), "--gguf", str(tmp_path / "a.gguf"), "--parity"]) == 0
    err = capsys.readouterr().err
    assert "llama.cpp parity: top-1 agreement " in err and "tokenizer matches transformers'" in err


def test_parity_without_llama_cpp_is_one_line_before_anything_is_written(make_adapter, tmp_path, capsys, monkeypatch):
    from peftchat.export import gguf_parity

    monkeypatch.setattr(gguf_parity, "llama_cpp_available", lambda: False)
    assert main(["export", str(make_adapter("moss")), "--gguf", str(tmp_path / "a.gguf"), "--parity"]) == 2
    assert capsys.readouterr().err.strip() == (
        "peftchat: error: export --parity needs llama-cpp-python: pip install 'peftchat[gguf-check]'"
    )
    assert not list(tmp_path.iterdir())

"""`peftchat export --gguf`: the file read back with gguf's own reader holds every tensor of the
merged model (f16: exactly the f16 cast; q8_0: within its quantization step), llama.cpp's names,
Llama's rope permutation (undone here to compare), hyper-parameters and the tokenizer."""

import numpy as np
import pytest
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from peftchat.cli import main  # noqa: E402
from peftchat.demo_assets import build_tiny_model  # noqa: E402
from peftchat.export.gguf import gguf_tensor_name, rope_permute, rope_unpermute  # noqa: E402
from peftchat.merge import merge_adapter  # noqa: E402


def _hf_weights(model_dir):
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update({k: v.float().numpy() for k, v in load_file(str(f)).items()})
    return state


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors, types


def _names(hf, arch="LLAMA"):
    """llama.cpp's name of every HF tensor. The map is built for the tiny models' 2 blocks: gguf's
    TensorNameMap for the default 512 costs ~0.5 s a call, which made these tests minutes long."""
    return {k: gguf_tensor_name(k, arch, n_blocks=2) for k in hf}


def _unpermuted(name, data, arch, n_head, n_kv):
    if arch == "llama" and ".attn_q." in name:
        return rope_unpermute(data, n_head)
    if arch == "llama" and ".attn_k." in name:
        return rope_unpermute(data, n_kv)
    return data


@pytest.fixture(scope="module")
def merged_moss(make_adapter, tmp_path_factory):
    adapter = make_adapter("moss")
    out = tmp_path_factory.mktemp("merged") / "m"
    merge_adapter(adapter, out, dtype="fp32", verify=False)
    return adapter, out


def test_rope_permutation_round_trips():
    w = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8 * 2, 3)
    assert np.array_equal(rope_unpermute(rope_permute(w, 2), 2), w)
    assert not np.array_equal(rope_permute(w, 2), w)
    # within a head, rows (0..3 | 4..7) -> interleaved pairs (0, 4, 1, 5, ...)
    assert rope_permute(w, 2)[:8, 0].tolist() == w[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_adapter_export_holds_every_merged_tensor(merged_moss, tmp_path, outtype):
    adapter, merged = merged_moss
    out = tmp_path / "model.gguf"
    assert main(["export", str(adapter), "--gguf", str(out), "--outtype", outtype]) == 0
    fields, tensors, types = _read(out)
    hf = _hf_weights(merged)
    named = _names(hf)
    assert set(tensors) == set(named.values())
    assert "blk.1.attn_q.weight" in tensors and "output.weight" in tensors
    for hf_name, want in hf.items():
        name = named[hf_name]
        got = _unpermuted(name, tensors[name], "llama", 4, 2)
        assert got.shape == want.shape, name
        if want.ndim == 1:
            assert types[name] == "F32" and np.array_equal(got, want), name
        elif outtype == "f16":
            assert types[name] == "F16" and np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:  # q8_0: per block of 32, error <= half a step (max|x|/127) plus the step's own f16 rounding
            assert types[name] == "Q8_0", name
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= 0.6 * step + 1e-12).all(), name
            assert err.max() > 0  # really quantized
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["general.file_type"] == (1 if outtype == "f16" else 7)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged))
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert "endgeneration" not in fields["tokenizer.chat_template"]
    assert "add_generation_prompt" in fields["tokenizer.chat_template"]


def test_qwen2_export_is_not_permuted(tmp_path):
    model_dir = build_tiny_model(tmp_path / "qwen2", arch="qwen2", seed=1)
    out = tmp_path / "q.gguf"
    assert main(["export", str(model_dir), "--gguf", str(out)]) == 0
    fields, tensors, _ = _read(out)
    hf = _hf_weights(model_dir)
    assert fields["general.architecture"] == "qwen2"
    assert "blk.0.attn_q.bias" in tensors  # Qwen2's q/k/v biases
    named = _names(hf, "QWEN2")
    for hf_name, want in hf.items():
        name = named[hf_name]
        cast = want if want.ndim == 1 else want.astype(np.float16).astype(np.float32)
        assert np.array_equal(tensors[name], cast), name


def test_export_user_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    d = tmp_path / "gemma"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["GemmaForCausalLM"]}')
    assert main(["export", str(d), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "GGUF export handles" in capsys.readouterr().err

"""Write a plain transformers model dir (Llama or Qwen2 architecture) as one GGUF file for llama.cpp.

Written with `gguf`, llama.cpp's own writer library; what llama.cpp expects was read from its
`convert_hf_to_gguf.py` and gguf-py's constants, the mapping below is ours:

* tensors get llama.cpp's names (`blk.N.attn_q.weight`, ...), taken from gguf's `TENSOR_NAMES`;
  2-D weights are stored f16 or q8_0 (q8_0 needs rows of a multiple of 32 values, else f16), 1-D
  ones (norms, biases) f32, as llama.cpp's converter does;
* llama.cpp runs Llama's rotary embedding on interleaved pairs (rope type NORM) while transformers
  rotates the two halves of each head, so the q and k projections of the `llama` architecture are
  permuted per head (`rope_permute`); Qwen2 uses llama.cpp's NEOX rope, which is transformers'
  layout, so nothing is permuted there;
* hyper-parameters under `{arch}.*`; the tokenizer as a `gpt2` (byte-level BPE) vocabulary with its
  merges, special token ids, chat template and `tokenizer.ggml.pre`: llama.cpp recognises a
  pre-tokenizer by a hash of sample encodings and refuses unknown ones; for a plain GPT-2 byte-level
  pre-tokenizer (the demo tokenizer) we name "gpt-2", which llama.cpp loads and tokenizes alike.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from peftchat.errors import UserError
from peftchat.paths import atomic_output

OUTTYPES = ("f16", "q8_0")
ARCHES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

# HF name inside a decoder layer -> gguf MODEL_TENSOR member name.
_LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
_GLOBAL_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' half-split rotary layout -> llama.cpp's interleaved pairs, per head (rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `rope_permute` (tests compare the file with the HF weights through it)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str) -> Optional[str]:
    """llama.cpp's name for an HF tensor name, None for tensors llama.cpp does not take
    (the rotary tables some checkpoints store)."""
    import gguf

    module, _, kind = hf_name.rpartition(".")
    if module in _GLOBAL_TENSORS:
        return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_GLOBAL_TENSORS[module]]]}.{kind}"
    parts = module.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        inner = ".".join(parts[3:])
        if inner in _LAYER_TENSORS:
            return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_LAYER_TENSORS[inner]]].format(bid=int(parts[2]))}.{kind}"
    if "rotary_emb" in module:
        return None
    raise UserError(f"tensor {hf_name} has no place in llama.cpp's Llama/Qwen2 layout")


def _read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{model_dir} is not a model dir (no config.json)") from None


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        # llama3 / yarn scaling need extra tensors or keys llama.cpp derives itself; not written yet.
        raise UserError(f"rope scaling '{kind}' is not supported by peftchat's GGUF export yet")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor in the dir's safetensors, one file at a time."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} holds no *.safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def _tokenizer_metadata(writer, model_dir: Path, vocab_size: int) -> None:
    """Write the byte-level BPE vocabulary, merges, special ids and chat template."""
    import gguf
    from transformers import AutoTokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json (GGUF export needs a fast BPE tokenizer)")
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    if spec["model"].get("type") != "BPE":
        raise UserError(f"{tok_file}: a {spec['model'].get('type')} tokenizer; GGUF export handles byte-level BPE")
    pre = spec.get("pre_tokenizer") or {}
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)):
        raise UserError(f"{tok_file}: pre-tokenizer {pre.get('type')} is not GPT-2's byte-level one; "
                        "peftchat cannot name its llama.cpp pre-tokenizer yet")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i >= len(tokenizer):  # rows of the embedding no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tokenizer.convert_ids_to_tokens(i))
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for tid, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                     (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if tid is not None:
            add(int(tid))
    # llama.cpp adds BOS when told to; say what the HF tokenizer does on encode.
    probe = tokenizer.encode("a")
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
                             and len(probe) > 1)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        # transformers' {% generation %} markers (assistant masks) are not Jinja llama.cpp knows;
        # they do not change the rendered text, so they are left out.
        writer.add_chat_template(_GENERATION_TAG.sub("", tokenizer.chat_template))


def _store(writer, name: str, data: np.ndarray, outtype: str) -> str:
    """Add one tensor in the storage type llama.cpp's converter would use; returns that type."""
    import gguf
    from gguf.quants import quantize

    if data.ndim < 2:
        writer.add_tensor(name, data.astype(np.float32))
        return "f32"
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        writer.add_tensor(name, quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return "q8_0"
    writer.add_tensor(name, data.astype(np.float16))
    return "f16"


def write_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16",
               name: Optional[str] = None, say: Callable[[str], None] = print, force: bool = False) -> Path:
    """Write the model in `model_dir` (a plain transformers dir: config.json, safetensors,
    tokenizer.json) to `out_path` as GGUF, 2-D tensors in `outtype` (f16 | q8_0): into a temp
    file beside it, renamed onto it at the end (an existing file only with `force`)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    archs = config.get("architectures") or []
    arch = next((ARCHES[a] for a in archs if a in ARCHES), None)
    if arch is None:
        raise UserError(f"{model_dir}: GGUF export handles {', '.join(ARCHES)}; this model is {archs or 'unknown'}")
    out = Path(out_path)
    with atomic_output(out, "--gguf", force=force) as tmp:
        counts = _write_file(gguf, tmp, arch, model_dir, config, outtype, name)
    say(f"GGUF ({arch}, {outtype}) written to {out}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + " tensors")
    return out


def _write_file(gguf, tmp: Path, arch: str, model_dir: Path, config: dict, outtype: str, name) -> dict[str, int]:
    """The GGUF file at `tmp`; returns how many tensors of each stored type it holds."""
    n_head, n_kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    vocab_size = int(config["vocab_size"])
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or model_dir.name)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(vocab_size)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_metadata(writer, model_dir, vocab_size)

        counts: dict[str, int] = {}
        for hf_name, data in _hf_tensors(model_dir):
            target = gguf_tensor_name(hf_name)
            if target is None:
                continue
            if arch == "llama" and ".self_attn.q_proj." in hf_name:
                data = rope_permute(data, n_head)
            elif arch == "llama" and ".self_attn.k_proj." in hf_name:
                data = rope_permute(data, n_kv)
            stored = _store(writer, target, data, outtype)
            counts[stored] = counts.get(stored, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return counts

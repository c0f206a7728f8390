"""Write a plain transformers model dir as one GGUF file for llama.cpp: Llama, Mistral, Qwen2,
Qwen3, Gemma 2, GLM-4 (GLM-4-9B-chat-hf as llama.cpp's `chatglm`, GLM-4-0414 as `glm4`) and Phi-3.

Written with `gguf`, llama.cpp's own writer library; what llama.cpp expects was read from its
converter (`convert_hf_to_gguf.py` and its `conversion/` package, llama.cpp as vendored in
llama-cpp-python 0.3.36); the code is ours:

* the llama.cpp architecture is the one its converter picks for the HF class (`ARCHES`); tensor
  names come from gguf's `TensorNameMap` for that architecture, so fused tensors (Phi-3's qkv_proj,
  Phi-3 / GLM's gate_up_proj) keep llama.cpp's fused names and Qwen3's q/k norms, Gemma 2's and
  GLM-4-0414's extra norms land where llama.cpp reads them;
* 2-D weights are stored f16 or q8_0 (q8_0 needs rows of a multiple of 32 values, else f16), 1-D
  ones (norms, biases) f32, as llama.cpp's converter does;
* llama.cpp runs Llama's rotary embedding on interleaved pairs (rope type NORM) while transformers
  rotates the two halves of each head, so the q and k projections of the `llama` architecture
  (Llama, Mistral) are permuted per head (`rope_permute`); Qwen2/Qwen3/Phi-3/Gemma 2 use NEOX rope
  (transformers' layout) and GLM's transformers code is interleaved already: not permuted;
* Gemma 2: norm weights stored as 1 + w (transformers' Gemma RMSNorm scales by 1 + w), the two
  soft-caps and the sliding window as keys, the tied lm_head left out (llama.cpp reuses the
  embedding); GLM: the rotary dimension count is head_dim × partial_rotary_factor;
* hyper-parameters under `{arch}.*`; the tokenizer as a `gpt2` (byte-level BPE) vocabulary with its
  merges, special token ids, chat template and `tokenizer.ggml.pre`: llama.cpp recognises a
  pre-tokenizer by a hash of sample encodings and refuses unknown ones; for a plain GPT-2 byte-level
  pre-tokenizer (the demo tokenizer) we name "gpt-2", which llama.cpp loads and tokenizes alike.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from peftchat.errors import UserError
from peftchat.paths import atomic_output

OUTTYPES = ("f16", "q8_0")
# HF architecture -> gguf's MODEL_ARCH member: the llama.cpp architecture llama.cpp's own converter
# writes for it (Mistral is written as `llama`, GLM-4-9B-chat-hf as `chatglm`, GLM-4-0414 as `glm4`).
# Tensor names come from gguf's TensorNameMap of that architecture, not from a table of ours.
ARCHES = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "Qwen3ForCausalLM": "QWEN3",
    "Gemma2ForCausalLM": "GEMMA2",
    "GlmForCausalLM": "CHATGLM",
    "Glm4ForCausalLM": "GLM4",
    "Phi3ForCausalLM": "PHI3",
}
# llama.cpp runs these with rope type NORM (interleaved pairs) while transformers rotates halves:
# q/k rows are permuted. GLM's transformers code is interleaved already, so chatglm/glm4 are not.
_PERMUTED_ROPE = ("LLAMA",)
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' half-split rotary layout -> llama.cpp's interleaved pairs, per head (rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `rope_permute` (tests compare the file with the HF weights through it)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(config: dict, where: str = "the model") -> str:
    """gguf's MODEL_ARCH member name for a config's `architectures`; UserError naming the family
    when peftchat cannot write it for llama.cpp."""
    archs = config.get("architectures") or []
    arch = next((ARCHES[a] for a in archs if a in ARCHES), None)
    if arch is None:
        raise UserError(
            f"{where}: GGUF export handles {', '.join(sorted(set(ARCHES)))}; "
            f"this model is {', '.join(archs) or 'of unknown architecture'}, which peftchat "
            "cannot write in a layout llama.cpp loads"
        )
    return arch


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: str, n_blocks: int):
    """gguf's TensorNameMap of `arch`: built once per (arch, blocks), not once per tensor. Building
    it expands every block's name patterns: ~0.5-2 s at 512 blocks on a 2-core CPU, and an
    export asks for a name ~9 times per layer."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], n_blocks)


def gguf_tensor_name(hf_name: str, arch: str = "LLAMA", n_blocks: int = 512) -> Optional[str]:
    """llama.cpp's name (from gguf's TensorNameMap for `arch`) for an HF tensor name, None for
    tensors llama.cpp does not take (rotary tables, Gemma's tied lm_head)."""
    import gguf

    if "rotary_emb" in hf_name or (arch == "GEMMA2" and hf_name.startswith("lm_head.")):
        return None
    name = _tensor_name_map(arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(
            f"tensor {hf_name} has no place in llama.cpp's {gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]]} layout"
        )
    return name


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
        raise UserError(
            f"{tok_file}: pre-tokenizer {pre.get('type')} is not GPT-2's byte-level one; "
            "peftchat cannot name its llama.cpp pre-tokenizer yet"
        )
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
            tokens.append(tokenizer.convert_ids_to_tokens(i))  # type: ignore[arg-type]  # one id: one token
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for tid, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if tid is not None:
            add(int(tid))
    # llama.cpp adds BOS when told to; say what the HF tokenizer does on encode.
    probe = tokenizer.encode("a")
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(
        bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id and len(probe) > 1
    )
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
        writer.add_tensor(
            name, quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )
        return "q8_0"
    writer.add_tensor(name, data.astype(np.float16))
    return "f16"


def _hyperparameters(writer, config: dict, arch: str) -> None:
    """The `{arch}.*` keys llama.cpp reads for this family (as its converter writes them)."""
    n_head = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    # GLM rotates only part of each head (partial_rotary_factor 0.5), Phi-3 may too
    writer.add_rope_dimension_count(
        int(head_dim * float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))))
    )
    if head_dim != hidden // n_head or arch == "GEMMA2":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    if arch == "GEMMA2":
        # llama.cpp applies both soft-caps and the alternating sliding window from these keys
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        writer.add_sliding_window(int(config["sliding_window"]))
    elif arch == "PHI3":
        writer.add_rope_scaling_orig_ctx_len(
            int(config.get("original_max_position_embeddings") or config.get("max_position_embeddings", 4096))
        )
        writer.add_sliding_window(int(config.get("sliding_window") or 0))


def _llama_cpp_tensor(hf_name: str, data: np.ndarray, arch: str, config: dict) -> np.ndarray:
    """A tensor as llama.cpp's kernels for `arch` expect it."""
    if arch in _PERMUTED_ROPE and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
        n_head = int(config["num_attention_heads"])
        heads = n_head if ".q_proj." in hf_name else int(config.get("num_key_value_heads") or n_head)
        return rope_permute(data, heads)
    if arch == "GEMMA2" and hf_name.endswith("norm.weight"):
        # transformers' Gemma RMSNorm scales by (1 + w); llama.cpp's by w, so the +1 is stored
        return data + 1.0
    return data


def _general_name(name: str, model_dir: Path) -> str:
    """`general.name`, as llama.cpp can load it: llama.cpp sets attributes on Phi-3's SentencePiece
    tokens (`<s>`, `</s>`, `<unk>`, `<|endoftext|>`) when the name contains "phi3" / "phi-3" and
    aborts when one is missing (a byte-level BPE vocabulary such as the demo's); for such a
    vocabulary the name is written with a space ("phi 3") so that llama.cpp skips the step."""
    if not re.search(r"phi-?3", name, re.IGNORECASE):
        return name
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = set(spec["model"].get("vocab", {})) | {t["content"] for t in spec.get("added_tokens", [])}
    if {"<s>", "</s>", "<unk>", "<|endoftext|>"} <= vocab:
        return name
    return re.sub(r"(phi)-?(3)", r"\1 \2", name, flags=re.IGNORECASE)


def write_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    outtype: str = "f16",
    name: Optional[str] = None,
    say: Callable[[str], None] = print,
    force: bool = False,
) -> Path:
    """Write the model in `model_dir` (a plain transformers dir: config.json, safetensors,
    tokenizer.json) to `out_path` as GGUF, 2-D tensors in `outtype` (f16 | q8_0): into a temp
    file beside it, renamed onto it at the end (an existing file only with `force`)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    arch = gguf_arch(config, str(model_dir))
    arch_name = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]]
    _rope_theta(config)  # refuse rope scaling before anything is written
    out = Path(out_path)
    with atomic_output(out, "--gguf", force=force) as tmp:
        counts = _write_file(gguf, tmp, arch, arch_name, model_dir, config, outtype, name)
    say(
        f"GGUF ({arch_name}, {outtype}) written to {out}: "
        + ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        + " tensors"
    )
    return out


def _write_file(
    gguf, tmp: Path, arch: str, arch_name: str, model_dir: Path, config: dict, outtype: str, name: Optional[str]
) -> dict[str, int]:
    """The GGUF file at `tmp`; returns how many tensors of each stored type it holds."""
    n_blocks = int(config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        writer.add_name(_general_name(name or model_dir.name, model_dir))
        _hyperparameters(writer, config, arch)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_metadata(writer, model_dir, int(config["vocab_size"]))

        counts: dict[str, int] = {}
        for hf_name, data in _hf_tensors(model_dir):
            target = gguf_tensor_name(hf_name, arch, n_blocks)
            if target is None:
                continue
            stored = _store(writer, target, _llama_cpp_tensor(hf_name, data, arch, config), outtype)
            counts[stored] = counts.get(stored, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return counts

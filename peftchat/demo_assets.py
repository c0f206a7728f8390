"""Offline demo assets: a tiny byte-level BPE tokenizer and random-init tiny models.

Everything here works with no network and no model hub. The shipped files live under
``peftchat/assets/``:

* ``assets/demo/moss_demo.jsonl``      MOSS-format multi-turn sessions (some with tool calls)
* ``assets/demo/chatglm_demo.jsonl``   ChatGLM-6B rows ``{"prompt", "response", "history"}``
* ``assets/demo/messages_demo.jsonl``  OpenAI-style ``{"messages": [...]}`` records
* ``assets/demo/corpus.txt``           extra prose used only to train the tokenizer
* ``assets/tokenizer/``                the tokenizer built by :func:`build_demo_tokenizer`

All demo text was written for this project.

The tokenizer never adds BOS/EOS on ``encode``; collators add what they need explicitly.
Its chat template is ChatML (``<|im_start|>{role}\\n{content}<|im_end|>\\n``) with no BOS; the
end-of-turn token of that template is ``<|im_end|>``, while ``eos_token`` is ``</s>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

__all__ = [
    "SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "asset_path",
    "demo_tokenizer_dir",
    "build_demo_tokenizer",
    "build_tiny_model",
    "TINY_ARCHS",
]

_ASSETS = Path(__file__).resolve().parent / "assets"

# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, then the rest in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[gMASK]",
    "<sop>",
    "<eop>",
    "<eoh>",
    "<eom>",
    "<eot>",
    "<eoc>",
    "<eor>",
    "<|Human|>",
    "<|MOSS|>",
    "<|Inner Thoughts|>",
    "<|Commands|>",
    "<|Results|>",
    "<|im_start|>",
    "<|im_end|>",
)

# ChatML, no BOS. The {% generation %} markers let
# `apply_chat_template(..., return_assistant_tokens_mask=True)` mark assistant content plus the
# closing <|im_end|> (not the trailing newline); rendering is unaffected by them.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

DEMO_VOCAB_SIZE = 3500
_DEMO_FILES = ("moss_demo.jsonl", "chatglm_demo.jsonl", "messages_demo.jsonl")


def asset_path(name: str) -> Path:
    """Path of ``peftchat/assets/<name>`` (may not exist)."""
    return _ASSETS / name


def demo_tokenizer_dir() -> Path:
    """Directory of the shipped demo tokenizer (loadable with ``AutoTokenizer.from_pretrained``)."""
    return asset_path("tokenizer")


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


def _strip_specials(text: str) -> Iterator[str]:
    """Pieces of ``text`` between special tokens (specials never take part in BPE training)."""
    for piece in _SPECIAL_RE.split(text):
        if piece:
            yield piece


def _demo_texts(demo_dir: Path) -> Iterator[str]:
    """Every text the demo data can produce, in the shapes the collators render them."""
    corpus = demo_dir / "corpus.txt"
    if corpus.is_file():
        for para in corpus.read_text(encoding="utf-8").split("\n\n"):
            yield para + "\n"
    moss = demo_dir / "moss_demo.jsonl"
    if moss.is_file():
        for line in moss.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            yield rec["meta_instruction"]
            for k in range(1, int(rec["num_turns"]) + 1):
                yield from rec["chat"][f"turn_{k}"].values()
    glm = demo_dir / "chatglm_demo.jsonl"
    if glm.is_file():
        for line in glm.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            history = rec.get("history") or []
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            prompt += f"[Round {len(history)}]\n问：{rec['prompt']}\n答："
            yield prompt
            yield rec["response"]
            prompt2 = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history))
            prompt2 += f"[Round {len(history) + 1}]\n\n问：{rec['prompt']}\n\n答："
            yield prompt2
    msgs = demo_dir / "messages_demo.jsonl"
    if msgs.is_file():
        for line in msgs.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            for m in rec["messages"]:
                yield f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"


def build_demo_tokenizer(out_dir, vocab_size: int = DEMO_VOCAB_SIZE, demo_dir=None) -> None:
    """Train the demo byte-level BPE tokenizer on the demo texts and save it to ``out_dir``.

    Deterministic for fixed inputs. The result is a transformers fast tokenizer directory
    (tokenizer.json, tokenizer_config.json with the ChatML ``chat_template``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    demo_dir = Path(demo_dir) if demo_dir is not None else asset_path("demo")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        max_token_length=12,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pieces = [p for text in _demo_texts(demo_dir) for p in _strip_specials(text)]
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    tok.post_processor = None  # nothing is ever added on encode

    named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    extra = [t for t in SPECIAL_TOKENS if t not in named.values()]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **named,
        additional_special_tokens=extra,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="right",
        chat_template=CHATML_TEMPLATE,
    )
    _save_tokenizer(hf, out_dir)


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    """save_pretrained, then rewrite tokenizer_config.json in a form both transformers 4.x and 5.x
    load as a fast tokenizer: ``PreTrainedTokenizerFast`` (an alias of v5's TokenizersBackend) and
    ``additional_special_tokens`` (v5 writes ``extra_special_tokens`` as a list, which 4.x reads as a
    dict). The chat template stays inside tokenizer_config.json (no chat_template.jinja)."""
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra:  # a dict of named extras: keep it as it was
        cfg["extra_special_tokens"] = extra
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


# Family quirks each tiny model keeps, so the tests meet them (kept as in the released models):
# * llama / mistral: plain GQA + SwiGLU; mistral keeps its sliding window (4096, longer than any test).
# * qwen2: biases on q/k/v.  qwen3: RMSNorm on q and k per head (q_norm/k_norm), explicit head_dim.
# * gemma2: embeddings scaled by sqrt(hidden) in the model, tied input/output embeddings, GeGLU
#   (gelu tanh) MLP, RMSNorm with (1 + w), pre/post norms, attention logits soft-capped at 50 and
#   final logits at 30, alternating sliding/full attention; no sdpa (it cannot soft-cap).
# * gemma3: as gemma2 without soft-capping, plus q/k norms and 5 sliding layers per full one.
# * glm (GLM-4-9B-chat, GlmForCausalLM): fused gate_up_proj MLP, q/k/v biases, partial (half),
#   interleaved rotary embeddings.  glm4 (GLM-4-0414, Glm4ForCausalLM): glm plus post-attention and
#   post-MLP norms.
# * phi3: fused qkv_proj and gate_up_proj.
TINY_ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "glm": ("GlmConfig", "GlmForCausalLM"),
    "glm4": ("Glm4Config", "Glm4ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


def _family_config(arch: str, head_dim: int, num_layers: int) -> dict:
    """Config keys a family needs beyond the common ones (its defaults are sized for 7B+ models)."""
    if arch == "qwen2":
        return {"use_sliding_window": False, "max_window_layers": num_layers}
    if arch == "qwen3":
        return {"head_dim": head_dim, "use_sliding_window": False, "max_window_layers": num_layers}
    if arch in ("mistral", "glm", "glm4"):
        return {"head_dim": head_dim}
    if arch in ("gemma2", "gemma3"):
        # Gemma scales queries by query_pre_attn_scalar**-0.5, not head_dim**-0.5: keep them equal
        # at this size. Tied embeddings, as in every Gemma.
        return {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "tie_word_embeddings": True}
    if arch == "phi3":
        return {"original_max_position_embeddings": 2048}
    return {}


def build_tiny_model(
    out_dir,
    arch: str = "llama",
    tokenizer_dir=None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.02,
    **config_overrides,
) -> Path:
    """Random-init model of a real transformers architecture (one of ``TINY_ARCHS``), saved with
    its tokenizer and a generation config into ``out_dir``; returns ``out_dir`` as a Path.

    Vocab size is ``len(tokenizer)``; bos/eos/pad ids come from the tokenizer. fp32 safetensors,
    GQA (``num_kv_heads`` < ``num_heads``), untied embeddings except where the family ties them
    (Gemma). Same seed, same weights. ``config_overrides`` go to the config class as they are.

    Note: with the default ``initializer_range`` (0.02, as in the real models) the frozen random
    lm_head keeps logits tiny, so LoRA on the attention/MLP projections alone lowers the loss only
    slowly (about 8.1 -> 7.5 in 30 steps at lr 1e-2 on the MOSS demo). For a demo where the loss
    visibly falls, also train the head (``modules_to_save=["lm_head"]``: 8.1 -> 1.6) or build with
    ``initializer_range=0.2`` (9.4 -> 3.7); full fine-tuning at lr 3e-3 goes 8.1 -> 2.9.
    """
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    arch = arch.lower()
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(TINY_ARCHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or demo_tokenizer_dir()))

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config_name, model_name = TINY_ARCHS[arch]
    extra = _family_config(arch, hidden_size // num_heads, num_layers)
    config = getattr(transformers, config_name)(**{**common, **extra, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).to(torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(out_dir))
    _save_tokenizer(tokenizer, out_dir)
    return out_dir

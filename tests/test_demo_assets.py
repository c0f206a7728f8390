"""Shipped demo assets: tokenizer, tiny-model builder, demo jsonl files."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftchat.demo_assets import (
    SPECIAL_TOKENS,
    asset_path,
    build_demo_tokenizer,
    build_tiny_model,
    demo_tokenizer_dir,
)

ROUND_TRIP = [
    "[Round 0]\n问：你好\n答：",
    "[Round 0]\n问：1加1等于几？\n答：2\n[Round 1]\n问：那2加2呢？\n答：",
    "[Round 1]\n\n问：介绍一下你自己。\n\n答：",
    "<|Human|>: 你好<eoh>\n",
    "<|MOSS|>: 好的，你好！<eom>\n",
    '<|Results|>:\nCalculator("23*7") => 161\n<eor>\n',
    "<|im_start|>user\nHello!<|im_end|>\n",
    "Hello, world!  Two  spaces,\ttab and a trailing newline\n",
    " leading space and 中英文 mixed text 123，标点！",
    "生僻字龘靐齉 and emoji 🙂 and accents café",
]

MOSS_FIELDS = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))


def _jsonl(name):
    lines = asset_path(f"demo/{name}").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------- tokenizer


def test_paths():
    assert demo_tokenizer_dir() == asset_path("tokenizer")
    assert (demo_tokenizer_dir() / "tokenizer.json").is_file()
    total = sum(p.stat().st_size for p in demo_tokenizer_dir().iterdir())
    assert total < 1_000_000


def test_tokenizer_loads_fast(tok):
    assert tok.is_fast
    assert 3000 <= len(tok) <= 4000


def test_special_tokens_single_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tok.unk_token_id not in ids[1:]
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    for t, i in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(t) == [i], t
        assert added[t].special, t
        assert t in tok.all_special_tokens, t
    # never split when glued to text
    assert tok.convert_ids_to_tokens(tok.encode("x<eoh>y"))[1] == "<eoh>"


def test_named_specials(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.pad_token_id != tok.eos_token_id
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)


def test_encode_adds_nothing(tok):
    for text in ("hello", "你好"):
        ids = tok.encode(text)
        assert ids == tok.encode(text, add_special_tokens=True) == tok(text)["input_ids"]
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.encode("") == []


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_moss_markers_are_single_tokens(tok):
    pieces = tok.convert_ids_to_tokens(tok.encode("<|Results|>: None<eor>\n"))
    assert pieces[0] == "<|Results|>"
    assert "<eor>" in pieces
    assert pieces.count("<|Results|>") == 1 and pieces.count("<eor>") == 1


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "好的，你好！"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Sure! Hello."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n好的，你好！<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nSure! Hello.<|im_end|>\n"
    )
    gen = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gen == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no bos
    assert tok.bos_token_id not in ids
    assert tok.decode(ids) == text


def test_chat_template_generation_markers(tok):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Sure! Hello."},
        {"role": "user", "content": "再见"},
        {"role": "assistant", "content": "好的，再见！"},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == "Sure! Hello.<|im_end|>好的，再见！<|im_end|>"


def test_build_demo_tokenizer(tmp_path, tok):
    build_demo_tokenizer(tmp_path / "tok")
    fresh = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert fresh.is_fast and 3000 <= len(fresh) <= 4000
    assert [fresh.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert fresh.chat_template == tok.chat_template
    for text in ROUND_TRIP:
        assert fresh.decode(fresh.encode(text)) == text


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_build_tiny_model(tmp_path, tok, arch):
    out = build_tiny_model(tmp_path / arch, arch=arch, seed=0)
    assert (out / "model.safetensors").is_file()
    assert (out / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    mtok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert cfg.model_type == arch
    assert cfg.vocab_size == len(mtok) == len(tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.tie_word_embeddings is False
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        mtok.bos_token_id,
        mtok.eos_token_id,
        mtok.pad_token_id,
    )
    assert model.dtype == torch.float32
    assert mtok.encode("<|Human|>: 你好<eoh>\n") == tok.encode("<|Human|>: 你好<eoh>\n")
    assert mtok.chat_template == tok.chat_template
    batch = mtok(["[Round 0]\n问：你好\n答：", "<|Human|>: hi<eoh>\n"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, -1].item() == mtok.pad_token_id  # right padding with <pad>
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(mtok))
    assert torch.isfinite(logits).all()
    # deterministic for a seed
    again = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / f"{arch}_again", arch=arch, seed=0))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_build_tiny_model_rejects_unknown_arch(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "x", arch="gpt9")


# ---------------------------------------------------------------- demo data


def test_moss_demo():
    rows = _jsonl("moss_demo.jsonl")
    assert len(rows) >= 20
    tool_sessions = 0
    for r in rows:
        assert set(r) == {"conversation_id", "meta_instruction", "num_turns", "chat", "category"}
        assert r["meta_instruction"].endswith("\n")
        assert 1 <= r["num_turns"] <= 4
        assert sorted(r["chat"]) == [f"turn_{k}" for k in range(1, r["num_turns"] + 1)]
        uses_tool = False
        for k in range(1, r["num_turns"] + 1):
            turn = r["chat"][f"turn_{k}"]
            assert tuple(turn) == MOSS_FIELDS
            assert turn["Human"].startswith("<|Human|>: ") and turn["Human"].endswith("<eoh>\n")
            assert turn["Inner Thoughts"].startswith("<|Inner Thoughts|>: ") and turn["Inner Thoughts"].endswith(
                "<eot>\n"
            )
            assert turn["Commands"].startswith("<|Commands|>: ") and turn["Commands"].endswith("<eoc>\n")
            assert turn["Tool Responses"].startswith("<|Results|>:") and turn["Tool Responses"].endswith("<eor>\n")
            assert turn["MOSS"].startswith("<|MOSS|>: ") and turn["MOSS"].endswith("<eom>\n")
            if turn["Commands"] != "<|Commands|>: None<eoc>\n":
                uses_tool = True
                assert turn["Inner Thoughts"] != "<|Inner Thoughts|>: None<eot>\n"
                assert turn["Tool Responses"] != "<|Results|>: None<eor>\n"
            else:
                assert turn["Tool Responses"] == "<|Results|>: None<eor>\n"
        tool_sessions += uses_tool
    assert tool_sessions >= 3
    assert len({r["conversation_id"] for r in rows}) == len(rows)


def test_chatglm_demo():
    rows = _jsonl("chatglm_demo.jsonl")
    assert len(rows) >= 25
    assert any(not r["history"] for r in rows) and any(r["history"] for r in rows)
    for r in rows:
        assert set(r) == {"prompt", "response", "history"}
        assert r["prompt"] and r["response"]
        for pair in r["history"]:
            assert len(pair) == 2 and all(isinstance(x, str) and x for x in pair)


def test_messages_demo(tok):
    rows = _jsonl("messages_demo.jsonl")
    assert len(rows) >= 10
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    for r in rows:
        assert set(r) == {"messages"}
        roles = [m["role"] for m in r["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body == ["user", "assistant"] * (len(body) // 2)
        assert all(set(m) == {"role", "content"} and m["content"] for m in r["messages"])
        tok.apply_chat_template(r["messages"], tokenize=False)


def test_corpus_has_chatglm_pieces():
    text = asset_path("demo/corpus.txt").read_text(encoding="utf-8")
    assert "[Round 0]" in text and "问：" in text and "答：" in text

"""Shared helpers for tests/data (plain functions, no fixtures: imported by the test modules)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from peftchat.config import recipe_from_dict
from peftchat.data.readers import normalize
from peftchat.demo_assets import demo_tokenizer_dir
from peftchat.formats.conversation import Conversation

TOKENIZER_DIR = str(demo_tokenizer_dir())
META = "You are a test assistant.\n"


@cache
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def E(text: str) -> list[int]:
    return tok().encode(text, add_special_tokens=False)


def tid(token: str) -> int:
    return tok().convert_tokens_to_ids(token)


def recipe(train="unused.jsonl", **data):
    return recipe_from_dict({"model": {"path": "unused", "tokenizer": TOKENIZER_DIR}, "data": {"train": train, **data}})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def moss_turn(q: str, a: str, tool: str | None = None) -> dict:
    return {
        "Human": f"<|Human|>: {q}<eoh>\n",
        "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
        "Commands": "<|Commands|>: None<eoc>\n",
        "Tool Responses": f"<|Results|>: {tool if tool is not None else 'None'}<eor>\n",
        "MOSS": f"<|MOSS|>: {a}<eom>\n",
    }


def moss_record(turns: list[dict], meta: str = META) -> dict:
    return {
        "meta_instruction": meta,
        "num_turns": len(turns),
        "chat": {f"turn_{k + 1}": t for k, t in enumerate(turns)},
    }


def messages_record(pairs: list[tuple[str, str]], system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def conv(record: dict, fmt: str, **data) -> Conversation:
    return normalize(record, fmt, recipe(**data).data, "test[0]")


def labelled(sample) -> list[int]:
    return [t for t in sample.labels if t != -100]

"""`peftchat generate`: one reply per input row, in input order; left-padded batches give the
replies of one-at-a-time generation; bad input names file and line."""

import json
import re

import pytest

from peftchat.cli import main
from peftchat.errors import DataError
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import context_budget
from peftchat.infer.generate import generate_replies, read_requests
from peftchat.infer.loading import load_chat_model

ROWS = [
    {"prompt": "Hello!"},
    {
        "prompt": "What did I just say? Please answer in detail, with examples.",
        "history": [["Hi", "Hello, how can I help?"]],
    },
    {
        "id": "q3",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "写一首诗"},
        ],
    },
    {"query": "x", "history": [{"user": "q", "assistant": "a"}]},
    {"prompt": "A longer prompt than the others, so that batches need real padding on the left side."},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rows_in_order_and_batching_changes_nothing(make_adapter, tmp_path):
    adapter = make_adapter(collator="chat_template")
    inp = _write(tmp_path / "in.jsonl", ROWS)
    assert (
        main(["generate", str(adapter), "--in", str(inp), "--out", str(tmp_path / "b3.jsonl"), "--batch-size", "3"])
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "b3.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello!", ROWS[1]["prompt"], "写一首诗", "x", ROWS[4]["prompt"]]
    assert rows[2]["id"] == "q3" and all(isinstance(r["reply"], str) for r in rows)

    # One prompt at a time through the chat code gives the same greedy replies.
    model, tok, recipe = load_chat_model(adapter)
    singles = []
    for r in read_requests(inp):
        prompt = make_format(recipe.data, tok).prompt(r.history, r.query, context_budget(recipe)).ids
        singles.append(generate_replies(model, tok, recipe, [prompt], batch_size=1)[0])
    assert [r["reply"] for r in rows] == singles
    assert len(set(singles)) > 1  # replies depend on the prompt: rows were not mixed up unnoticed


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"reply": "no prompt"}', "needs a string 'prompt'"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "messages[0] has role 'assistant'"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "last message"),
        ('{"prompt": "p", "history": [["only one"]]}', "history[0]"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{inp}:3: ") + ".*" + re.escape(message)):
        read_requests(inp)


def test_bad_input_fails_before_loading_the_model(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("{oops\n", encoding="utf-8")
    rc = main(["generate", str(tmp_path / "no-such-model"), "--in", str(inp), "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert f"{inp}:1" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()

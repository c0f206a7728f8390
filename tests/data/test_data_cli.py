"""`peftchat data dump` / `peftchat data inspect` on the shipped demo recipes, through cli.main."""

import json
from pathlib import Path

import pytest
from data_helpers import TOKENIZER_DIR, tok

from peftchat.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def args(tmp_path, name):
    return [str(RECIPES / name), f"model.tokenizer={TOKENIZER_DIR}", f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.parametrize(
    "name,count,marker",
    [
        ("demo.yaml", 24, "⟦<|Human|>:"),
        ("demo_chatglm.yaml", 30, "⟦<sop>"),
        ("demo_chat_template.yaml", 12, "assistant\n⟦好的"),
    ],
)
def test_dump_and_inspect_demo_recipes(tmp_path, capsys, name, count, marker):
    out = tmp_path / "dump.jsonl"
    assert main(["data", "dump", *args(tmp_path, name), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    # every sample of data.train, before the recipe's eval_split hold-out
    assert len(lines) == count
    for line in lines:
        assert set(line) == {"input_ids", "labels", "attention_mask"}
        assert len(line["input_ids"]) == len(line["labels"]) == len(line["attention_mask"])
        assert all(lab in (-100, t) for t, lab in zip(line["input_ids"], line["labels"]))
    err = capsys.readouterr().err
    assert f"{count} samples" in err and f"wrote {count} samples" in err

    assert main(["data", "inspect", *args(tmp_path, name), "--index", "1"]) == 0
    shown = capsys.readouterr().out
    assert "── sample 1:" in shown and marker in shown and "\033[" not in shown
    assert f"samples: {count}" in shown and "with loss:" in shown and "truncated: 0" in shown
    first = tok().decode(lines[1]["input_ids"])
    assert first.replace("⟦", "").replace("⟧", "")[:40] in shown.replace("⟦", "").replace("⟧", "")


def test_dump_limit_and_order_match_the_pipeline(tmp_path):
    out = tmp_path / "d.jsonl"
    assert main(["data", "dump", *args(tmp_path, "demo_chatglm.yaml"), "--out", str(out), "--limit", "2"]) == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2
    assert tok().decode(lines[0]["input_ids"]).startswith("[Round 0]\n问：你好\n答：")


def test_bad_data_file_exits_2_with_one_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q", "response": \n', encoding="utf-8")
    rc = main(
        ["data", "dump", *args(tmp_path, "demo_chatglm.yaml"), f"data.train={data}", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"peftchat: error: {data}:2: invalid JSON") and err.count("\n") == 1
    assert main(["data", "inspect", *args(tmp_path, "demo_chatglm.yaml"), "--index", "99"]) == 2
    assert "--index 99 is out of range: there are 30 samples" in capsys.readouterr().err


def test_split_eval_dumps_the_held_out_sessions(tmp_path, capsys):
    train_out, eval_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert main(["data", "dump", *args(tmp_path, "demo.yaml"), "--out", str(train_out)]) == 0
    assert main(["data", "dump", *args(tmp_path, "demo.yaml"), "--out", str(eval_out), "--split", "eval"]) == 0
    train = [json.loads(x) for x in train_out.read_text(encoding="utf-8").splitlines()]
    held = [json.loads(x) for x in eval_out.read_text(encoding="utf-8").splitlines()]
    assert len(held) == 2  # data.eval_split 0.1 of 24 sessions
    assert all(h in train for h in held)  # --split train shows every record of data.train
    assert "eval: 2 sessions -> 2 samples" in capsys.readouterr().err
    assert main(["data", "inspect", *args(tmp_path, "demo.yaml"), "--split", "eval", "--index", "1"]) == 0
    assert "samples: 2" in capsys.readouterr().out
    assert main(["data", "inspect", *args(tmp_path, "demo.yaml"), "data.eval_split=0", "--split", "eval"]) == 2
    assert "the recipe has no eval data" in capsys.readouterr().err


def test_inspect_preference_data_speaks_of_pairs_and_why_they_were_dropped(tmp_path, capsys):
    from peftchat.data.preference import EMPTY, IDENTICAL, PROMPT_TOO_LONG

    good = {"prompt": "你好", "chosen": "你好！很高兴见到你。", "rejected": "走开。"}
    records = [
        good,
        {**good, "rejected": good["chosen"]},
        {**good, "chosen": ""},
        {**good, "prompt": "很长的问题。" * 200},
        {**good, "prompt": "再说一次"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    extra = [f"data.train={data}", "data.eval_split=0", "data.max_length=128"]
    assert main(["data", "inspect", *args(tmp_path, "demo_dpo.yaml"), *extra]) == 0
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "pairs: 2 " in shown and "5 sessions -> 2 pairs," in shown and "3 dropped" in shown
    for reason in (EMPTY, IDENTICAL, PROMPT_TOO_LONG):
        assert f"  dropped 1 pair: {reason}" in shown
    assert "── pair 0 chosen:" in shown and "── pair 1 rejected:" in shown
    assert "samples" not in shown
    assert main(["data", "inspect", *args(tmp_path, "demo_dpo.yaml"), *extra, "--index", "9"]) == 2
    assert "--index 9 is out of range: there are 2 pairs" in capsys.readouterr().err

"""build_datasets: columns and order, the report's counts, the eval hold-out by session, caching."""

import pytest
from data_helpers import E, messages_record, moss_record, moss_turn, recipe, tok, write_jsonl

from peftchat.data.pipeline import build_datasets, sample_limit
from peftchat.errors import DataError
from peftchat.formats.chatglm import ChatGLMFormat as ChatGLMCollator


def build(tmp_path, path, seed=42, cache="cache", **data):
    r = recipe(train=str(path), cache_dir=str(tmp_path / cache), **data)
    r.training.seed = seed
    return build_datasets(r, tok())


def rows(n_conversations=6):
    """chatglm rows as ChatGLM-6B users write them: one row per round, history growing."""
    out = []
    for c in range(n_conversations):
        history = []
        for k in range(2 if c % 2 == 0 else 1):
            q, a = f"conversation {c} question {k}", f"conversation {c} answer {k}"
            out.append({"prompt": q, "response": a, "history": [list(h) for h in history]})
            history.append((q, a))
    return out


def test_columns_order_and_report(tmp_path):
    records = [
        messages_record([("q1", "a1"), ("q2", "a2")]),
        messages_record([("q3", "a3")]),
        messages_record([("q4", "a4")]),
    ]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    bundle = build(tmp_path, path, format="messages", collator="chatglm", max_target_length=8)
    train = bundle.train
    assert train.column_names == ["input_ids", "labels"] and bundle.eval is None
    answers = [tok().decode([t for t in row["labels"] if t != -100][1:-1]) for row in train]
    assert answers == ["a1", "a2", "a3", "a4"]  # data-set order, rounds in order
    r = bundle.report
    assert (r.sessions, r.samples, r.skipped, r.dropped) == (3, 4, 0, {})
    assert r.tokens == sum(len(x) for x in train["input_ids"])
    assert r.loss_tokens == sum(sum(1 for t in x if t != -100) for x in train["labels"])
    assert 0 < r.loss_share < 1 and r.longest == max(len(x) for x in train["input_ids"])
    assert "3 sessions -> 4 samples" in r.summary()


def test_truncated_and_dropped_are_counted(tmp_path):
    data = [
        {"prompt": "q", "response": "a"},
        {"prompt": "q", "response": ""},
        {"prompt": "q", "response": "a long answer that will not fit in three tokens"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", data)
    r = build(tmp_path, path, format="chatglm", collator="chatglm", max_target_length=5).report
    assert (r.sessions, r.samples, r.truncated) == (3, 2, 1)
    assert r.dropped == {"empty query or answer": 1}
    moss = write_jsonl(
        tmp_path / "s.jsonl", [moss_record([moss_turn("q", "a")]), moss_record([moss_turn("q" * 50, "a")])]
    )
    r = build(tmp_path, moss, format="moss", collator="moss", max_length=60).report
    assert (r.samples, r.dropped) == (1, {"no turn fits in data.max_length": 1})


def test_eval_split_holds_out_whole_sessions_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", rows(6))  # 6 sessions, 9 rows
    b1 = build(tmp_path, path, format="chatglm", collator="chatglm", eval_split=0.5)
    b2 = build(tmp_path, path, format="chatglm", collator="chatglm", eval_split=0.5)

    def sessions(ds):
        return {tok().decode(x).split("conversation ")[1].split(" ")[0] for x in ds["input_ids"]}

    assert b1.train["input_ids"] == b2.train["input_ids"] and b1.eval["input_ids"] == b2.eval["input_ids"]
    train_s, eval_s = sessions(b1.train), sessions(b1.eval)
    assert len(eval_s) == 3 and not train_s & eval_s and train_s | eval_s == {str(c) for c in range(6)}
    assert len(b1.train) + len(b1.eval) == 9 and b1.report.eval.samples == len(b1.eval)
    others = [
        sessions(build(tmp_path, path, seed=s, format="chatglm", collator="chatglm", eval_split=0.5).eval)
        for s in (1, 2, 3)
    ]
    assert any(o != eval_s for o in others)  # the seed decides
    counted = build(tmp_path, path, format="chatglm", collator="chatglm", eval_split=2)
    assert len(sessions(counted.eval)) == 2
    with pytest.raises(DataError, match="would hold out all 6 sessions"):
        build(tmp_path, path, format="chatglm", collator="chatglm", eval_split=6)


def test_eval_files(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [messages_record([("q", "a")])] * 3)
    ev = write_jsonl(tmp_path / "e.jsonl", [messages_record([("eq", "ea")])])
    bundle = build(tmp_path, train, eval=str(ev), eval_split=0.5)  # data.eval wins over eval_split
    assert len(bundle.train) == 3 and len(bundle.eval) == 1
    assert "ea" in tok().decode(bundle.eval[0]["input_ids"])


def test_second_build_reuses_the_cache(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", rows(4))
    calls = []
    original = ChatGLMCollator.encode

    def counting(self, conv):
        calls.append(conv.origin)
        return original(self, conv)

    monkeypatch.setattr(ChatGLMCollator, "encode", counting)
    first = build(tmp_path, path, format="chatglm", collator="chatglm", eval_split=1)
    assert len(calls) == 6
    calls.clear()
    again = build(tmp_path, path, format="chatglm", collator="chatglm", eval_split=1, packing=True, shuffle=False)
    assert calls == []  # keys that do not change samples do not re-tokenize
    assert again.train["input_ids"] == first.train["input_ids"] and again.report.samples == first.report.samples
    build(tmp_path, path, format="chatglm", collator="chatglm", eval_split=1, max_target_length=64)
    assert len(calls) == 6  # a key that changes samples does


def test_sample_limit():
    assert sample_limit(recipe(collator="chatglm", max_source_length=10, max_target_length=5)) == 15
    assert (
        sample_limit(recipe(collator="chatglm", chatglm_style="chatglm2", max_source_length=10, max_target_length=5))
        == 16
    )
    assert sample_limit(recipe(collator="moss", max_length=77)) == 77


def test_num_proc_gives_the_same_samples(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [messages_record([(f"q{k}", f"a{k}")]) for k in range(8)])
    one = build(tmp_path, path, format="messages", collator="chat_template")
    two = build(tmp_path, path, cache="other", format="messages", collator="chat_template", num_proc=2)
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]
    assert E("a7")[0] in two.train[7]["input_ids"]


@pytest.mark.parametrize("eval_split", [3, 0.25])
def test_eval_split_holds_out_only_good_records(tmp_path, eval_split):
    """Bad records (skipped with on_error=skip) never take a hold-out slot: with 9 of them among
    12 good sessions the eval split holds exactly the requested number of good sessions, for every
    seed, and each bad record is counted once (in train)."""
    good = [messages_record([(f"question {c}", f"answer {c}")]) for c in range(12)]
    bad = [{"messages": [{"role": "user", "content": 5}]}] * 9  # content not a string: bad when normalized
    records = [r for pair in zip(good, bad + [None] * 3) for r in pair if r is not None]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    for seed in range(4):
        b = build(tmp_path, path, seed=seed, format="messages", on_error="skip", eval_split=eval_split)
        assert len(b.eval) == 3 and b.report.eval.skipped == 0
        assert len(b.train) == 9 and b.report.skipped == 9
        texts = [tok().decode(x) for x in [*b.train["input_ids"], *b.eval["input_ids"]]]
        assert sorted(t.split("question ")[1].split("<")[0] for t in texts) == sorted(str(c) for c in range(12))

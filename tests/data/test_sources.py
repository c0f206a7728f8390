"""Data sources: {path, format, weight} entries, formats per file, weights, and records whose unused
columns vary in type (real-world shapes) — the loader keeps only what the format reads."""

import json

import pytest
from data_helpers import messages_record, moss_record, moss_turn, recipe, tok, write_jsonl

from peftchat.config import data_sources
from peftchat.data.pipeline import build_datasets, weighted_rows
from peftchat.errors import ConfigError, DataError


def build(tmp_path, train, **data):
    return build_datasets(recipe(train=train, cache_dir=str(tmp_path / "cache"), **data), tok())


def samples(bundle, split="train"):
    ds = bundle.train if split == "train" else bundle.eval
    return [list(x) for x in ds["input_ids"]]


MOSS = [moss_record([moss_turn(f"q{i}", f"a{i}"), moss_turn(f"q{i}b", f"a{i}b")]) for i in range(6)]


def real_world_moss(records):
    """MOSS records as its released SFT files have them: `conversation_id` a number in some lines
    and a string in others, nested metadata, optional turn fields left out."""
    out = []
    for i, r in enumerate(records):
        r = json.loads(json.dumps(r))
        r["conversation_id"] = i if i % 2 else f"conv-{i}"
        r["category"] = "Brainstorming" if i % 3 else {"main": "Writing", "tags": [1, "x", None]}
        if i == 1:
            del r["chat"]["turn_1"]["Inner Thoughts"], r["chat"]["turn_1"]["Commands"]
            r["chat"]["turn_1"]["Tool Responses"] = None
            del r["meta_instruction"]
        out.append(r)
    return out


def test_unused_columns_of_any_type_never_decide_loading(tmp_path):
    messy = real_world_moss(MOSS[:4])
    # a column whose type changes between the files of one run
    messy[2]["conversation_id"], messy[3]["conversation_id"] = [7, "x"], {"id": 3.5}
    a, b = write_jsonl(tmp_path / "a.jsonl", messy[:2]), write_jsonl(tmp_path / "b.jsonl", messy[2:])
    plain = [{k: v for k, v in r.items() if k not in ("conversation_id", "category")} for r in messy]
    ref = build(tmp_path, str(write_jsonl(tmp_path / "plain.jsonl", plain)), collator="moss", meta_instruction=None)
    got = build(tmp_path, [str(a), str(b)], collator="moss", meta_instruction=None)
    assert samples(got) == samples(ref) and got.report.samples == 4


def test_types_inside_used_fields_still_name_file_and_line(tmp_path):
    bad = real_world_moss(MOSS[:3])
    bad[2]["chat"]["turn_2"]["MOSS"] = {"text": "a"}
    path = write_jsonl(tmp_path / "moss.jsonl", bad)
    with pytest.raises(DataError, match=rf"^{path}:3: chat\.turn_2\.MOSS must be a string, got dict"):
        build(tmp_path, str(path), collator="moss")


def test_files_of_different_formats_mix_in_one_run(tmp_path):
    moss = write_jsonl(tmp_path / "d1.jsonl", MOSS[:2])
    msgs = write_jsonl(tmp_path / "d2.jsonl", [messages_record([("hi", "hello")])])
    alpaca = write_jsonl(tmp_path / "d3.jsonl", [{"instruction": "add", "input": "1+1", "output": "2", "id": 5}])
    listed = build(tmp_path, [str(moss), str(msgs), str(alpaca)])
    globbed = build(tmp_path, str(tmp_path / "d*.jsonl"))
    assert listed.report.samples == globbed.report.samples == 4
    assert samples(listed) == samples(globbed)
    assert [c.format for c in listed.report.sources] == ["moss", "messages", "alpaca"]
    assert globbed.report.sources[0].format == "moss+messages+alpaca"
    assert "source " in listed.report.summary()


def test_auto_format_is_decided_per_source_eval_included(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", MOSS[:3])
    evals = write_jsonl(tmp_path / "eval.jsonl", [messages_record([("q", "a")]), messages_record([("q2", "a2")])])
    bundle = build(tmp_path, str(train), eval=str(evals))
    assert bundle.report.samples == 3 and bundle.report.eval.samples == 2


def test_a_source_format_overrides_data_format(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}])
    msgs = write_jsonl(tmp_path / "m.jsonl", [messages_record([("q", "a")])])
    bundle = build(tmp_path, [{"path": str(rows), "format": "chatglm"}, str(msgs)], format="messages")
    assert [c.format for c in bundle.report.sources] == ["chatglm", "messages"]
    with pytest.raises(DataError, match=rf"^{rows}:1: missing field 'messages'"):
        build(tmp_path, [str(rows), str(msgs)], format="messages")


def test_weights_repeat_and_thin_sources_deterministically(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", MOSS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", [messages_record([(f"q{i}", f"a{i}")]) for i in range(8)])
    one = samples(build(tmp_path, [str(a), str(b)]))
    twice = build(tmp_path, [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}])
    got = samples(twice)
    assert got[:4] == one[:2] * 2  # every record of `a` twice, in order
    half = got[4:]
    assert len(half) == 4 and all(s in one[2:] for s in half) and len({tuple(s) for s in half}) == 4
    again = build(tmp_path, [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}])
    assert samples(again) == got
    counts = {c.name: (c.sessions, c.samples, c.weight) for c in twice.report.sources}
    assert counts == {str(a): (2, 4, 2.0), str(b): (4, 4, 0.5)}
    assert "weight 0.5" in twice.report.summary()


def test_weighted_rows():
    source_of = [0, 0, 0, 1, 1, 1, 1]
    assert weighted_rows(source_of, None, [1, 1], seed=1) is None
    assert weighted_rows(source_of, [0, 2, 3], [1, 1], seed=1) == [0, 2, 3]
    assert weighted_rows(source_of, None, [0, 2], seed=1) == [3, 4, 5, 6, 3, 4, 5, 6]
    picks = {tuple(weighted_rows(source_of, None, [1.5, 0.5], seed=s)) for s in range(20)}
    assert all(p[:3] == (0, 1, 2) and len(p) == 3 + 2 + 2 for p in picks) and len(picks) > 1


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"path": "a.jsonl", "wieght": 2}, r"'data.train\[0\].wieght': unknown key \(did you mean 'weight'\?\)"),
        ({"path": "a.jsonl", "weight": -1}, r"'data.train\[0\].weight' must be a number in \(0, 1e\+06\].*, got -1"),
        ({"path": "a.jsonl", "weight": "2"}, r"'data.train\[0\].weight' must be a number in \(0"),
        ({"path": "a.jsonl", "format": "alpacca"}, r"'data.train\[0\].format' is 'alpacca'.*did you mean 'alpaca'"),
        ({"format": "moss"}, r"'data.train\[0\].path' must be"),
        (3, r"'data.train\[0\]' must be a path"),
    ],
)
def test_source_mapping_is_validated(entry, message):
    with pytest.raises(ConfigError, match=message):
        recipe(train=[entry])
    for weight in (0, float("inf"), float("nan"), 1e308):  # no run can mean these (issue 29)
        with pytest.raises(ConfigError, match=r"weight' must be a number in \(0, 1e\+06\] \(0 takes nothing"):
            data_sources([{"path": "x", "weight": weight}], "data.eval")
    assert data_sources([{"path": "x", "weight": 1e6}], "data.eval")[0].weight == 1e6

"""Loading records through datasets, format detection, and every bad-data class with its message."""

import json

import pytest
from data_helpers import META, messages_record, moss_record, moss_turn, recipe, tok, write_jsonl

from peftchat.data.pipeline import build_datasets
from peftchat.data.readers import detect_format, normalize
from peftchat.data.sources import load_records
from peftchat.errors import DataError

GOOD_ROW = {"prompt": "q", "response": "a", "history": []}


def build(tmp_path, train, **data):
    return build_datasets(
        recipe(train=str(train) if not isinstance(train, list) else train, cache_dir=str(tmp_path / "cache"), **data),
        tok(),
    )


def test_load_jsonl_list_of_files_json_array_and_saved_dir(tmp_path):
    import datasets

    a = write_jsonl(tmp_path / "a.jsonl", [GOOD_ROW, GOOD_ROW])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([GOOD_ROW, {**GOOD_ROW, "prompt": "q2"}]), encoding="utf-8")
    cfg = recipe(cache_dir=str(tmp_path / "cache")).data
    src = load_records([str(a), str(b)], cfg)
    assert len(src.dataset) == 4 and json.loads(src.dataset[3]["record"])["prompt"] == "q2"
    assert [src.origins(i) for i in range(4)] == [f"{a}:1", f"{a}:2", f"{b}[0]", f"{b}[1]"]
    assert src.dataset["format"] == ["chatglm"] * 4 and src.dataset["source"] == [0, 0, 1, 1]
    datasets.Dataset.from_list([GOOD_ROW]).save_to_disk(str(tmp_path / "saved"))
    saved = load_records(str(tmp_path / "saved"), cfg)
    assert json.loads(saved.dataset[0]["record"])["prompt"] == "q" and saved.origins(0) == f"{tmp_path / 'saved'}[0]"
    globbed = load_records(str(tmp_path / "*.jsonl"), cfg)
    assert len(globbed.dataset) == 2


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(GOOD_ROW) + "\n\n  \n" + json.dumps({"prompt": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:5: missing field 'response'"):
        build(tmp_path, path, format="chatglm", collator="chatglm")


def test_detect_format():
    cfg = recipe().data
    assert detect_format(moss_record([moss_turn("q", "a")]), cfg, "x") == "moss"
    assert detect_format(messages_record([("q", "a")]), cfg, "x") == "messages"
    assert detect_format({"conversations": []}, cfg, "x") == "sharegpt"
    assert detect_format(GOOD_ROW, cfg, "x") == "chatglm"
    with pytest.raises(DataError, match=r"f\.jsonl:1: cannot tell the data format from the keys \['text'\]"):
        detect_format({"text": "hi"}, cfg, "f.jsonl:1")


def test_auto_format_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [messages_record([("q", "a")])])
    bundle = build(tmp_path, path)  # format auto, collator chat_template
    assert bundle.report.samples == 1


def test_sharegpt_roles_and_system():
    rec = {"system": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    c = normalize(rec, "sharegpt", recipe().data, "x")
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant"]
    with pytest.raises(DataError, match=r"conversations\[1\]\.from is 'robot'"):
        normalize(
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
            "sharegpt",
            recipe().data,
            "x",
        )


def test_moss_raw_values_are_kept():
    turn = moss_turn("q", "a", tool="X")
    c = normalize(moss_record([turn]), "moss", recipe().data, "x")
    assert c.moss_turns == [list(turn.items())]
    assert c.messages == [
        {"role": "system", "content": META},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


BAD = [
    # (format, line text, expected message after "file:2: ")
    ("chatglm", '{"prompt": "q", "response": "a"', r"invalid JSON \(Expecting ',' delimiter at column 32\)"),
    ("chatglm", "[1, 2]", "expected a JSON object, got list"),
    ("chatglm", json.dumps({"prompt": "q"}), "missing field 'response'"),
    (
        "chatglm",
        json.dumps({"prompt": "q", "response": "a", "history": [["only one"]]}),
        r"history\[0\] must be a \[query, answer\] pair",
    ),
    (
        "messages",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),
        r"messages\[1\]\.role is 'bot'; expected one of system, user, assistant, tool",
    ),
    (
        "messages",
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        r"messages\[0\]: the conversation ends on a user turn; it must end with the assistant's",
    ),
    (
        "moss",
        json.dumps({**moss_record([moss_turn("q", "a")]), "num_turns": 2}),
        r"num_turns is 2 but 'chat' holds \['turn_1'\]",
    ),
    (
        "moss",
        json.dumps(moss_record([{**moss_turn("q", "a"), "Human": "q<eoh>\n"}])),
        r"chat\.turn_1\.Human must start with '<\|Human\|>:'",
    ),
    ("moss", json.dumps(moss_record([{"Human": "<|Human|>: q<eoh>\n"}])), r"chat\.turn_1 is missing field 'MOSS'"),
]
GOOD = {"chatglm": GOOD_ROW, "messages": messages_record([("q", "a")]), "moss": moss_record([moss_turn("q", "a")])}
COLLATOR = {"chatglm": "chatglm", "messages": "chat_template", "moss": "moss"}


@pytest.mark.parametrize("fmt,line,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_record_names_file_and_line(tmp_path, fmt, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD[fmt]) + "\n" + line + "\n" + json.dumps(GOOD[fmt]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: {message}"):
        build(tmp_path, path, format=fmt, collator=COLLATOR[fmt])
    bundle = build(tmp_path, path, format=fmt, collator=COLLATOR[fmt], on_error="skip")
    assert bundle.report.skipped == 1 and bundle.report.samples == 2 and len(bundle.train) == 2
    assert bundle.report.skipped_examples[0].startswith(f"{path}:2: ")
    assert f"{path}:2: " in bundle.report.summary()


@pytest.mark.parametrize("collator", ["moss", "chatglm"])
def test_structure_the_collator_cannot_use_is_a_bad_record(tmp_path, collator):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "content": "t"},
            {"role": "assistant", "content": "b"},
        ]
    }
    path = write_jsonl(tmp_path / "t.jsonl", [msgs])
    with pytest.raises(DataError, match=rf"{path}:1: the chatglm and moss collators have no place for tool"):
        build(tmp_path, path, format="messages", collator=collator)


def test_json_array_errors_name_the_record_index(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([GOOD_ROW, {"prompt": "q"}]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}\[1\]: missing field 'response'"):
        build(tmp_path, path, format="chatglm", collator="chatglm")
    path.write_text('[{"prompt": "q",\n "response": }]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        build(tmp_path, path, format="chatglm", collator="chatglm")


def test_missing_file_and_all_bad(tmp_path):
    with pytest.raises(DataError, match="'data.train': file not found: .*nope.jsonl"):
        build(tmp_path, tmp_path / "nope.jsonl")
    path = tmp_path / "allbad.jsonl"
    path.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable records"):
        build(tmp_path, path, format="chatglm", collator="chatglm", on_error="skip")


def test_skipped_malformed_lines_keep_later_line_numbers(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD_ROW), "{broken", json.dumps(GOOD_ROW), json.dumps({"prompt": "q"}), json.dumps(GOOD_ROW)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bundle = build(tmp_path, path, format="chatglm", collator="chatglm", on_error="skip")
    assert bundle.report.skipped == 2 and bundle.report.samples == 3
    assert sorted(m.split(": ")[0] for m in bundle.report.skipped_examples) == [f"{path}:2", f"{path}:4"]


def test_moss_meta_instruction_falls_back_to_the_recipe():
    record = moss_record([moss_turn("q", "a")])
    del record["meta_instruction"]
    c = normalize(record, "moss", recipe(meta_instruction="From the recipe.").data, "x")
    assert c.system == "From the recipe."


@pytest.mark.parametrize("fmt,collator", [("messages", "chat_template"), ("messages", "chatglm"), ("moss", "moss")])
def test_an_empty_answer_costs_its_round_only(tmp_path, fmt, collator):
    """Spec §1: a round with an empty answer is dropped and counted, the rest of the session kept
    (chatglm: that round makes no sample; a session format keeps it as context without loss)."""
    if fmt == "moss":
        record = moss_record(
            [moss_turn("q1", "a1"), {**moss_turn("q2", "a2"), "MOSS": "<|MOSS|>: <eom>\n"}, moss_turn("q3", "a3")]
        )
    else:
        record = messages_record([("q1", "a1"), ("q2", ""), ("q3", "a3")])
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    bundle = build(tmp_path, path, format=fmt, collator=collator)
    report = bundle.report
    assert report.skipped == 0
    if collator == "chatglm":
        assert len(bundle.train) == 2 and report.dropped == {"empty query or answer": 1}
    else:
        assert len(bundle.train) == 1 and report.left_out == {"empty answer (kept as context, no loss)": 1}
        assert any(x != -100 for x in bundle.train[0]["labels"])

"""Input formats users bring: Alpaca, OpenAI content parts, a per-message `train` flag; and no
tokenizer length warning for sessions the collator truncates."""

import pytest
from data_helpers import conv, messages_record, recipe, tok, write_jsonl

from peftchat.data.pipeline import build_datasets
from peftchat.data.readers import detect_format
from peftchat.errors import DataError

ALPACA = {
    "instruction": "Translate.",
    "input": "bonjour",
    "output": "hello",
    "system": "Be brief.",
    "history": [["hi", "hey"]],
}


def build(tmp_path, records, **data):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    return path, build_datasets(recipe(train=str(path), cache_dir=str(tmp_path / "cache"), **data), tok())


def test_alpaca_record_and_detection():
    c = conv(ALPACA, "alpaca")
    assert c.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "Translate.\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    bare = conv({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")
    assert bare.messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    cfg = recipe().data
    assert detect_format({"instruction": "x", "output": "y"}, cfg, "x") == "alpaca"
    # a recipe that names alpaca's columns as chatglm columns keeps chatglm
    assert (
        detect_format(
            {"instruction": "x", "output": "y"}, recipe(prompt_column="instruction", response_column="output").data, "x"
        )
        == "chatglm"
    )


def test_alpaca_end_to_end_and_errors(tmp_path):
    path, bundle = build(tmp_path, [ALPACA, {"instruction": "q", "output": "a", "source": {"x": 1}}])
    assert bundle.report.samples == 2 and bundle.report.sources[0].format == "alpaca"
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'output' must be a string, got int"):
        build(tmp_path, [ALPACA, {"instruction": "q", "output": 3}], format="alpaca")
    with pytest.raises(DataError, match=r"d\.jsonl:1: history\[0\] must be a \[query, answer\] pair"):
        build(tmp_path, [{**ALPACA, "history": [["only one"]]}])


def test_content_parts_text_is_joined():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
        ]
    }
    assert [m["content"] for m in conv(record, "messages").messages] == ["a\nb", "c"]


def test_content_parts_other_than_text_name_file_and_line(tmp_path):
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": "x.png"}},
                ],
            },
            {"role": "assistant", "content": "a cat"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [messages_record([("q", "a")]), image])
    with pytest.raises(
        DataError, match=rf"^{path}:2: messages\[0\]\.content\[1\] is a 'image_url' part; only text parts"
    ):
        build_datasets(recipe(train=str(path), cache_dir=str(tmp_path / "cache")), tok())


def test_train_flag_is_kept_and_checked():
    record = messages_record([("q1", "a1"), ("q2", "a2")])
    record["messages"][1]["train"] = False
    c = conv(record, "messages")
    assert c.messages[1] == {"role": "assistant", "content": "a1", "train": False}
    assert "train" not in c.messages[3]
    record["messages"][1]["train"] = "no"
    with pytest.raises(DataError, match=r"messages\[1\]\.train must be true or false"):
        conv(record, "messages")
    record["messages"][1]["train"] = None
    record["messages"][0]["train"] = False
    with pytest.raises(DataError, match=r"messages\[0\]\.train .* on an assistant message only; got False on 'user'"):
        conv(record, "messages")


def test_long_sessions_cut_by_the_collator_print_no_length_warning(tmp_path, capfd):
    long = " ".join(["word"] * 2500)  # longer than the demo tokenizer's model_max_length (2048)
    _, bundle = build(
        tmp_path, [messages_record([(long, "a"), ("q", "short answer")])], max_length=256, truncation="drop_oldest"
    )
    assert bundle.report.truncated == 1
    assert "Token indices sequence length" not in capfd.readouterr().err
    assert tok().model_max_length == 2048  # the caller's tokenizer is left as it was

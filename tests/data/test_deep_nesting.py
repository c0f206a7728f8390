"""json recurses once per nesting level: a line 100,000 levels deep is a bad record named by
file:line (skippable with on_error: skip), not a RecursionError."""

import pytest

from peftchat.config import DataConfig
from peftchat.data.sources import load_records
from peftchat.errors import DataError

DEEP = "[" * 100_000 + "]" * 100_000


def test_a_jsonl_line_nested_too_deep_is_named_and_skippable(tmp_path):
    good = '{"prompt": "q", "response": "a"}\n'
    path = tmp_path / "deep.jsonl"
    path.write_text(good + DEEP + "\n" + good, encoding="utf-8")
    with pytest.raises(DataError, match=r"deep.jsonl:2: JSON nested too deeply"):
        load_records(str(path), DataConfig(train=str(path)))
    source = load_records(str(path), DataConfig(train=str(path), on_error="skip"))
    assert len(source.dataset) == 2 and source.origins(1) == f"{path}:3"
    assert len(source.bad) == 1 and "deep.jsonl:2: JSON nested too deeply" in source.bad[0]


def test_a_json_file_nested_too_deep_is_named(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(DEEP, encoding="utf-8")
    with pytest.raises(DataError, match=r"deep.json: JSON nested too deeply"):
        load_records(str(path), DataConfig(train=str(path)))

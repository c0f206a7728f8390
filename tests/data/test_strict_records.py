"""Reading data files strictly and boundedly (data/sources.py): every kind of bad JSON record is
named ``file:line`` (``file[i] (line L)`` in a JSON array) and skippable with on_error: skip; a
record over data.max_record_bytes is refused before it is parsed."""

import json
import resource
import time

import pytest
from data_helpers import messages_record, recipe

from peftchat.data.sources import MIN_RECORD_BYTES, load_records, record_byte_limit
from peftchat.errors import DataError

GOOD = json.dumps(messages_record([("hi", "ok")]))

# (id, bad line as bytes, the problem named)
BAD_LINES = [
    ("duplicate-key", b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}', "duplicate key 'content'"),
    ("duplicate-top-key", b'{"messages": [], "messages": []}', "duplicate key 'messages'"),
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "x\\ud800y"}]}', "lone surrogate escape \\ud800"),
    ("lone-low-surrogate", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "lone surrogate escape \\udc00"),
    ("invalid-utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8 text (byte 46"),
    ("nan", b'{"messages": [], "n": NaN}', "NaN is not valid JSON"),
    ("infinity", b'{"messages": [], "n": -Infinity}', "-Infinity is not valid JSON"),
    ("not-an-object", b'"a string"', "expected a JSON object, got str"),
    ("invalid-json", b'{"messages": [}', "invalid JSON"),
    (
        "over-size",
        b'{"messages": [{"role": "user", "content": "' + b"w" * 3000 + b'"}]}',
        "over the limit of 2,000 bytes",
    ),
]


def _write(tmp_path, bad: bytes, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join([GOOD.encode(), bad, GOOD.encode()]) + b"\n")
    return path


@pytest.mark.parametrize("bad, problem", [r[1:] for r in BAD_LINES], ids=[r[0] for r in BAD_LINES])
def test_bad_line_stops_naming_file_and_line(tmp_path, bad, problem):
    path = _write(tmp_path, bad)
    cfg = recipe(str(path), format="messages", max_record_bytes=2000, cache_dir=str(tmp_path / "c")).data
    with pytest.raises(DataError) as e:
        load_records(cfg.train, cfg)
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value)


@pytest.mark.parametrize("bad, problem", [r[1:] for r in BAD_LINES], ids=[r[0] for r in BAD_LINES])
def test_bad_line_is_skipped_and_listed(tmp_path, bad, problem):
    path = _write(tmp_path, bad)
    cfg = recipe(
        str(path), format="messages", on_error="skip", max_record_bytes=2000, cache_dir=str(tmp_path / "c")
    ).data
    source = load_records(cfg.train, cfg)
    assert source.dataset["origin"] == [f"{path}:1", f"{path}:3"]
    assert len(source.bad) == 1 and source.bad[0].startswith(f"{path}:2: ") and problem in source.bad[0]


def test_paired_surrogates_and_repeated_keys_in_different_objects_are_fine(tmp_path):
    line = json.dumps(messages_record([("smile \U0001f600", "ok"), ("again", "yes")]))  # ensure_ascii: \ud83d\ude00
    assert "\\ud83d\\ude00" in line
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    cfg = recipe(str(path), format="messages", cache_dir=str(tmp_path / "c")).data
    (record,) = load_records(cfg.train, cfg).dataset["record"]
    assert "\U0001f600" in json.loads(record)["messages"][0]["content"]


ARRAY_BAD = [
    ("duplicate-key", '{"messages": [], "messages": []}', "duplicate key 'messages'"),
    ("lone-surrogate", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate escape \\ud800"),
    ("nan", '{"messages": [], "x": NaN}', "NaN is not valid JSON"),
    ("not-an-object", "3", "expected a JSON object, got int"),
    ("over-size", '{"messages": [{"role": "user", "content": "' + "w" * 3000 + '"}]}', "over the limit of 2,000 bytes"),
]


@pytest.mark.parametrize("on_error", ["stop", "skip"])
@pytest.mark.parametrize("bad, problem", [r[1:] for r in ARRAY_BAD], ids=[r[0] for r in ARRAY_BAD])
def test_json_array_item_named_with_its_line_and_skippable(tmp_path, bad, problem, on_error):
    path = tmp_path / "d.json"
    path.write_text(f"[\n  {GOOD},\n  {bad},\n  {GOOD}\n]\n", encoding="utf-8")
    cfg = recipe(
        str(path), format="messages", on_error=on_error, max_record_bytes=2000, cache_dir=str(tmp_path / "c")
    ).data
    if on_error == "stop":
        with pytest.raises(DataError) as e:
            load_records(cfg.train, cfg)
        message = str(e.value)
    else:
        source = load_records(cfg.train, cfg)
        assert source.dataset["origin"] == [f"{path}[0]", f"{path}[2]"]
        (message,) = source.bad
    assert message.startswith(f"{path}[1]: ") and problem in message and message.endswith("(line 3)")


@pytest.mark.parametrize(
    "text, where",
    [
        ('[{"messages": []} {"messages": []}]', "d.json:1: invalid JSON (expected ',' or ']' after item 0)"),
        ('[{"messages": []},\n', "d.json:2: invalid JSON (the array is not closed)"),
        ('[{"messages": []}] x', "d.json:1: invalid JSON (extra data after the array)"),
        ('[{"messages": []},\n {"messages": ]}]', "d.json:2: invalid JSON"),
    ],
)
def test_json_array_syntax_errors_name_the_line(tmp_path, text, where):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    cfg = recipe(str(path), format="messages", on_error="skip", cache_dir=str(tmp_path / "c")).data
    with pytest.raises(
        DataError,
        match=f"^{tmp_path}/" + where.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        load_records(cfg.train, cfg)


def test_default_limit_follows_the_sample_limit():
    assert record_byte_limit(recipe(max_length=128).data) == MIN_RECORD_BYTES
    assert record_byte_limit(recipe(max_length=32768).data) == 256 * 32768
    assert record_byte_limit(recipe(max_length=128, max_record_bytes=10).data) == 10


def test_a_30_mb_line_is_skipped_without_being_parsed(tmp_path):
    """The default limit (1 MiB at max_length 128) refuses a 30 MB line reading it in bounded
    pieces: before this check the line cost 5.7 GB of RSS and 79 s (parsed and tokenized whole)."""
    big = b'{"messages": [{"role": "user", "content": "' + b"word " * 6_000_000 + b'"}]}'
    path = _write(tmp_path, big)
    cfg = recipe(str(path), format="messages", on_error="skip", max_length=128, cache_dir=str(tmp_path / "c")).data
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    source = load_records(cfg.train, cfg)
    assert time.perf_counter() - start < 20
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024 < 20 * 2**20  # the peak grew < 20 MiB
    assert len(source.dataset) == 2 and len(source.bad) == 1
    assert source.bad[0].startswith(f"{path}:2: record of {len(big) + 1:,} bytes is over the limit of 1,048,576 bytes")

"""Loading raw records through `datasets`, keeping track of where each record came from.

`data.train` / `data.eval` is one source or a list of them; a source is a JSON Lines or JSON file, a
glob, a directory (written by `Dataset.save_to_disk`, or holding .jsonl/.json files), a hub dataset
name (train split; needs network), or a mapping ``{path, format, weight}`` naming one of those
(`config.data_sources`). ``format: auto`` is decided per file (per dataset for saved and hub ones)
from its first record, so files of different formats mix in one run.

Every source becomes rows of one fixed schema (`RECORD_FEATURES`): ``record`` — the JSON text of
only the fields its format reads (`readers.fields_read`) —, ``format``, ``origin`` (``file:LINE``,
1-based, or ``source[index]``) and ``source`` (the entry's index). A JSON file is read line by line
by us (a bad line is named as ``file:LINE``; with ``data.on_error: skip`` it is left out and listed
in `RecordSource.bad`), and what `datasets` then loads is a copy of those rows. Reading is strict
where Python's json is lenient (a duplicate key, a lone surrogate escape, NaN/Infinity are bad
records: json would silently keep one value or hand on text no UTF-8 file can hold) and bounded: a
line over `data.max_record_bytes` is refused from its length, read in bounded pieces, never
parsed. A .json array is parsed item by item (``file[i]``, with its line), so its bad items are
skippable too; its text is held whole. Why not let
`datasets` read the user's file: it infers one Arrow schema for every column of every file, so a
column the format never reads (MOSS's ``conversation_id``, a number in some lines and a string in
others) stops the load on some `datasets` versions, and files of different formats cannot share a
schema at all. The fields' own types are checked by the format readers, with the record's origin.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from peftchat.config import DataConfig, DataSource, check_regular_file, data_sources
from peftchat.data.readers import detect_format, prune
from peftchat.errors import DataError, UserError
from peftchat.paths import looks_local

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
TOO_DEEP = "JSON nested too deeply (more levels than Python's recursion limit)"
BYTES_PER_TOKEN = 256  # generous: a CJK character escaped as \\uXXXX is 6 bytes and may be one token
MIN_RECORD_BYTES = 1 << 20


RECORD_COLUMNS = ("record", "format", "origin", "source")
CLEAN_DIR = "peftchat-records-v1"  # bump when the row layout changes: old copies are then not reused


def record_features():
    import datasets

    return datasets.Features(
        {
            "record": datasets.Value("string"),
            "format": datasets.Value("string"),
            "origin": datasets.Value("string"),
            "source": datasets.Value("int32"),
        }
    )


@dataclass
class SourceInfo:
    """What one entry of data.train / data.eval gave."""

    name: str  # the path, glob or dataset as the recipe names it
    weight: float = 1.0
    formats: list[str] = field(default_factory=list)  # of its files, distinct, in order
    records: int = 0
    bad: list[str] = field(default_factory=list)  # malformed lines left out (on_error=skip)
    tools: Any = None  # the entry's default tool list (messages/sharegpt records that have none)

    def with_tools(self, record: dict, fmt: str) -> dict:
        """`record` with the entry's default tool list when it has none of its own."""
        if self.tools and fmt in ("messages", "sharegpt") and record.get("tools") in (None, "", []):
            return {**record, "tools": list(self.tools)}
        return record


@dataclass
class RecordSource:
    dataset: Any  # datasets.Dataset, one row per record, columns RECORD_COLUMNS
    sources: list[SourceInfo]
    name: str = ""

    @property
    def bad(self) -> list[str]:
        return [m for s in self.sources for m in s.bad]

    def origins(self, row: int) -> str:
        return self.dataset[row]["origin"]


@contextlib.contextmanager
def quiet_datasets(show_progress: bool = False) -> Iterator[None]:
    """Silence `datasets` progress bars (restored afterwards)."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    if show_progress:
        ds_logging.enable_progress_bar()
    else:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if was else ds_logging.disable_progress_bar)()


# The name start of `peftchat.train.lock`'s files (this layer cannot import train): never data.
RUN_FILES_PREFIX = ".peftchat-train."


def _looks_local(spec: str) -> bool:
    return looks_local(spec) or spec.endswith(JSON_SUFFIXES) or any(c in spec for c in "*?[")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _expand(spec: Any, key: str) -> list[Path]:
    """Local files named by `spec` (a path, a glob, a directory of JSON files, or a list of those)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for item in items:
        if not isinstance(item, str):
            raise DataError(f"'{key}': expected a path or a list of paths, got {item!r}")
        path = Path(item).expanduser()
        check_regular_file(path, f"'{key}':", DataError)
        if path.is_dir():
            # hidden files are no data: a run's own `.peftchat-train.holder.json`, editors' swap files
            found = sorted(
                p for p in path.iterdir() if p.suffix in JSON_SUFFIXES and p.is_file() and not p.name.startswith(".")
            )
            if not found:
                raise DataError(f"'{key}': directory {path} holds no .jsonl/.json files")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"'{key}': no file matches {item!r}")
            files += found
        else:
            raise DataError(f"'{key}': file not found: {item}")
    for f in files:
        if f.suffix not in JSON_SUFFIXES:
            raise DataError(f"{f}: unsupported data file type {f.suffix!r}; expected .jsonl or .json")
        if f.name.startswith(RUN_FILES_PREFIX):
            raise DataError(f"'{key}': {f} is a file of peftchat's own (a run's lock), not data")
    return _distinct(files)


def _distinct(files: list[Path]) -> list[Path]:
    """`files` less repeats of one file under other names: a recursive glob follows symlinked dirs,
    and a symlink loop under the globbed dir named one file 41 times."""
    seen: set[tuple[int, int]] = set()
    out = []
    for f in files:
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(f)
    return out


def _problem(e: json.JSONDecodeError) -> str:
    return f"invalid JSON ({e.msg} at column {e.colno})"


class _BadValue(ValueError):
    """Valid JSON syntax that is still a bad record (raised from the decoder's hooks)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json keeps the last of duplicate keys silently: the other values would be lost unseen.
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:  # the first key seen twice (there is one: the lengths differ)
            if key in seen:
                break
            seen.add(key)
        raise _BadValue(f"duplicate key {key!r} in a JSON object (only one value would be kept)")
    return record


def _no_constant(name: str) -> Any:
    raise _BadValue(f"{name} is not valid JSON (not a number a record can hold)")


# Python's json is lenient in two ways strict JSON is not: duplicate keys (last wins) and NaN/Infinity.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]|\\u[dD][c-fC-F]")


def _lone_surrogate(raw: bytes, value: Any) -> str | None:
    """A problem when a string of `value` holds a lone surrogate escape (``\ud800``), which json
    accepts but no UTF-8 text can hold; paired escapes (an emoji) are fine."""
    if not _SURROGATE_ESCAPE.search(raw):
        return None  # the common case: no escape in the surrogate range at all
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate escape \\u{ord(e.object[e.start]):04x} in a string (not valid Unicode)"
    return None


def _parse(raw: bytes, first: bool) -> tuple[Any, str | None]:
    """(value, None) for a JSON text, or (None, problem)."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start} of the line)"
    try:
        value = _DECODER.decode(text.strip())
    except json.JSONDecodeError as e:
        return None, _problem(e)
    except _BadValue as e:
        return None, str(e)
    except RecursionError:  # json's decoder recurses once per nesting level
        return None, TOO_DEEP
    return value, _lone_surrogate(raw, value)


def record_byte_limit(cfg: DataConfig) -> int:
    """The most bytes one JSON record may have (`DataConfig.max_record_bytes`)."""
    if cfg.max_record_bytes is not None:
        return int(cfg.max_record_bytes)
    from peftchat.formats.registry import sample_limit

    return max(MIN_RECORD_BYTES, BYTES_PER_TOKEN * sample_limit(cfg))


def _too_big(size: int, limit: int) -> str:
    return (
        f"record of {size:,} bytes is over the limit of {limit:,} bytes (data.max_record_bytes; "
        f"far longer than a sample can be)"
    )


def _lines(fh, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, size) for each line of `fh`, reading at most `limit` + 1 bytes of a line at once: a
    longer line comes back as (None, its size) without ever being held whole."""
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n") and len(raw) == limit + 1:
            yield raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):  # drain the rest of the long line in bounded pieces
            raw = fh.readline(1 << 20)
            if not raw:
                break
            size += len(raw)
        yield None, size


def _scan_jsonl(path: Path, cfg: DataConfig, bad: list[str]) -> Iterator[tuple[str, dict]]:
    """(``file:LINE``, record) for each good line of a JSON Lines file; bad ones go to `bad`."""
    limit = record_byte_limit(cfg)
    with open(path, "rb") as fh:
        for n, (raw, size) in enumerate(_lines(fh, limit), start=1):
            if raw is None:
                problem: str | None = _too_big(size, limit)
            elif not raw.strip():
                continue
            else:
                value, problem = _parse(raw, n == 1)
                if problem is None:
                    if isinstance(value, dict):
                        yield f"{path}:{n}", value
                        continue
                    problem = f"expected a JSON object, got {type(value).__name__}"
            message = f"{path}:{n}: {problem}"
            if cfg.on_error == "stop":
                raise DataError(message)
            bad.append(message)


def _array_items(path: Path, text: str, cfg: DataConfig, bad: list[str]) -> Iterator[tuple[str, dict]]:
    """(``file[i]``, record) for each item of the JSON array `text`, parsed one item at a time so
    a bad item (duplicate key, lone surrogate, over the size limit, not an object) is named as
    ``file[i] (line L)`` and can be skipped. The file's text is held whole; an item is parsed
    before its size is known (JSON Lines are bounded before parsing)."""
    limit = record_byte_limit(cfg)
    space = re.compile(r"[ \t\r\n]*")

    def skip_space(p: int) -> int:
        match = space.match(text, p)
        assert match is not None  # `*` matches the empty string too
        return match.end()

    pos, i = skip_space(text.index("[") + 1), 0
    line, counted = 1, 0

    def line_at(p: int) -> int:  # counted incrementally: a count from the start per item is quadratic
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, p), p
        return line

    problem: str | None
    while pos < len(text) and text[pos] != "]":
        line = line_at(pos)
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: {_problem(e)}") from None
        except RecursionError:
            raise DataError(f"{path}: {TOO_DEEP}") from None
        except _BadValue as e:
            value, end, problem = None, None, str(e)
        else:
            raw = text[pos:end].encode("utf-8", "surrogatepass")
            problem = _too_big(len(raw), limit) if len(raw) > limit else _lone_surrogate(raw, value)
            if problem is None and not isinstance(value, dict):
                problem = f"expected a JSON object, got {type(value).__name__}"
        if problem is None:
            yield f"{path}[{i}]", value
        elif cfg.on_error == "stop":
            raise DataError(f"{path}[{i}]: {problem} (line {line})")
        else:
            bad.append(f"{path}[{i}]: {problem} (line {line})")
        if end is None:  # a hook refused the item: find its end with the lenient decoder
            end = json.JSONDecoder().raw_decode(text, pos)[1]
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise DataError(f"{path}:{line_at(pos)}: invalid JSON (expected ',' or ']' after item {i})")
        i += 1
    if pos >= len(text):
        raise DataError(f"{path}:{line_at(pos)}: invalid JSON (the array is not closed)")
    if text[pos + 1 :].strip():
        raise DataError(f"{path}:{line_at(pos)}: invalid JSON (extra data after the array)")


def _scan_json(path: Path, cfg: DataConfig, bad: list[str]) -> Iterator[tuple[str, dict]]:
    """(origin, record) for each record of a .json file: a JSON array of objects (``file[i]``),
    one object, or JSON Lines under a .json name (``file:LINE``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if text.lstrip().startswith("["):  # an array: read item by item (each named, bounded, skippable)
        yield from _array_items(path, text, cfg, bad)
        return
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: {TOO_DEEP}") from None
    except json.JSONDecodeError as e:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        try:
            looks_jsonl = isinstance(json.loads(first), dict) and e.lineno > 1
        except (json.JSONDecodeError, RecursionError):
            looks_jsonl = False
        if not looks_jsonl:
            raise DataError(f"{path}:{e.lineno}: {_problem(e)}") from None
        yield from _scan_jsonl(path, cfg, bad)
        return
    if isinstance(value, dict):
        body = [n for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
        if len(body) != 1:
            raise DataError(f"{path}: holds one JSON object; expected a list of records or JSON Lines")
        yield from _scan_jsonl(path, cfg, bad)  # a one-line JSON Lines file
        return
    raise DataError(f"{path}: expected a list of records (or JSON Lines), got {type(value).__name__}")


def _row(record: dict, fmt: str, origin: str, source: int, cfg: DataConfig) -> str:
    return (
        json.dumps(
            {
                "record": json.dumps(prune(record, fmt, cfg), ensure_ascii=False),
                "format": fmt,
                "origin": origin,
                "source": source,
            },
            ensure_ascii=False,
        )
        + "\n"
    )


def _rows_file(path: Path, fmt: str, source: int, cfg: DataConfig, info: SourceInfo) -> Path | None:
    """Check `path` record by record and write its rows (`RECORD_COLUMNS`) to a copy named by
    content, so an unchanged file maps to an unchanged copy and `datasets` reuses its cache.
    None when every record was bad and skipped."""
    out_dir = Path(cfg.cache_dir or tempfile.gettempdir()).expanduser() / CLEAN_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    records = _scan_json(path, cfg, info.bad) if path.suffix == ".json" else _scan_jsonl(path, cfg, info.bad)
    bad_before, count = len(info.bad), 0
    digest = hashlib.sha256(str(path.resolve()).encode() + b"\0")
    file_format = fmt
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out_dir, suffix=".tmp", delete=False) as tmp:
        try:
            for origin, record in records:
                if file_format == "auto":
                    file_format = detect_format(record, cfg, origin)
                line = _row(info.with_tools(record, file_format), file_format, origin, source, cfg)
                digest.update(line.encode())
                tmp.write(line)
                count += 1
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    if count == 0:
        os.unlink(tmp.name)
        if len(info.bad) > bad_before:  # every line was bad and skipped: nothing of this file to load
            return None
        raise DataError(f"{path}: no records")
    out = out_dir / f"{path.stem}-{digest.hexdigest()[:20]}.jsonl"
    if out.exists():
        os.unlink(tmp.name)
    else:
        os.replace(tmp.name, out)
    info.records += count
    if file_format not in info.formats:
        info.formats.append(file_format)
    return out


def _load_rows(files: list[Path], cache_dir: str | None, name: str) -> Any:
    import datasets

    try:
        with quiet_datasets():
            return datasets.load_dataset(
                "json",
                data_files=[str(f) for f in files],
                split="train",
                features=record_features(),
                cache_dir=cache_dir,
            )
    except Exception as e:  # our own rows failing to load is a bug or a disk problem; name the source
        raise DataError(f"{name}: cannot load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


class _ToRows:
    """Map function: rows of a saved or hub dataset -> `RECORD_COLUMNS` (a class, so it pickles)."""

    def __init__(self, fmt: str, label: str, source: int, cfg: DataConfig, info: SourceInfo) -> None:
        self.fmt, self.label, self.source, self.cfg, self.info = fmt, label, source, cfg, info

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        columns = list(batch)
        records = [self.info.with_tools({c: batch[c][j] for c in columns}, self.fmt) for j in range(len(indices))]
        return {
            "record": [json.dumps(prune(r, self.fmt, self.cfg), ensure_ascii=False, default=str) for r in records],
            "format": [self.fmt] * len(indices),
            "origin": [f"{self.label}[{i}]" for i in indices],
            "source": [self.source] * len(indices),
        }


def _open_dataset(spec: str, key: str, cache_dir: str | None) -> Any:
    """A saved dataset dir or a hub dataset name, as a `datasets.Dataset` (train split)."""
    import datasets

    path = Path(spec).expanduser()
    if _looks_local(spec):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load the saved dataset: {str(e).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: the saved DatasetDict has no 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        return ds
    try:
        with quiet_datasets():
            return datasets.load_dataset(spec, split="train", cache_dir=cache_dir)
    except Exception as e:
        raise DataError(
            f"'{key}': cannot load dataset {spec!r} from the hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _load_dataset_source(entry: DataSource, fmt: str, index: int, cfg: DataConfig, key: str, info: SourceInfo) -> Any:
    ds = _open_dataset(entry.path, key, cfg.cache_dir)
    label = str(Path(entry.path).expanduser()) if _looks_local(entry.path) else entry.path
    if len(ds) == 0:
        raise DataError(f"{label}: no records")
    if fmt == "auto":
        fmt = detect_format(ds[0], cfg, f"{label}[0]")
    info.records, info.formats = len(ds), [fmt]
    with quiet_datasets():
        return ds.map(
            _ToRows(fmt, label, index, cfg, info),
            with_indices=True,
            batched=True,
            remove_columns=ds.column_names,
            features=record_features(),
            desc=f"reading {label}",
        )


def local_data_files(spec: Any, key: str) -> list[Path]:
    """Every local file or dataset dir `spec` names (globs and dirs expanded), without reading any:
    what an output must never overwrite. A spec that does not resolve gives what it can (loading
    names the problem later)."""
    if spec in (None, ""):
        return []
    try:
        entries = data_sources(spec, key)
    except UserError:
        return []
    found: list[Path] = []
    for entry in entries:
        path = Path(entry.path).expanduser()
        if path.is_dir():
            found.append(path)  # the whole dir is read (a saved dataset or a dir of JSON files)
            continue
        try:
            found += _expand(entry.path, key)
        except UserError:
            continue
    return found


def load_records(spec: Any, cfg: DataConfig, *, key: str = "data.train") -> RecordSource:
    """The records named by `spec` (the value of `data.train` or `data.eval`), every source in order."""
    import datasets

    parts: list[Any] = []
    infos: list[SourceInfo] = []
    for index, entry in enumerate(data_sources(spec, key)):
        fmt = entry.format or cfg.format
        info = SourceInfo(name=entry.path, weight=entry.weight, tools=entry.tools)
        infos.append(info)
        check_regular_file(Path(entry.path).expanduser(), f"'{key}':", DataError)  # before a hub name is guessed
        is_saved = _is_saved_dataset(Path(entry.path).expanduser())
        if is_saved or not _looks_local(entry.path):
            parts.append(_load_dataset_source(entry, fmt, index, cfg, key, info))
            continue
        files = _expand(entry.path, key)
        copies = [c for f in files if (c := _rows_file(f, fmt, index, cfg, info)) is not None]
        if not copies:
            raise DataError(f"{', '.join(map(str, files))}: no usable records ({len(info.bad)} bad lines skipped)")
        ds = _load_rows(copies, cfg.cache_dir, entry.path)
        if len(ds) != info.records:  # a loader that skips or merges lines would misname every error
            raise DataError(f"{entry.path}: datasets read {len(ds)} records where {info.records} were expected")
        parts.append(ds)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return RecordSource(dataset, infos, name=", ".join(i.name for i in infos))

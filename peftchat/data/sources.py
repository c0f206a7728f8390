"""Loading raw records through `datasets`, keeping track of where each record came from.

`data.train` / `data.eval` may be a JSON Lines or JSON file, a list of files (glob patterns
allowed), a directory (written by `Dataset.save_to_disk`, or holding .jsonl/.json files), or a hub
dataset name (train split; needs network).

`datasets`' JSON loader reports a malformed line poorly (a pyarrow message with a byte offset, or
none), so local JSON files are checked line by line first, which is cheap: a bad line is named as
``file:LINE`` (1-based). With ``data.on_error: skip`` the bad lines are left out (a cleaned copy of
the file is loaded instead) and returned in `RecordSource.bad` for the report.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from peftchat.errors import DataError
from peftchat.paths import looks_local

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
TOO_DEEP = "JSON nested too deeply (more levels than Python's recursion limit)"


class Origins:
    """Maps a row of the loaded dataset to ``file:line`` (JSON Lines) or ``source[index]``."""

    def __init__(self) -> None:
        self._parts: list[tuple[int, str, array | None]] = []  # (first row, label, line numbers)
        self.total = 0

    def add(self, label: str, count: int, lines: array | None = None) -> None:
        self._parts.append((self.total, label, lines))
        self.total += count

    def __call__(self, row: int) -> str:
        for start, label, lines in reversed(self._parts):
            if row >= start:
                k = row - start
                return f"{label}:{lines[k]}" if lines is not None else f"{label}[{k}]"
        return f"record {row}"


@dataclass
class RecordSource:
    dataset: Any  # datasets.Dataset of raw records
    origins: Origins
    bad: list[str] = field(default_factory=list)  # malformed lines left out (on_error=skip)
    name: str = ""


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
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in JSON_SUFFIXES and p.is_file())
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
    return files


def _problem(e: json.JSONDecodeError) -> str:
    return f"invalid JSON ({e.msg} at column {e.colno})"


def _scan_jsonl(path: Path, on_error: str, bad: list[str]) -> tuple[array, bool]:
    """Line numbers (1-based) of the good records of a JSON Lines file; whether any line was bad."""
    lines = array("I")
    any_bad = False
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 text (byte {e.start} of the line)"
            else:
                if not text.strip():
                    continue
                try:
                    value = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    problem = _problem(e)
                except RecursionError:  # json's decoder recurses once per nesting level
                    problem = TOO_DEEP
                else:
                    if isinstance(value, dict):
                        lines.append(n)
                        continue
                    problem = f"expected a JSON object, got {type(value).__name__}"
            message = f"{path}:{n}: {problem}"
            if on_error == "stop":
                raise DataError(message)
            bad.append(message)
            any_bad = True
    return lines, any_bad


def _scan_json(path: Path, on_error: str, bad: list[str]) -> tuple[array | None, bool, int]:
    """Check a .json file. A JSON array of objects gives (None, False, count); a file that is
    really JSON Lines is scanned as such (its line numbers, whether any was bad, count)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: {TOO_DEEP}") from None
    except json.JSONDecodeError as e:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        try:
            looks_jsonl = isinstance(json.loads(first), dict) and e.lineno > 1
        except json.JSONDecodeError:
            looks_jsonl = False
        if not looks_jsonl:
            raise DataError(f"{path}:{e.lineno}: {_problem(e)}") from None
        lines, any_bad = _scan_jsonl(path, on_error, bad)
        return lines, any_bad, len(lines)
    if isinstance(value, dict):
        body = [n for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
        if len(body) != 1:
            raise DataError(f"{path}: holds one JSON object; expected a list of records or JSON Lines")
        return array("I", body), False, 1  # a one-line JSON Lines file
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of records (or JSON Lines), got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(item).__name__}")
    return None, False, len(value)


def _clean_copy(path: Path, lines: array, cache_dir: str | None) -> Path:
    """A copy of `path` holding only the good lines (named by content, so re-runs reuse it)."""
    wanted = set(lines)
    with open(path, "rb") as fh:
        kept = [raw.rstrip(b"\r\n") for n, raw in enumerate(fh, start=1) if n in wanted]
    body = b"\n".join(kept) + b"\n"
    digest = hashlib.sha256(str(path.resolve()).encode() + b"\0" + body).hexdigest()[:20]
    out_dir = Path(cache_dir or tempfile.gettempdir()).expanduser() / "peftchat-clean"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{path.stem}-{digest}.jsonl"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(body)
        tmp.replace(out)
    return out


def _load_json_files(files: list[Path], on_error: str, cache_dir: str | None) -> RecordSource:
    import datasets

    origins = Origins()
    bad: list[str] = []
    to_load: list[str] = []
    for f in files:
        if f.suffix == ".json":
            lines, any_bad, count = _scan_json(f, on_error, bad)
        else:
            lines, any_bad = _scan_jsonl(f, on_error, bad)
            count = len(lines)
        if count == 0:
            if any_bad:  # every line was bad and skipped: nothing of this file to load
                continue
            raise DataError(f"{f}: no records")
        origins.add(str(f), count, lines)
        to_load.append(str(_clean_copy(f, lines, cache_dir) if any_bad else f))
    if not to_load:
        raise DataError(f"{', '.join(map(str, files))}: no usable records ({len(bad)} bad lines skipped)")
    try:
        with quiet_datasets():
            ds = datasets.load_dataset("json", data_files=to_load, split="train", cache_dir=cache_dir)
    except Exception as e:  # pyarrow/datasets errors have many types; name the files at least
        raise DataError(f"{', '.join(to_load)}: cannot load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if len(ds) != origins.total:  # a loader that skips or merges lines would misname every error
        raise DataError(f"{', '.join(to_load)}: datasets read {len(ds)} records where {origins.total} were expected")
    return RecordSource(ds, origins, bad, name=", ".join(map(str, files)))


def load_records(spec: Any, *, on_error: str = "stop", cache_dir: str | None = None, key: str = "data.train") -> RecordSource:
    """Load the raw records named by `spec` (the value of `data.train` or `data.eval`)."""
    import datasets

    if isinstance(spec, str) and not _looks_local(spec):
        try:
            with quiet_datasets():
                ds = datasets.load_dataset(spec, split="train", cache_dir=cache_dir)
        except Exception as e:
            raise DataError(f"'{key}': cannot load dataset {spec!r} from the hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        origins = Origins()
        origins.add(spec, len(ds))
        return RecordSource(ds, origins, name=spec)
    if isinstance(spec, str) and _is_saved_dataset(Path(spec).expanduser()):
        path = Path(spec).expanduser()
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load the saved dataset: {str(e).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: the saved DatasetDict has no 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        origins = Origins()
        origins.add(str(path), len(ds))
        return RecordSource(ds, origins, name=str(path))
    return _load_json_files(_expand(spec, key), on_error, cache_dir)

"""`build_datasets`: recipe + tokenizer -> tokenized train/eval `datasets.Dataset`s and a report.

Steps: load the raw records of every source (`sources.load_records`: one row per record holding its
format, ``auto`` resolved per file), hold out eval sessions (``data.eval`` sources, or
``data.eval_split`` of the train records, chosen by session with ``training.seed``), apply the
sources' weights (`weighted_rows`), then one batched `Dataset.map` per split normalizes each record
(`readers.normalize`) and encodes it with the recipe's conversation format (`peftchat.formats`).
The map writes one row per
sample — ``input_ids``, ``labels`` (unpadded, unshifted, -100 = no loss) — plus one row per
dropped would-be sample, left-out part or skipped bad record carrying the reason, so the report can count them;
those rows are then left out. Output columns are exactly ``input_ids`` and ``labels``, in data-set
order (a chatglm session's rounds in round order).

Caching: the map gets an explicit fingerprint made of the raw dataset's fingerprint (datasets
derives it from the data files and their modification times, and from the held-out selection),
the tokenization-relevant ``data.*`` keys, a hash of the tokenizer and a hash of the data and
format code. `datasets` stores the result next to the raw data's cache (or under ``data.cache_dir``)
and a re-run with the same inputs loads it instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from peftchat.config import DataConfig, Recipe
from peftchat.data import preference
from peftchat.data.readers import FORMATS, normalize
from peftchat.data.report import DROP, LEFT_OUT, DataReport, skip_note
from peftchat.data.sources import RecordSource, load_records, quiet_datasets
from peftchat.errors import DataError, UserError
from peftchat.formats import registry
from peftchat.formats.samples import IGNORE_INDEX

# data.* keys that change the tokenized samples (the others — packing, shuffle, num_proc, … — don't).
TOKENIZATION_KEYS = (
    "collator",
    "max_length",
    "max_source_length",
    "max_target_length",
    "prompt_column",
    "response_column",
    "history_column",
    "source_prefix",
    "chatglm_style",
    "separator_tokens",
    "truncation",
    "loss_on",
    "meta_instruction",
    "on_error",
    "roles",
)
SHOW_PROGRESS_ABOVE = 50_000  # records; smaller maps finish before a progress bar is worth it


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset with columns input_ids, labels
    eval: Any  # datasets.Dataset or None
    report: DataReport  # train counts; report.eval holds the eval counts


def sample_limit(recipe: Recipe) -> int:
    """The most tokens one sample of this recipe can have (packing rows use it as their length)."""
    return registry.sample_limit(recipe.data)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that can change the ids the collators make."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [
        type(tokenizer).__name__,
        tokenizer.chat_template,
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
        sorted(map(str, tokenizer.all_special_tokens)),
    ]
    h.update(json.dumps(extra, default=str, sort_keys=True).encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    h = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted([*package.joinpath("data").glob("*.py"), *package.joinpath("formats").glob("*.py")]):
        h.update(path.parent.name.encode() + path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def _cache_key(raw, cfg: DataConfig, tokenizer, split: str) -> str:
    parts = {
        "raw": raw._fingerprint,  # covers each record's format (a column of the rows)
        "data": {k: getattr(cfg, k) for k in TOKENIZATION_KEYS},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": _code_fingerprint(),
        "split": split,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def weighted_rows(source_of: list[int], rows: list[int] | None, weights: list[float], seed: int) -> list[int] | None:
    """`rows` (None = every row) with each source's rows repeated or thinned by its weight: weight 2
    gives every row twice, 0.5 a half chosen with `seed` (the same half each epoch), 1.5 all once plus
    a seeded half. Sources keep their order, rows their order within a source (copies one after the
    other). None when nothing changes."""
    import numpy as np

    if all(w == 1 for w in weights):
        return rows
    members: dict[int, list[int]] = {}
    for r in rows if rows is not None else range(len(source_of)):
        members.setdefault(source_of[r], []).append(r)
    out: list[int] = []
    for source, own in sorted(members.items()):
        whole, part = divmod(weights[source], 1)
        out += own * int(whole)
        extra = round(part * len(own))
        if extra:
            chosen = np.random.default_rng([seed, source]).choice(len(own), extra, replace=False)
            out += [own[i] for i in sorted(chosen)]
    return out


class _Encoder:
    """The map function: raw records -> sample rows (+ note rows for drops and skipped records).

    A class rather than a closure so `datasets` can pickle it to worker processes (num_proc > 1)."""

    def __init__(self, cfg: DataConfig, tokenizer, rows: list[int] | None) -> None:
        self.cfg, self.rows = cfg, rows
        self.collator = registry.make_format(cfg, tokenizer)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "session": [], "truncated": [], "note": []}

        def row(session: int, ids: list[int], labels: list[int], truncated: bool, note: str) -> None:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["session"].append(session)
            out["truncated"].append(truncated)
            out["note"].append(note)

        for j, index in enumerate(indices):
            session = self.rows[index] if self.rows is not None else index
            origin = batch["origin"][j]
            try:
                record = json.loads(batch["record"][j])
                encoded = self.collator.encode(normalize(record, batch["format"][j], self.cfg, origin))
            except DataError as e:
                if self.cfg.on_error == "stop":
                    raise
                row(session, [], [], False, skip_note(str(e), getattr(e, "reason", None)))
                continue
            for sample in encoded.samples:
                row(session, sample.input_ids, sample.labels, sample.truncated, "")
            for reason in encoded.dropped:
                row(session, [], [], False, DROP + reason)
            for reason in encoded.left_out:
                row(session, [], [], False, LEFT_OUT + reason)
        return out


def _features():
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "session": datasets.Value("int64"),
            "truncated": datasets.Value("bool"),
            "note": datasets.Value("string"),
        }
    )


def _encode_split(
    raw, rows: list[int] | None, source: RecordSource, cfg: DataConfig, tokenizer, split: str, pairs: bool = False
) -> tuple[Any, DataReport]:
    """Tokenize one split (`raw`, whose row i is source row rows[i]); returns (dataset, report).
    `pairs`: preference pairs (`peftchat.data.preference`), one row per pair."""
    import numpy as np
    import pyarrow.compute as pc

    key = _cache_key(raw, cfg, tokenizer, split + ("-pairs" if pairs else ""))
    cache_file = None
    if cfg.cache_dir:
        cache_root = Path(cfg.cache_dir).expanduser() / "peftchat-tokenized"
        cache_root.mkdir(parents=True, exist_ok=True)
        cache_file = str(cache_root / f"{split}-{key}.arrow")
    encoder: preference.PairRows | _Encoder
    if pairs:
        encoder, features = (
            preference.PairRows(cfg, tokenizer, rows, registry.sample_limit(cfg)),
            preference.pair_features(),
        )
        columns = ["input_ids", "labels", *preference.REJECTED_COLUMNS]
    else:
        encoder, features, columns = _Encoder(cfg, tokenizer, rows), _features(), ["input_ids", "labels"]
    num_proc = cfg.num_proc if cfg.num_proc and cfg.num_proc > 1 and len(raw) >= 2 * cfg.num_proc else None
    with quiet_datasets(show_progress=len(raw) > SHOW_PROGRESS_ABOVE):
        mapped = raw.map(
            encoder,
            with_indices=True,
            batched=True,
            batch_size=256,
            remove_columns=raw.column_names,
            features=features,
            num_proc=num_proc,
            new_fingerprint=key,
            cache_file_name=cache_file,
            load_from_cache_file=True,
            desc=f"tokenizing {split}",
        )
    table = mapped.data.table if hasattr(mapped.data, "table") else mapped.data
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(table.column("labels"))
    loss_tokens = int(pc.sum(pc.not_equal(flat, IGNORE_INDEX)).as_py() or 0)
    notes = table.column("note").to_pylist()
    sessions = table.column("session").to_pylist()
    report = DataReport.from_columns(
        split, sessions, notes, table.column("truncated").to_pylist(), lengths.tolist(), loss_tokens
    )
    if pairs:
        rejected_loss = pc.sum(pc.not_equal(pc.list_flatten(table.column("rejected_labels")), IGNORE_INDEX))
        report.add_rejected(
            notes, pc.list_value_length(table.column("rejected_input_ids")).to_pylist(), int(rejected_loss.as_py() or 0)
        )
    source_of = source.dataset["source"]
    report.count_sources(
        [(i.name, "+".join(i.formats), i.weight, len(i.bad)) for i in source.sources],
        [source_of[s] for s in sessions],
        sessions,
        notes,
    )
    keep = np.flatnonzero(np.array([n == "" for n in notes], dtype=bool)) if notes else np.array([], dtype=int)
    result = mapped.select_columns(columns)
    if len(keep) != len(mapped):
        result = result.select(keep, new_fingerprint=f"{key}-samples")
    return result, report


def _session_keys(raw, cfg: DataConfig) -> list[Any]:
    """A key per record; records with one key form one session for the eval hold-out.

    Records are sessions, except chatglm rows: the rows of one conversation (each holding the
    earlier rounds as history) share their first question, so they are held out together."""
    formats = raw["format"]
    if "chatglm" not in formats:
        return list(range(len(raw)))
    keys: list[Any] = []
    for i, (fmt, text) in enumerate(zip(formats, raw["record"])):
        record = json.loads(text) if fmt == "chatglm" else {}
        prompt = record.get(cfg.prompt_column)
        history = record.get(cfg.history_column) if cfg.history_column else None
        first = (
            history[0][0]
            if isinstance(history, list) and history and isinstance(history[0], (list, tuple)) and history[0]
            else prompt
        )
        keys.append(("q", first) if isinstance(first, str) and first else ("row", i))
    return keys


def _bad_rows(raw, cfg: DataConfig) -> set[int]:
    """Rows whose record is not a conversation (they are skipped and counted when encoded)."""
    bad: set[int] = set()
    for i, (text, fmt, origin) in enumerate(zip(raw["record"], raw["format"], raw["origin"])):
        try:
            normalize(json.loads(text), fmt, cfg, origin)
        except DataError:
            bad.add(i)
    return bad


def _hold_out(raw, cfg: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, eval rows), both in data-set order; eval = data.eval_split of the sessions.

    Only good records are held out: with on_error=skip a bad one stays with the train rows (where
    it is skipped and counted once), so it never takes an eval slot."""
    import numpy as np

    keys = _session_keys(raw, cfg)
    bad = _bad_rows(raw, cfg) if cfg.on_error == "skip" else set()
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        if i not in bad:
            groups.setdefault(k, []).append(i)
    sessions = list(groups.values())
    n = len(sessions)
    share = cfg.eval_split
    n_eval = int(share) if share >= 1 else max(1, round(share * n))
    if n_eval >= n:
        raise DataError(
            f"'data.eval_split' ({share}) would hold out all {n} sessions of data.train, leaving none to train on"
        )
    chosen = np.random.default_rng(seed).permutation(n)[:n_eval]
    eval_rows = sorted(i for s in chosen for i in sessions[s])
    held = set(eval_rows)
    return [i for i in range(len(raw)) if i not in held], eval_rows


def _without_length_warning(tokenizer):
    """A shallow copy of `tokenizer` whose `model_max_length` does not limit anything.

    The collators tokenize a whole session before cutting it to data.max_length, which makes
    transformers warn "Token indices sequence length is longer than the specified maximum sequence
    length" for every long session — noise, since the samples are truncated right after. The copy
    silences exactly that warning; the caller's tokenizer (saved beside the adapter) is untouched."""
    import copy

    quiet = copy.copy(tokenizer)
    quiet.model_max_length = int(1e30)  # transformers' own "no limit" value (VERY_LARGE_INTEGER)
    return quiet


def build_datasets(recipe: Recipe, tokenizer, *, split_eval: bool = True) -> DataBundle:
    """Tokenized train (and eval) data for `recipe`. `split_eval=False` ignores data.eval and
    data.eval_split: every record of data.train, in order (what `peftchat data dump` shows)."""
    cfg = recipe.data
    if cfg.format not in ("auto", *FORMATS):
        raise UserError(f"'data.format' is {cfg.format!r}; expected auto or one of {', '.join(FORMATS)}")
    seed = recipe.training.seed
    pairs = preference.is_preference(recipe)
    tokenizer = _without_length_warning(tokenizer)
    train_src = load_records(cfg.train, cfg, key="data.train")
    train_rows, eval_src, eval_rows = None, None, None
    if split_eval and cfg.eval is not None:
        eval_src = load_records(cfg.eval, cfg, key="data.eval")
        eval_rows = weighted_rows(eval_src.dataset["source"], None, [s.weight for s in eval_src.sources], seed)
    elif split_eval and cfg.eval_split > 0:
        train_rows, eval_rows = _hold_out(train_src.dataset, cfg, seed)
        eval_src = train_src
    train_rows = weighted_rows(train_src.dataset["source"], train_rows, [s.weight for s in train_src.sources], seed)
    raw_train = train_src.dataset if train_rows is None else train_src.dataset.select(train_rows)
    train, report = _encode_split(raw_train, train_rows, train_src, cfg, tokenizer, "train", pairs)
    report.add_skipped(train_src.bad)
    evaluation = None
    if eval_src is not None:
        raw_eval = eval_src.dataset if eval_rows is None else eval_src.dataset.select(eval_rows)
        evaluation, report.eval = _encode_split(raw_eval, eval_rows, eval_src, cfg, tokenizer, "eval", pairs)
        if eval_src is not train_src:
            report.eval.add_skipped(eval_src.bad)
    if len(train) == 0:
        raise DataError(f"{train_src.name}: no training samples were made ({'; '.join(report.summary().splitlines())})")
    return DataBundle(train=train, eval=evaluation, report=report)

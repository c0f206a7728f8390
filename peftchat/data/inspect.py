"""`peftchat data dump` and `peftchat data inspect`: look at the samples a recipe makes.

``--split train`` (the default) shows the samples of *all* of ``data.train``, in data-set order,
before any eval hold-out (``data.eval_split``) and with no shuffling or packing, so sample i is the
i-th sample the format made from the files. ``--split eval`` shows the samples evaluation uses: the
``data.eval`` files, or the sessions ``data.eval_split`` holds out of ``data.train``. The caller
passes the tokenizer (the CLI loads only that): when ``model.path`` is not built yet (the demo
recipes), point ``model.tokenizer`` at one, e.g.
``peftchat data inspect recipes/demo.yaml model.tokenizer=peftchat/assets/tokenizer``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from peftchat.config import Recipe
from peftchat.data.pipeline import build_datasets
from peftchat.data.report import DataReport
from peftchat.errors import UserError
from peftchat.formats.samples import IGNORE_INDEX
from peftchat.paths import atomic_output

SPLITS = ("train", "eval")

LOSS_ON_TTY = ("\033[1;32m", "\033[0m")  # bold green
LOSS_PLAIN = ("⟦", "⟧")


def _build(recipe: Recipe, tokenizer, split: str) -> tuple[Any, DataReport]:
    """(samples, report) of `split`."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "train":
        bundle = build_datasets(recipe, tokenizer, split_eval=False)
        return bundle.train, bundle.report
    if recipe.data.eval is None and not recipe.data.eval_split:
        raise UserError("--split eval: the recipe has no eval data (set data.eval or data.eval_split)")
    bundle = build_datasets(recipe, tokenizer)
    assert bundle.eval is not None and bundle.report.eval is not None
    return bundle.eval, bundle.report.eval


def dump_samples(
    recipe: Recipe, tokenizer, out: str | Path, limit: int | None = None, split: str = "train", force: bool = False
) -> int:
    """Write one JSON object a line (`input_ids`, `labels`, `attention_mask`) per sample of `split`,
    data-set order; print the data report to stderr; return the number of samples written. `out`
    is written whole beside itself and renamed into place (an existing file only with `force`)."""
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be >= 0, got {limit}")
    samples, report = _build(recipe, tokenizer, split)
    n = len(samples) if limit is None else min(limit, len(samples))
    out = Path(out)
    with atomic_output(out, "--out", force) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in samples.select(range(n)):
            ids = row["input_ids"]
            out_row = {"input_ids": ids, "labels": row["labels"], "attention_mask": [1] * len(ids)}
            if "rejected_input_ids" in row:  # a preference pair
                out_row.update(rejected_input_ids=row["rejected_input_ids"], rejected_labels=row["rejected_labels"])
            fh.write(json.dumps(out_row) + "\n")
    print(report.summary(), file=sys.stderr)
    print(f"wrote {n} samples to {out}", file=sys.stderr)
    return n


def render_sample(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decoded text with the loss-bearing runs of tokens wrapped in markers."""
    open_, close = LOSS_ON_TTY if color else LOSS_PLAIN
    parts: list[str] = []
    k = 0
    while k < len(input_ids):
        loss = labels[k] != IGNORE_INDEX
        j = k
        while j < len(input_ids) and (labels[j] != IGNORE_INDEX) == loss:
            j += 1
        text = tokenizer.decode(input_ids[k:j], skip_special_tokens=False)
        parts.append(f"{open_}{text}{close}" if loss else text)
        k = j
    return "".join(parts)


def inspect_samples(
    recipe: Recipe,
    tokenizer,
    index: int | None = None,
    count: int = 3,
    stream: TextIO | None = None,
    split: str = "train",
) -> None:
    """Print decoded samples (sample `index`, or the first `count`) with loss-bearing tokens
    highlighted — ANSI colour on a terminal, ⟦…⟧ otherwise — and the data report's counts."""
    stream = stream or sys.stdout
    train, r = _build(recipe, tokenizer, split)
    if index is not None:
        if not -len(train) <= index < len(train):
            raise UserError(f"--index {index} is out of range: there are {len(train)} {r.unit}")
        chosen = [index % len(train)]
    else:
        chosen = list(range(min(max(count, 0), len(train))))
    color = stream.isatty() and not os.environ.get("NO_COLOR")
    marker = "highlighted" if color else "inside ⟦…⟧"
    for i in chosen:
        row = train[i]
        sides = [("", row["input_ids"], row["labels"])]
        if "rejected_input_ids" in row:  # a preference pair: both sides, scored tokens marked
            sides = [
                (" chosen", row["input_ids"], row["labels"]),
                (" rejected", row["rejected_input_ids"], row["rejected_labels"]),
            ]
        for side, ids, labels in sides:
            with_loss = sum(1 for x in labels if x != IGNORE_INDEX)
            what = "scored" if side else "with loss"
            row_name = "pair" if side else "sample"
            stream.write(f"── {row_name} {i}{side}: {len(ids)} tokens, {with_loss} {what} ({marker}) ──\n")
            stream.write(render_sample(tokenizer, ids, labels, color) + "\n\n")
    stream.write(
        f"{r.unit}: {r.samples}  tokens: {r.tokens}  with loss: {r.loss_share:.1%}  "
        f"truncated: {r.truncated}  dropped: {r.dropped_total}  skipped bad records: {r.skipped}\n"
    )
    stream.write(r.summary() + "\n")

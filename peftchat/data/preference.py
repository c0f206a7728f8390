"""Preference pairs (chosen / rejected replies to one prompt) for `training.objective` dpo, orpo, simpo.

Record shapes (`data.format: preference`, or `auto`: any record with `chosen` and `rejected`):

* TRL's standard form: ``{"prompt": "text", "chosen": "text", "rejected": "text"}``;
* TRL's conversational form: ``{"prompt": [messages], "chosen": [assistant message],
  "rejected": [assistant message]}``, or without ``prompt`` (TRL's implicit prompt):
  ``{"chosen": [whole conversation], "rejected": [whole conversation]}``, the two sharing every
  message but the last;
* ShareGPT / LLaMA-Factory: ``{"conversations": [{from, value}], "chosen": {"from": "gpt", "value"},
  "rejected": {...}, "system"?}``; also ``{"messages": [...], "chosen": ..., "rejected": ...}``.

Each side becomes a whole `Conversation` (prompt + that reply; the record shapes are read by
`data.readers.pair_sides`) through the record normalizers SFT uses (role maps, turn-order checks), and is encoded by the recipe's
conversation format (`data.collator`: chatglm rounds, MOSS with its meta instruction, chat
templates) with the loss on the last answer only, so a pair's prompt is token for token what
`peftchat chat` puts in front of a reply. Hand-written rather than TRL's tokenization because
TRL knows chat templates only, not ChatGLM's rounds or MOSS's markup.

Lengths (`sample_limit`, e.g. `data.max_length`): a pair that does not fit loses its oldest
history rounds first (the current question stays), the same rounds for both sides, so chosen
and rejected always share one prompt; if the bare question still leaves no room, both replies
are cut to what is left, and a question that alone fills the limit drops the pair (counted).
Pairs whose replies are identical or empty are dropped and counted in the data report.

Under `training.objective: sft` a preference record trains its chosen reply (`data.readers`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, cast

from peftchat.config import DataConfig, Recipe
from peftchat.data.batching import Batches, MicroBatch, collate, loss_targets
from peftchat.data.readers import normalize, pair_sides
from peftchat.errors import DataError
from peftchat.formats.base import ConversationFormat, fewest_to_drop
from peftchat.formats.conversation import Conversation
from peftchat.formats.samples import IGNORE_INDEX, Encoded, Sample

PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")
IDENTICAL = "identical chosen and rejected replies"
EMPTY = "empty chosen or rejected reply"
PROMPT_TOO_LONG = "prompt alone fills the length limit"
PROMPTS_DIFFER = "chosen and rejected prompts tokenize differently"
REJECTED_COLUMNS = ("rejected_input_ids", "rejected_labels")


def is_preference(recipe: Recipe) -> bool:
    return recipe.training.objective in PREFERENCE_OBJECTIVES


# ------------------------------------------------------------------------------ records


def normalize_pair(record: dict[str, Any], cfg: DataConfig, origin: str) -> tuple[Conversation, Conversation]:
    """(chosen conversation, rejected conversation) of one preference record; DataError when bad."""
    fmt, chosen, rejected = pair_sides(record, origin)
    return normalize(chosen, fmt, cfg, origin), normalize(rejected, fmt, cfg, origin + " (rejected)")


# ------------------------------------------------------------------------------ encoding


def _last_answer(conv: Conversation) -> str:
    return (conv.messages[-1].get("content") or "").strip() if conv.messages else ""


def _scored_from(labels: list[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))


class PairEncoder:
    """Encodes the two sides of a pair with one conversation format, the loss on the last answer."""

    def __init__(self, cfg: DataConfig, tokenizer, limit: int) -> None:
        from peftchat.formats import registry

        self.limit = limit
        big = 1 << 30  # lengths are cut here (`encode`), so the format must not cut on its own
        loose = dataclasses.replace(
            cfg,
            loss_on="last_assistant",
            max_length=big,
            max_source_length=big,
            max_target_length=big,
            truncation="drop_oldest",
        )
        self.fmt: ConversationFormat = registry.make_format(loose, tokenizer)

    def _side(self, conv: Conversation, drop: int) -> Optional[tuple[list[int], list[int], list[int]]]:
        """(prompt ids, reply ids, reply labels) of one side with `drop` oldest rounds left out."""
        conv = conv.without_oldest_rounds(drop)
        rounds = len(conv.round_starts())
        conv = dataclasses.replace(conv, context_rounds=max(rounds - 1, 0))  # chatglm: the last round only
        encoded = self.fmt.encode(conv)
        if not encoded.samples:
            return None
        sample = encoded.samples[-1]
        k = _scored_from(sample.labels)
        return sample.input_ids[:k], sample.input_ids[k:], sample.labels[k:]

    def encode(self, chosen: Conversation, rejected: Conversation) -> Encoded:
        """One pair as a Sample (chosen) with the rejected side in `rejected_*`; or a drop reason."""
        reason = chosen.dropped or rejected.dropped
        if reason:
            return Encoded(dropped=[reason])
        a, b = _last_answer(chosen), _last_answer(rejected)
        if not a or not b:
            return Encoded(dropped=[EMPTY])
        if a == b:
            return Encoded(dropped=[IDENTICAL])
        history = max(len(chosen.round_starts()) - 1, 0)
        sides: dict[int, Any] = {}

        def fits(drop: int) -> bool:
            sides[drop] = (self._side(chosen, drop), self._side(rejected, drop))
            c, r = sides[drop]
            return c is not None and r is not None and len(c[0]) + max(len(c[1]), len(r[1])) <= self.limit

        drop = fewest_to_drop(history, fits)
        c, r = sides[history if drop is None else drop]
        if c is None or r is None:
            return Encoded(dropped=["no reply to score"])
        if c[0] != r[0]:
            return Encoded(dropped=[PROMPTS_DIFFER])
        room = self.limit - len(c[0])
        if room < 1:
            return Encoded(dropped=[PROMPT_TOO_LONG])
        truncated = bool(drop) or drop is None
        out = Sample(c[0] + c[1][:room], [IGNORE_INDEX] * len(c[0]) + c[2][:room], truncated)
        sample = PairSample(
            out.input_ids,
            out.labels,
            truncated,
            rejected_input_ids=r[0] + r[1][:room],
            rejected_labels=[IGNORE_INDEX] * len(r[0]) + r[2][:room],
        )
        return Encoded(samples=[sample])


@dataclasses.dataclass
class PairSample(Sample):
    rejected_input_ids: list[int] = dataclasses.field(default_factory=list)
    rejected_labels: list[int] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------ batches


def collate_pairs(chosen: list[dict], rejected: list[dict], pad_id: int) -> dict[str, Any]:
    """One concatenated batch: rows 0..B-1 the chosen sides, B..2B-1 the rejected ones, padded to
    one width, so both go through one forward (as TRL's `concatenated_forward`)."""
    return collate([[s] for s in chosen + rejected], pad_id, packing=False)


def pair_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """The model inputs plus, per scored token, its flat position, target and row (`loss_rows`)."""
    positions, targets = loss_targets(batch["labels"])
    rows = positions // batch["labels"].shape[1]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "loss_positions": positions,
        "loss_targets": targets,
        "loss_rows": rows,
    }


class PairBatches(Batches):
    """`Batches` of preference pairs: a planned row is a pair, a micro-batch its concatenated
    chosen + rejected batch, and its `label_tokens` the number of pairs (the loss is a mean per pair).
    `reference`: the pairs' precomputed reference log-probs ([n, 2], `peftchat.train.preference`)."""

    def __init__(self, dataset, **kwargs) -> None:
        self.pairs = dataset.select_columns(["input_ids", "labels", *REJECTED_COLUMNS])
        super().__init__(dataset, **kwargs)
        rejected = self.pairs.with_format("arrow")["rejected_input_ids"]
        import pyarrow.compute as pc

        # length-grouping key: the longer side, which sets the padded width of the pair's rows
        self.lengths = [max(a, b) for a, b in zip(self.lengths, pc.list_value_length(rejected).to_pylist())]
        self.reference = None

    def micro_batch(self, rows: list[list[int]]) -> MicroBatch:
        flat = [i for row in rows for i in row]
        got = self.pairs[flat]
        chosen = [{"input_ids": a, "labels": b} for a, b in zip(got["input_ids"], got["labels"])]
        rejected = [{"input_ids": a, "labels": b} for a, b in zip(got["rejected_input_ids"], got["rejected_labels"])]
        import torch

        tensors = pair_tensors(collate_pairs(chosen, rejected, self.pad_id))
        tensors["pair_index"] = torch.tensor(flat, dtype=torch.long)
        if self.reference is not None:
            tensors["reference_logps"] = self.reference[tensors["pair_index"]]
        tokens = sum(len(s["input_ids"]) for s in chosen + rejected)
        return MicroBatch(tensors, len(flat), tokens)


class PairRows:
    """The tokenizing map of a preference split (`pipeline._encode_split`): raw records -> one row
    per pair (chosen `input_ids`/`labels`, `rejected_*`), or a note row (drop, skipped record)."""

    def __init__(self, cfg: DataConfig, tokenizer, rows: list[int] | None, limit: int) -> None:
        self.cfg, self.rows = cfg, rows
        self.encoder = PairEncoder(cfg, tokenizer, limit)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from peftchat.data.report import DROP, skip_note

        names = ("input_ids", "labels", *REJECTED_COLUMNS, "session", "truncated", "note")
        out: dict[str, list] = {k: [] for k in names}

        def row(session: int, note: str, sample: Optional[PairSample] = None) -> None:
            values = (
                (
                    sample.input_ids,
                    sample.labels,
                    sample.rejected_input_ids,
                    sample.rejected_labels,
                    session,
                    sample.truncated,
                    note,
                )
                if sample
                else ([], [], [], [], session, False, note)
            )
            for k, v in zip(names, values):
                out[k].append(v)

        for j, index in enumerate(indices):
            session = self.rows[index] if self.rows is not None else index
            origin, fmt = batch["origin"][j], batch["format"][j]
            try:
                if fmt != "preference":
                    raise DataError(
                        f"{origin}: training.objective dpo, orpo and simpo train on preference pairs "
                        f"(records with 'chosen' and 'rejected'); this is a {fmt} record"
                    )
                encoded = self.encoder.encode(*normalize_pair(json.loads(batch["record"][j]), self.cfg, origin))
            except DataError as e:
                if self.cfg.on_error == "stop":
                    raise
                row(session, skip_note(str(e), getattr(e, "reason", None)))
                continue
            for sample in encoded.samples:
                row(session, "", cast(PairSample, sample))  # PairEncoder.encode makes PairSamples
            for reason in encoded.dropped:
                row(session, DROP + reason)
        return out


def pair_features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features(
        {
            "input_ids": ids,
            "labels": ids,
            "rejected_input_ids": ids,
            "rejected_labels": ids,
            "session": datasets.Value("int64"),
            "truncated": datasets.Value("bool"),
            "note": datasets.Value("string"),
        }
    )

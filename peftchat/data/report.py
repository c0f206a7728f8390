"""`DataReport`: what the data pipeline made of the records, and what it had to cut or leave out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Notes the tokenizing map writes next to each output row (see pipeline._encode_batch).
DROP = "drop:"
LEFT_OUT = "left-out:"  # a part of a conversation its format has no place for (samples still made)
SKIP = "skip:"
REASON_SEP = "\x1f"  # in a SKIP note, between a counted reason (a turn-order rule) and the message


def skip_note(message: str, reason: str | None = None) -> str:
    return SKIP + (f"{reason}{REASON_SEP}" if reason else "") + message


MAX_EXAMPLES = 5


@dataclass
class SourceCounts:
    """What one entry of data.train / data.eval contributed to a split."""

    name: str
    format: str
    weight: float = 1.0
    sessions: int = 0  # distinct records that gave samples (a weight-2 record counts once)
    samples: int = 0  # with the weight's copies
    skipped: int = 0  # bad records left out with data.on_error=skip

    def line(self, unit: str = "samples") -> str:
        weight = f", weight {self.weight:g}" if self.weight != 1 else ""
        skipped = f", {self.skipped} bad records skipped" if self.skipped else ""
        return (
            f"  source {self.name} ({self.format or '-'}{weight}): {self.sessions} sessions -> "
            f"{self.samples} {unit}{skipped}"
        )


@dataclass
class DataReport:
    split: str = "train"
    unit: str = "samples"  # what a row is: "pairs" for preference data (chosen and rejected)
    sessions: int = 0  # records that were well-formed conversations (or chatglm rows)
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0  # samples that lost tokens, turns or history rounds to the length limits
    longest: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> would-be samples left out
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> conversation parts not used
    skipped: int = 0  # bad records left out with data.on_error=skip
    skipped_examples: list[str] = field(default_factory=list)
    skipped_reasons: dict[str, int] = field(default_factory=dict)  # turn-order rule -> records skipped
    sources: list[SourceCounts] = field(default_factory=list)
    eval: DataReport | None = None

    @property
    def loss_share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def add_skipped(self, messages: list[str]) -> None:
        """Count skipped records; a message may start with its reason (`skip_note`)."""
        reasons = Counter(m.split(REASON_SEP, 1)[0] for m in messages if REASON_SEP in m)
        for reason, n in reasons.items():
            self.skipped_reasons[reason] = self.skipped_reasons.get(reason, 0) + n
        messages = [m.split(REASON_SEP, 1)[-1] for m in messages]
        self.skipped += len(messages)
        room = MAX_EXAMPLES - len(self.skipped_examples)
        self.skipped_examples += messages[: max(room, 0)]

    def add_rejected(self, notes: list[str], lengths: list[int], loss_tokens: int) -> None:
        """Preference data: count the kept pairs' rejected rows too (tokens, scored tokens, longest
        row) and call the rows pairs."""
        self.unit = "pairs"
        kept = [n for note, n in zip(notes, lengths) if note == ""]
        self.tokens += sum(kept)
        self.loss_tokens += loss_tokens
        self.longest = max([self.longest, *kept])

    @classmethod
    def from_columns(
        cls,
        split: str,
        sessions: list[int],
        notes: list[str],
        truncated: list[bool],
        lengths: list[int],
        loss_tokens: int,
    ) -> DataReport:
        """Count the output rows of the tokenizing map: samples have an empty note, the rest a
        DROP, LEFT_OUT or SKIP note with their reason."""
        report = cls(split=split)
        drops: Counter[str] = Counter()
        left: Counter[str] = Counter()
        skips: list[str] = []
        kept_sessions: set[int] = set()
        for session, note, cut, n in zip(sessions, notes, truncated, lengths):
            if note.startswith(SKIP):
                skips.append(note[len(SKIP) :])
                continue
            kept_sessions.add(session)
            if note.startswith(DROP):
                drops[note[len(DROP) :]] += 1
            elif note.startswith(LEFT_OUT):
                left[note[len(LEFT_OUT) :]] += 1
            else:
                report.samples += 1
                report.tokens += n
                report.truncated += bool(cut)
                report.longest = max(report.longest, n)
        report.sessions = len(kept_sessions)
        report.loss_tokens = loss_tokens
        report.dropped = dict(sorted(drops.items()))
        report.left_out = dict(sorted(left.items()))
        report.add_skipped(skips)
        return report

    def count_sources(
        self, sources: list[tuple[str, str, float, int]], row_sources: list[int], sessions: list[int], notes: list[str]
    ) -> None:
        """Per-source counts. `sources`: (name, format, weight, lines skipped while reading) per
        entry; the other lists run over the tokenizing map's output rows."""
        self.sources = [SourceCounts(name, fmt, weight, skipped=bad) for name, fmt, weight, bad in sources]
        seen: set[int] = set()
        for source, session, note in zip(row_sources, sessions, notes):
            counts = self.sources[source]
            if note.startswith(SKIP):
                counts.skipped += session not in seen
                seen.add(session)
                continue
            counts.samples += note == ""
            counts.sessions += session not in seen
            seen.add(session)

    def summary(self) -> str:
        """A few human-readable lines (train first, then eval when there is one)."""
        lines = [
            f"{self.split}: {self.sessions} sessions -> {self.samples} {self.unit}, {self.tokens} tokens "
            f"({self.loss_tokens} with loss, {self.loss_share:.1%}), longest {self.longest}, "
            f"{self.truncated} truncated, {self.dropped_total} dropped, {self.skipped} bad records skipped"
        ]
        if len(self.sources) > 1 or any(c.weight != 1 for c in self.sources):
            lines += [c.line(self.unit) for c in self.sources]
        for reason, n in self.dropped.items():
            unit = self.unit[:-1] if n == 1 else self.unit  # "1 pair", "1 sample"
            lines.append(f"  dropped {n} {unit}: {reason}")
        for reason, n in self.left_out.items():
            lines.append(f"  left out {n}: {reason}")
        for reason, n in sorted(self.skipped_reasons.items()):
            lines.append(f"  skipped {n}: {reason}")
        for message in self.skipped_examples:
            lines.append(f"  skipped: {message}")
        if self.skipped > len(self.skipped_examples):
            lines.append(f"  … and {self.skipped - len(self.skipped_examples)} more bad records")
        if self.eval is not None:
            lines.append(self.eval.summary())
        return "\n".join(lines)

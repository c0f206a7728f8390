"""`training_summary.json`: what a finished run did, in one object (across resumes)."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass

from peftchat.train.metrics import last_row_value, peak_memory_gb, perplexity
from peftchat.train.run import Run


def summary(run: Run) -> dict:
    state, out = run.state, run.out
    memory, memory_kind = peak_memory_gb(run.device)
    eval_loss = last_row_value(out, "eval_loss")
    return {
        "steps": state.step,
        "epochs": round(state.epoch + state.batch_index / max(len(run.train.plan(state.epoch)), 1), 4),
        "tokens": state.tokens,
        "label_tokens": state.label_tokens,
        "train_time_s": round(state.train_time_s, 3),  # all sessions of a resumed run; eval and saving excluded
        "tokens_per_s": round(state.tokens / state.train_time_s, 2) if state.train_time_s > 0 else None,
        "first_loss": last_row_value(out, "loss", first=True),  # from metrics.jsonl: the run's, across resumes
        "final_loss": last_row_value(out, "loss"),
        "eval_loss": eval_loss,
        "eval_ppl": perplexity(eval_loss) if eval_loss is not None else None,
        "peak_memory_gb": round(memory, 3),
        "memory_kind": memory_kind,
        "trainable_params": run.params_count[0],
        "total_params": run.params_count[1],
        "nan_skipped": state.nan_skipped,
        "resumed_from": str(run.resumed_from) if run.resumed_from is not None else None,
        "data": report_counts(run.data_report),
    }


def report_counts(report) -> dict:
    """The data report's plain fields (counts, names) for the summary, whatever its class."""
    plain = is_dataclass(report) and not isinstance(report, type)  # an instance, as asdict needs
    fields = asdict(report) if plain else dict(getattr(report, "__dict__", {}))
    out = {}
    for key, value in fields.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def done_line(run: Run, result: dict) -> str:
    """The last line `peftchat train` prints."""

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return (
        f"done: {run.state.step} steps, loss {fmt(result['first_loss'])} -> {fmt(result['final_loss'])}, "
        f"eval loss {fmt(result['eval_loss'])}; adapter in {run.out}"
    )

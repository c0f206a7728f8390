"""check_fp8's quality runs pooled by kind: each kind's mean final train and eval loss, its
run-to-run spread, and its mean against the reference kind's.

Why pooled: round 10 (benchmarks/RESULTS.md) trained the 1B shape six times in bf16 from the same
initialisation and data, 300 steps each, and the final train loss ranged over 4.0 % of its mean (0.603 to 0.628)
(GPU kernels sum in a different order from run to run, and training carries the difference on).
One bf16 run against one FP8 run, as round 9 compared them, measures that spread as much as FP8.

A run's kind is its label up to any '#' (`--quality-repeats` names the repeats "fp8#2", ...).

    python -m benchmarks.quality_stats benchmarks/results/checks/quality_r10/*.json --out /tmp/stats.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable


def kind_of(label: str) -> str:
    return label.partition("#")[0]


def runs_by_kind(entry: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{kind: [run results]} of one check_fp8 quality entry, in its run order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for label in entry.get("runs", []):
        if label in entry:  # a run cut short by a timeout has no entry
            out.setdefault(kind_of(label), []).append(entry[label])
    return out


def pooled_runs(reports: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{"SHAPE:STEPS:SETTING@dropout D": {kind: [run results]}} over check_fp8 reports' quality entries."""
    pooled: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for report in reports:
        for entry in report.get("quality", []):
            key = f"{entry['shape']}:{entry['steps']}:{entry['setting']}@dropout {entry.get('dropout')}"
            for kind, runs in runs_by_kind(entry).items():
                pooled.setdefault(key, {}).setdefault(kind, []).extend(runs)
    return pooled


def _describe(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {"mean": mean, "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "spread_rel": (max(values) - min(values)) / mean}


def _mean_diff(stats: dict[str, float], n: int, ref: dict[str, float], ref_n: int) -> dict[str, float | None]:
    """Signed relative distance of the means and its standard error (Welch's, both relative to the
    reference mean; None unless both kinds have 2+ runs): how far apart, and how sure."""
    se = ((stats["stdev"] ** 2 / n + ref["stdev"] ** 2 / ref_n) ** 0.5 / ref["mean"]
          if n > 1 and ref_n > 1 else None)
    return {"rel_diff": stats["mean"] / ref["mean"] - 1, "rel_diff_se": se}


def summarize(runs_by_kind: dict[str, list[dict[str, Any]]], reference: str) -> dict[str, Any]:
    """Per kind: n, train and eval loss statistics, and its means' signed relative distance from
    the reference kind's means, with its standard error."""
    out: dict[str, Any] = {}
    for kind, runs in runs_by_kind.items():
        train = [r["final_train_loss"] for r in runs]
        evals = [r["eval_loss_bf16_path"] for r in runs if r.get("eval_loss_bf16_path") is not None]
        out[kind] = {"n": len(runs), "train_loss": _describe(train), "eval_loss": _describe(evals) if evals else None}
    ref = out.get(reference)
    for kind, stats in out.items():
        if ref is None:
            break
        diff = _mean_diff(stats["train_loss"], stats["n"], ref["train_loss"], ref["n"])
        stats["train_mean_rel_diff"], stats["train_mean_rel_diff_se"] = diff["rel_diff"], diff["rel_diff_se"]
        if stats["eval_loss"] and ref["eval_loss"]:  # eval runs count as the train runs do (one per run)
            diff = _mean_diff(stats["eval_loss"], stats["n"], ref["eval_loss"], ref["n"])
            stats["eval_mean_rel_diff"], stats["eval_mean_rel_diff_se"] = diff["rel_diff"], diff["rel_diff_se"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="check_fp8.json files")
    p.add_argument("--reference", default="bf16", help="the kind the others are measured against")
    p.add_argument("--out", default="", help="also write the summary (JSON) here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    reports = [json.loads(Path(f).read_text()) for f in args.reports]
    summary = {key: summarize(kinds, args.reference) for key, kinds in pooled_runs(reports).items()}
    summary_text = json.dumps({"reports": args.reports, "reference": args.reference, "summary": summary}, indent=1)
    print(summary_text)
    if args.out:
        Path(args.out).write_text(summary_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

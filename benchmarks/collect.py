"""Merge several bench runs (each a results.json) into one table.

Each measured row keeps the run it came from; its ratios are against the tuned peer of the same
shape and mode measured in *that* run when there is one, else in the latest run that has one
(noted in the row). A later run's row replaces an earlier one of the same shape/mode/variant.

    python -m benchmarks collect benchmarks/results/r1 benchmarks/results/r2 ... --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench import REFERENCE, _fmt  # noqa: E402
from benchmarks.shapes import flops_per_token, shape_dict  # noqa: E402


def load_runs(dirs: list[str]) -> list[tuple[str, dict]]:
    runs = []
    for d in dirs:
        for f in sorted(Path(d).glob("**/results.json")):
            runs.append((str(f.parent.relative_to(Path(d).parent)), json.loads(f.read_text())))
    return runs


def merge(runs: list[tuple[str, dict]]) -> dict:
    rows: dict[tuple, dict] = {}
    ceilings = {}
    for run_id, doc in runs:
        if doc["meta"].get("ceiling_tflops"):
            ceilings[run_id] = doc["meta"]["ceiling_tflops"]
        for r in doc["rows"]:
            if not r.get("tokens_per_s"):
                continue
            rows[(r["shape"], r["mode"], r["variant"])] = {**r, "run": run_id}
    out = []
    for (shape, mode, variant), r in rows.items():
        ref_run = [x for x in runs if x[0] == r["run"]][0][1]
        ref = next((x for x in ref_run["rows"] if x["variant"] == REFERENCE and x["shape"] == shape
                    and x["mode"] == mode and x.get("tokens_per_s")), None)
        ref_note = ""
        if ref is None:
            ref = rows.get((shape, mode, REFERENCE))
            ref_note = f"ratios vs tuned peer of {ref['run']}" if ref else ""
        ceiling = ceilings.get(r["run"]) or (list(ceilings.values())[-1] if ceilings else None)
        cfg = shape_dict(shape)
        r = dict(r)
        r["model_tflops"] = flops_per_token(cfg, r["seq"]) * r["tokens_per_s"] / 1e12
        r["ceiling_tflops"] = ceiling
        r["pct_ceiling"] = 100 * r["model_tflops"] / ceiling if ceiling else None
        if ceiling and r["run"] not in ceilings:
            ref_note = (ref_note + "; " if ref_note else "") + "ceiling of another run"
        if ref:
            r["speed_vs_tuned"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["peak_vs_tuned"] = r["peak_alloc_gib"] / ref["peak_alloc_gib"] if r.get("peak_alloc_gib") else None
        r["ref_note"] = ref_note
        out.append(r)
    order = {"8b": 0, "1b": 1}, {"nf4": 0, "int8": 1, "bf16": 2}
    out.sort(key=lambda r: (order[0].get(r["shape"], 9), order[1].get(r["mode"], 9), r["variant"]))
    return {"ceilings": ceilings, "rows": out}


def _overrides(r: dict) -> str:
    """What a peftchat row set on top of the recipe defaults (names of a setting changed over the
    runs, so the table shows the overrides each row actually ran with)."""
    if "overrides" in r:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()) or "-"
    return "-"


def markdown(doc: dict) -> str:
    lines = ["| shape | mode | variant | tok/s | step s | peak alloc GiB | peak reserved GiB | model TFLOP/s | % ceiling "
             "| vs tuned: speed | vs tuned: peak | run | recipe overrides (peftchat) / options | applied |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in doc["rows"]:
        note = ", ".join(r.get("applied") or []) + (f" ({r['ref_note']})" if r.get("ref_note") else "")
        lines.append("| " + " | ".join([
            r["shape"], r["mode"], r["variant"], _fmt(r["tokens_per_s"], 0), _fmt(r["step_s_median"], 3),
            _fmt(r.get("peak_alloc_gib")), _fmt(r.get("peak_reserved_gib")), _fmt(r["model_tflops"], 0),
            _fmt(r.get("pct_ceiling")), _fmt(r.get("speed_vs_tuned"), 2), _fmt(r.get("peak_vs_tuned"), 2),
            r["run"], _overrides(r), note.replace("|", "/")]) + " |")
    return "\n".join(lines) + "\n"


def concat(runs: list[tuple[str, dict]]) -> tuple[dict, str]:
    """Every row of every run as measured, ratios and loss gate from its own run (bench.py computes
    them in-run), no row replaced; the table is one section per run."""
    from benchmarks.bench import markdown as run_markdown

    rows = [{**r, "run": r.get("run") or run_id} for run_id, doc in runs for r in doc["rows"]]
    doc = {"runs": {run_id: d["meta"] for run_id, d in runs}, "rows": rows}
    text = "\n".join(f"## {run_id}\n\n" + run_markdown(d) for run_id, d in runs)
    return doc, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="run dirs (searched for results.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--concat", action="store_true", help="keep every row with its own run's ratios (bench.py rows)")
    args = p.parse_args(argv)
    if args.concat:
        doc, text = concat(load_runs(args.runs))
        out = Path(args.out)
        (out / "results.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        (out / "results.md").write_text(text, encoding="utf-8")
        print(text)
        return 0
    doc = merge(load_runs(args.runs))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    (out / "results.md").write_text(markdown(doc), encoding="utf-8")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

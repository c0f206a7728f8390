"""Merge several bench runs (each a results.json) into one `results.json` / `results.md`: every row
of every run as measured, its ratios and loss gate from its own run (bench.py computes them in
the run), no row replaced; the table is one section per run.

    python -m benchmarks collect benchmarks/results/r1 benchmarks/results/r2 ... --out benchmarks/results

(Rounds 1-2 merged the latest row per shape/mode/variant with ratios across runs; ratios within one
run are the only ones RESULTS.md quotes since, so that mode was deleted.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_runs(dirs: list[str]) -> list[tuple[str, dict]]:
    runs = []
    for d in dirs:
        for f in sorted(Path(d).glob("**/results.json")):
            runs.append((str(f.parent.relative_to(Path(d).parent)), json.loads(f.read_text())))
    return runs


def concat(runs: list[tuple[str, dict]]) -> tuple[dict, str]:
    from benchmarks.bench import markdown as run_markdown

    rows = [{**r, "run": r.get("run") or run_id} for run_id, doc in runs for r in doc["rows"]]
    doc = {"runs": {run_id: d["meta"] for run_id, d in runs}, "rows": rows}
    text = "\n".join(f"## {run_id}\n\n" + run_markdown(d) for run_id, d in runs)
    return doc, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks collect")
    p.add_argument("runs", nargs="+", help="run dirs (searched for results.json)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    doc, text = concat(load_runs(args.runs))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

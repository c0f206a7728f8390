"""`python -m benchmarks real-data`: the real-chat scenarios' sessions, built once from public data.

`real-moss` is the MOSS project's own SFT sessions (GitHub OpenLMLab/MOSS, `SFT_data/conversations/`:
1,120 sessions with and without plugins, the records `peftchat`'s `moss` reader takes as they are),
written to one JSONL in path order, so every variant trains on the same sessions in the same order.
Through the moss collator and the shipped tokenizer they are long (measured-facts: median ~1,525
tokens), which is what makes padding and packing matter.

The data is not in this repository (8 MB); build it where the MOSS repository is checked out and
carry the out dir to the GPU (`.whl/realdata`, ignored by git, travels with `carry: [".whl"]`):

    git -C MOSS archive HEAD SFT_data | tar -x -C /tmp/moss
    python -m benchmarks real-data --moss /tmp/moss/SFT_data --out .whl/realdata
    python -m benchmarks bench --scenarios real-moss --real-data .whl/realdata ...

A ShareGPT-style set (`real-sharegpt` in issue 33) is not built: no real multi-turn ShareGPT file
was found outside git-LFS in the stored repositories (LLaMA-Factory's sharegpt_zh_27k.json and
lima.json are LFS pointers).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

MOSS_FILE = "moss_sft.jsonl"
MANIFEST = "manifest.json"
# The scenarios whose sessions come from files of this builder: file, data.format, data.collator.
SCENARIOS = {"real-moss": (MOSS_FILE, "moss", "moss")}


def moss_sessions(root: Path) -> list[dict[str, Any]]:
    """Every MOSS session record under `root` (JSON files holding `chat`), in sorted path order."""
    sessions = []
    for path in sorted(root.rglob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and isinstance(record.get("chat"), dict):
            sessions.append(record)
    return sessions


def session_lengths(path: Path, fmt: str, collator: str, max_length: int = 8192) -> list[int]:
    """Token lengths of the file's samples through peftchat's pipeline and the shipped tokenizer."""
    from peftchat.config import recipe_from_dict
    from peftchat.data.pipeline import build_datasets
    from peftchat.demo_assets import demo_tokenizer_dir
    from peftchat.model.tokenizer import load_tokenizer

    recipe = recipe_from_dict(
        {
            "model": {"path": str(path.parent), "tokenizer": str(demo_tokenizer_dir())},
            "data": {
                "train": str(path),
                "format": fmt,
                "collator": collator,
                "max_length": max_length,
                "shuffle": False,
            },
        }
    )
    return [len(ids) for ids in build_datasets(recipe, load_tokenizer(recipe), split_eval=False).train["input_ids"]]


def build(moss_root: Path, out: Path, source: str = "") -> dict[str, Any]:
    """Write the real-moss sessions file and a manifest (counts and token lengths) into `out`."""
    sessions = moss_sessions(moss_root)
    if not sessions:
        raise SystemExit(f"real-data: no MOSS session (a JSON object with 'chat') under {moss_root}")
    out.mkdir(parents=True, exist_ok=True)
    target = out / MOSS_FILE
    with open(target, "w", encoding="utf-8") as f:
        for record in sessions:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    lengths = sorted(session_lengths(target, "moss", "moss"))
    manifest = {
        "real-moss": {
            "file": MOSS_FILE,
            "source": source or str(moss_root),
            "sessions": len(sessions),
            "max_length": 8192,
            "samples": len(lengths),
            "tokens_median": statistics.median(lengths),
            "tokens_p90": lengths[int(0.9 * (len(lengths) - 1))],
            "tokens_max": lengths[-1],
        }
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def scenario_data(scenario: str, real_data: str) -> dict[str, str]:
    """The spec fields of a real-data scenario: its sessions file and how peftchat reads it."""
    name, fmt, collator = SCENARIOS[scenario]
    path = Path(real_data or ".") / name
    if not path.is_file():
        raise ValueError(
            f"scenario {scenario}: {path} is missing; build it with `python -m benchmarks real-data` "
            f"and pass its --out as --real-data"
        )
    return {"sessions_file": str(path), "sessions_format": fmt, "sessions_collator": collator}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--moss", required=True, help="MOSS's SFT_data dir (or any dir of its session JSON files)")
    p.add_argument("--source", default="", help="what to record as the source (e.g. repo@commit)")
    p.add_argument("--out", required=True, help="output dir (e.g. .whl/realdata)")
    args = p.parse_args(argv)
    print(json.dumps(build(Path(args.moss), Path(args.out), args.source), indent=2))
    return 0

"""`python -m benchmarks real-data`: the real-chat scenarios' sessions, built once from public data.

`real-moss`: the MOSS project's own SFT sessions (GitHub OpenLMLab/MOSS, `SFT_data/conversations/`,
1,120 sessions, read by the `moss` collator as they are). `real-sharegpt`: real ShareGPT sessions
(`{"conversations": [{from, value}]}`; GitHub shibing624/MedicalGPT `data/sft/sharegpt_zh_1K_format.jsonl`,
1,000 shared ChatGPT chats in Chinese; LLaMA-Factory's ShareGPT files are git-LFS pointers), read as
`sharegpt` through the chat_template collator. Each is one JSONL in source order, so every variant
trains on the same sessions in the same order; the manifest has counts and token lengths (shipped
tokenizer, max_length 8192). Not in this repository (12 MB): build where the sources are checked
out, carry the out dir (`.whl/realdata`, git-ignored, travels with `carry: [".whl"]`):

    git -C MOSS archive HEAD SFT_data | tar -x -C /tmp/moss
    python -m benchmarks real-data --moss /tmp/moss/SFT_data --sharegpt sharegpt.jsonl --out .whl/realdata
    python -m benchmarks bench --scenarios real-moss,real-sharegpt --real-data .whl/realdata ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

MOSS_FILE = "moss_sft.jsonl"
SHAREGPT_FILE = "sharegpt.jsonl"
MANIFEST = "manifest.json"
# The scenarios whose sessions come from files of this builder: file, data.format, data.collator.
SCENARIOS = {"real-moss": (MOSS_FILE, "moss", "moss"), "real-sharegpt": (SHAREGPT_FILE, "sharegpt", "chat_template")}


def _records(path: Path) -> list[Any]:
    """A file's records: one JSON value (a list is its items) or JSON lines."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return value if isinstance(value, list) else [value]


def moss_sessions(root: Path) -> list[dict[str, Any]]:
    """Every MOSS session record under `root` (a dir of JSON files, sorted path order, or one file)."""
    paths = sorted(root.rglob("*.json")) if root.is_dir() else [root]
    return [r for path in paths for r in _records(path) if isinstance(r, dict) and isinstance(r.get("chat"), dict)]


def _turn_ok(i: int, turn: Any) -> bool:
    role = ("human", "gpt")[i % 2]
    return isinstance(turn, dict) and turn.get("from") == role and bool(str(turn.get("value") or "").strip())


def sharegpt_sessions(path: Path) -> list[dict[str, Any]]:
    """The file's ShareGPT conversations in file order, as peftchat's reader takes them: a trailing
    unanswered human turn is cut (real exports stop mid-chat; it carries no label), and one whose
    rounds do not alternate human/gpt with text is left out (the manifest counts what is kept)."""
    sessions = []
    for r in (r for r in _records(path) if isinstance(r, dict) and isinstance(r.get("conversations"), list)):
        turns = r["conversations"][: len(r["conversations"]) // 2 * 2]
        if turns and all(_turn_ok(i, t) and isinstance(t["value"], str) for i, t in enumerate(turns)):
            sessions.append({"conversations": turns, **({"system": r["system"]} if "system" in r else {})})
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


def _write(out: Path, scenario: str, sessions: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """Write one scenario's sessions file; its manifest entry (counts, token lengths)."""
    name, fmt, collator = SCENARIOS[scenario]
    if not sessions:
        raise SystemExit(f"real-data: no {fmt} session in {source}")
    with open(out / name, "w", encoding="utf-8") as f:
        for record in sessions:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    lengths = sorted(session_lengths(out / name, fmt, collator))
    return {
        "file": name,
        "source": source,
        "sessions": len(sessions),
        "max_length": 8192,
        "samples": len(lengths),
        "tokens_median": statistics.median(lengths),
        "tokens_p90": lengths[int(0.9 * (len(lengths) - 1))],
        "tokens_max": lengths[-1],
    }


def build(
    moss_root: Path | None, out: Path, source: str = "", sharegpt: Path | None = None, sharegpt_source: str = ""
) -> dict[str, Any]:
    """Write the sessions files of the sources given and the manifest (other entries kept) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    if moss_root is not None:
        manifest["real-moss"] = _write(out, "real-moss", moss_sessions(moss_root), source or str(moss_root))
    if sharegpt is not None:
        sessions = sharegpt_sessions(sharegpt)
        manifest["real-sharegpt"] = _write(out, "real-sharegpt", sessions, sharegpt_source or str(sharegpt))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
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
    p.add_argument("--moss", help="MOSS's SFT_data dir (any dir of its session JSON files) or one JSON/JSONL file")
    p.add_argument("--source", default="", help="the MOSS source to record (e.g. repo@commit path)")
    p.add_argument("--sharegpt", help="a ShareGPT-style file (JSONL or JSON list of {conversations})")
    p.add_argument("--sharegpt-source", default="", help="the ShareGPT source to record")
    p.add_argument("--out", required=True, help="output dir (e.g. .whl/realdata)")
    args = p.parse_args(argv)
    if not (args.moss or args.sharegpt):
        p.error("give --moss, --sharegpt or both")
    moss, sharegpt = (Path(x) if x else None for x in (args.moss, args.sharegpt))
    print(json.dumps(build(moss, Path(args.out), args.source, sharegpt, args.sharegpt_source), indent=2))
    return 0

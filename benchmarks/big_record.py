"""Time and peak memory of reading data that holds one runaway record (docs/reliability.md §6).

    python -m benchmarks big-record [skip|stop] [MB]

Writes a JSON Lines file of two good messages records around one of MB megabytes (default 30),
builds the datasets of a chat_template recipe (max_length 128, demo tokenizer) and prints the
report, the seconds and the peak RSS (`resource.getrusage`) before and after the call.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """`[skip|stop] [MB]` (default: skip 30)."""
    argv = sys.argv[1:] if argv is None else argv
    on_error, megabytes = (argv[:1] or ["skip"])[0], int((argv[1:2] or [30])[0])
    from transformers import AutoTokenizer

    from peftchat.config import recipe_from_dict
    from peftchat.data.pipeline import build_datasets
    from peftchat.demo_assets import demo_tokenizer_dir

    d = Path(tempfile.mkdtemp())
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    big = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "word " * (megabytes * 200_000)},
                {"role": "assistant", "content": "ok"},
            ]
        }
    )
    (d / "t.jsonl").write_text(good + "\n" + big + "\n" + good + "\n", encoding="utf-8")
    recipe = recipe_from_dict(
        {
            "model": {"path": "unused", "tokenizer": str(demo_tokenizer_dir())},
            "data": {
                "train": str(d / "t.jsonl"),
                "format": "messages",
                "collator": "chat_template",
                "max_length": 128,
                "on_error": on_error,
                "cache_dir": str(d / "cache"),
            },
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    print(f"big line: {len(big):,} bytes")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        print(build_datasets(recipe, tokenizer).report.summary())
    except Exception as e:  # on_error=stop: the DataError is the expected outcome
        print(f"{type(e).__name__}: {e}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"seconds {time.perf_counter() - start:.1f}  peak RSS MiB: {before / 1024:.0f} before, {peak / 1024:.0f} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m benchmarks COMMAND [ARGS]`: the one entry point of peftchat's benchmarks.

    bench     throughput scenarios: peftchat's settings against the peers and unsloth (bench.py, worker.py)
    collect   merge runs' results.json into one table (collect.py)
    quality   FP8 against bf16 training quality, runs pooled by kind (quality.py)
    serve     `peftchat serve` under streaming clients (serve_bench.py)
    dpo       DPO steps: peftchat against TRL's DPOTrainer and unsloth's patched one (dpo_bench.py)
    checks    GPU checks: `peftchat train` + `merge --verify`, model families, torchrun (checks.py)
    big-record  reading data with one runaway record: time and peak RSS (big_record.py, docs/reliability.md)
    real-data   the real-chat scenarios' sessions from public data, built once (real_data.py)

`python -m benchmarks COMMAND --help` for each one's options; README.md says how to run them on
the GPU machine.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": "bench",
    "collect": "collect",
    "quality": "quality",
    "serve": "serve_bench",
    "dpo": "dpo_bench",
    "checks": "checks",
    "big-record": "big_record",
    "real-data": "real_data",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"benchmarks.{COMMANDS[argv[0]]}")
    sys.argv = [f"python -m benchmarks {argv[0]}", *argv[1:]]
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The serving benchmark's CPU smoke mode: the tiny model behind the real server, sequential and
batched rows with their metrics, and the JSON written; speed is not asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_serve_bench_tiny_writes_sequential_and_batched_rows(tmp_path):
    out = tmp_path / "serve.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "serve",
            "--tiny",
            "--modes",
            "fp32_merged",
            "--clients",
            "2",
            "--models-dir",
            str(tmp_path / "models"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["mode"], r["scheduling"], r["clients"]) for r in rows] == [
        ("fp32_merged", "sequential", 2),
        ("fp32_merged", "batched", 2),
    ]
    for r in rows:
        assert r["requests"] == 4 and r["output_tokens"] > 0 and r["agg_tok_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and r["itl_p50_s"] is not None
    assert set(doc["batched_over_sequential_tok_s"]) == {"fp32_merged@2"}

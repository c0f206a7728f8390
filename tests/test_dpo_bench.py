"""The DPO benchmark's CPU smoke: peftchat's and TRL's DPO on the tiny NF4 shape, the same pairs,
both through the loss gate; unsloth is skipped off CUDA with the reason. Speed is not asserted."""

import json
import math

import pytest

pytest.importorskip("trl")

from benchmarks import dpo_bench  # noqa: E402


def test_dpo_bench_tiny_rows_pass_the_loss_gate(tmp_path):
    from benchmarks.shapes import bench_model

    args = dpo_bench.parse_args(["--tiny", "--out", str(tmp_path / "dpo.json"), "--steps", "1"])
    spec = {
        "device": "cpu",
        "model_dir": str(bench_model("tiny", tmp_path / "models", "cpu")),
        "work_dir": str(tmp_path),
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "prompt_tokens": args.prompt_tokens,
        "reply_tokens": args.reply_tokens,
        "dtype": "fp32",
        "quantization": "4bit",
        "pairs": dpo_bench.make_pairs(args.batch * 2, args.prompt_tokens, args.reply_tokens),
    }
    rows = [dpo_bench.run_peftchat({**spec, "variant": "peftchat"}), dpo_bench.run_trl({**spec, "variant": "trl"})]
    for row in rows:
        assert row["pairs_per_s"] > 0 and len(row["losses"]) == 2
        assert row["losses"][0] == pytest.approx(math.log(2), abs=1e-3)
    gate = dpo_bench.loss_gate(rows)
    assert gate["peftchat"]["pass"] and gate["trl"]["pass"], gate
    assert not dpo_bench.loss_gate([{**rows[0]}, {**rows[1], "variant": "trl", "losses": [0.7, 5.0]}])["trl"]["pass"]
    assert dpo_bench.skip_reason("unsloth", "cpu")
    dpo_bench._write(args, rows + [{"variant": "unsloth", "skipped": "x"}], "tiny")
    assert json.loads((tmp_path / "dpo.json").read_text())["loss_gate"]["trl"]["pass"]

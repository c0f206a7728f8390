"""`peftchat train` through the CLI: the run's picture and the optional generation scores at each
evaluation (`training.eval_generate`, wired by the CLI because train may not import infer)."""

import json
from pathlib import Path

from peftchat.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_train_writes_curves_and_generation_scores_at_each_eval(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            str(RECIPES / "demo.yaml"),
            f"model.path={tiny_llama_dir}",
            f"training.output_dir={out}",
            "training.max_steps=4",
            "training.eval_steps=2",
            "data.eval_split=2",
            "training.eval_generate=2",
            "training.log_steps=1",
            "training.save_steps=0",
            "training.tensorboard=false",
            "decoding.max_new_tokens=4",
            "data.max_length=256",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval_generate_n"] == 2 and 0 <= r["eval_bleu-4"] <= 100 and 0 <= r["eval_rouge-l"] <= 100
    png = out / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

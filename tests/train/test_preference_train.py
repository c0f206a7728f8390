"""Preference training end to end on the CPU demo: recipes/demo_dpo.yaml raises the reward margin;
metrics reach metrics.jsonl and the curves; SFT -> DPO through adapter.init_from with the
precomputed reference cached in the run dir and reused on resume; the result merges."""

from __future__ import annotations

import json

import pytest

from peftchat.config import load_recipe
from peftchat.shipped_recipes import shipped_path
from peftchat.train.loop import train
from peftchat.train.preference import REFERENCE_FILE


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _demo(tiny_llama_dir, out, *overrides):
    return load_recipe(
        shipped_path("demo_dpo.yaml"),
        [f"model.path={tiny_llama_dir}", f"training.output_dir={out}", "training.tensorboard=false", *overrides],
    )


def test_demo_dpo_raises_the_margin(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    train(
        _demo(
            tiny_llama_dir,
            out,
            "training.max_steps=12",
            "training.eval_steps=0",
            "training.save_steps=0",
            "training.log_steps=4",
        )
    )
    rows = [r for r in _rows(out) if "loss" in r]
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy = reference
    assert rows[-1]["rewards/margin"] > rows[0]["rewards/margin"] + 0.1
    assert rows[-1]["rewards/accuracy"] > 0.5 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"]
    evals = [r for r in _rows(out) if "eval_loss" in r]
    assert evals and {"eval_rewards/margin", "eval_rewards/accuracy"} <= evals[-1].keys()
    assert "| margin " in capsys.readouterr().out
    assert (out / "complete").exists() and not (out / REFERENCE_FILE).exists()  # adapter-off reference: no cache


def test_sft_then_dpo_with_cached_reference_resumes_and_merges(tiny_llama_dir, tmp_path, capsys):
    from peftchat.merge import merge_adapter

    sft = tmp_path / "sft"
    train(
        load_recipe(
            shipped_path("demo.yaml"),
            [
                f"model.path={tiny_llama_dir}",
                f"training.output_dir={sft}",
                "training.max_steps=3",
                "training.eval_steps=0",
                "training.tensorboard=false",
                "data.eval_split=0",
            ],
        )
    )
    out = tmp_path / "dpo"
    first = _demo(
        tiny_llama_dir,
        out,
        f"adapter.init_from={sft}",
        "training.max_steps=2",
        "training.save_steps=2",
        "training.eval_steps=0",
    )
    train(first)
    said = capsys.readouterr().out
    assert "adapter initialized from" in said and "computed once" in said
    rows = [r for r in _rows(out) if "loss" in r]
    # the reference is the SFT adapter itself: at step 1 the policy equals it, so the margin is 0
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert (out / REFERENCE_FILE).is_file()
    train(
        _demo(
            tiny_llama_dir,
            out,
            f"adapter.init_from={sft}",
            "training.max_steps=4",
            "training.save_steps=2",
            "training.eval_steps=0",
            "training.resume=true",
        )
    )
    assert "reference log-probs: " in capsys.readouterr().out  # reused, not recomputed from the trained adapter
    assert max(r["step"] for r in _rows(out)) == 4
    merge_adapter(out, tmp_path / "merged", dtype="fp32", verify=True)  # the merged model equals adapter + base
    assert (tmp_path / "merged" / "config.json").is_file()


def test_bad_init_from_is_refused_before_the_model_loads(tiny_llama_dir, tmp_path, capsys):
    from peftchat.errors import UserError

    with pytest.raises(UserError, match="adapter.init_from: .* is not an adapter dir"):
        train(_demo(tiny_llama_dir, tmp_path / "dpo", f"adapter.init_from={tmp_path / 'nope'}"))
    assert "trainable params" not in capsys.readouterr().out

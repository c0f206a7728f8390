"""A NaN/inf loss: the run stops naming the step and micro-batch with nothing of that step saved
(`training.on_nan=stop`), or drops that optimizer step and goes on (`skip`)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from peftchat.config import load_recipe
from peftchat.errors import UserError
from peftchat.train.loop import TrainHooks, train

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def _recipe(tiny_llama_dir, out, *more):
    return load_recipe(
        os.path.join(RECIPES, "demo.yaml"),
        [
            f"model.path={tiny_llama_dir}",
            f"training.output_dir={out}",
            "training.device=cpu",
            "training.tensorboard=false",
            "training.save_steps=1",
            "training.eval_steps=0",
            "training.log_steps=1",
            "training.gradient_accumulation_steps=2",
            "training.batch_size=2",
            "data.max_length=128",
            "data.eval_split=0",
            *more,
        ],
    )


def _poison_second_micro_batch_of_step_2(run):
    """After step 1: the next call of the loss (step 2's second micro-batch) returns NaN."""
    if run.state.step != 1:
        return
    clean, calls = run.loss_fn, []

    def loss_fn(model, batch, normalizer):
        calls.append(1)
        loss = clean(model, batch, normalizer=normalizer)
        return loss * float("nan") if len(calls) == 2 else loss

    run.loss_fn = loss_fn


def test_nan_loss_stops_before_anything_of_its_step_is_saved(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(
            _recipe(tiny_llama_dir, out, "training.max_steps=3"),
            TrainHooks(after_step=_poison_second_micro_batch_of_step_2),
        )
    message = str(info.value)
    assert message.startswith(
        "loss is nan at step 2, micro-batch 3 of epoch 0 (micro-batch 2 of the step's 2; train samples "
    ), message
    assert "last checkpoint: checkpoint-1" in message and "training.on_nan=skip" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "complete").exists() and not (out / "adapter_model.safetensors").exists()
    weights = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_on_nan_skip_drops_the_step_counts_and_logs_it(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train(
        _recipe(tiny_llama_dir, out, "training.max_steps=3", "training.on_nan=skip"),
        TrainHooks(after_step=_poison_second_micro_batch_of_step_2),
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["step"], r["skipped"], r["nan_skipped"]) for r in skipped] == [(2, "loss nan", 1)]
    assert [r["step"] for r in rows if "loss" in r] == [1, 3]
    assert json.loads((out / "training_summary.json").read_text())["nan_skipped"] == 1
    # two optimizer updates of three steps: the poisoned one was never applied
    optimizer = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["optimizer"]
    assert {float(s["step"]) for s in optimizer["state"].values()} == {2.0}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_nan_found_later_still_names_its_step_and_nothing_is_published(tiny_llama_dir, tmp_path):
    """The stop check runs where the loop syncs anyway: with no log or save until the end, the
    poisoned step 2 is named at the end and neither a checkpoint nor the final outputs appear."""
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(
            _recipe(tiny_llama_dir, out, "training.max_steps=4", "training.log_steps=10", "training.save_steps=0"),
            TrainHooks(after_step=_poison_second_micro_batch_of_step_2),
        )
    assert str(info.value).startswith("loss is nan at step 2, micro-batch 3 of epoch 0"), str(info.value)
    assert "last checkpoint: none" in str(info.value)
    assert not list(out.glob("checkpoint-*")) and not (out / "complete").exists()
    assert not (out / "adapter_model.safetensors").exists()

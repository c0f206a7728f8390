"""Resume rules (README "Resuming"): what a resumed recipe may change, and what a resume leaves."""

import json
import os
import shutil

import pytest

from peftchat.cli import main
from peftchat.config import load_recipe
from peftchat.errors import ConfigError
from peftchat.train.loop import train
from peftchat.train.optim import lr_factor
from peftchat.train.resume import key_kind

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
DEMO = os.path.join(RECIPES, "demo.yaml")
# 4 steps, a checkpoint at 2 and 4, warmup 1 so the schedule is mostly decay
BASE = [
    "training.device=cpu",
    "training.tensorboard=false",
    "training.max_steps=4",
    "training.save_steps=2",
    "training.eval_steps=0",
    "training.log_steps=1",
    "training.warmup_steps=1",
    "training.save_total_limit=0",
    "data.eval_split=0",
]


def _args(tiny_llama_dir, out, *extra):
    return [f"model.path={tiny_llama_dir}", f"training.output_dir={out}", *BASE, *extra]


def _train(tiny_llama_dir, out, *extra):
    return train(load_recipe(DEMO, _args(tiny_llama_dir, out, *extra)))


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, tmp_path_factory):
    """A finished 4-step run, trained once; each test resumes a copy."""
    out = tmp_path_factory.mktemp("resume") / "run"
    _train(tiny_llama_dir, out)
    return out


@pytest.fixture
def copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _summary(out):
    return json.loads((out / "training_summary.json").read_text())


def test_more_steps_replan_the_schedule_and_the_next_lr_is_not_zero(tiny_llama_dir, copy):
    out = copy
    _train(tiny_llama_dir, out, "training.max_steps=7", "training.resume=true")
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    # steps 5..7 follow the curve of a 7-step run (warmup 1) from where it stands after 4 steps
    assert rows[4]["lr"] > 0
    assert [r["lr"] for r in rows[4:]] == pytest.approx([1e-2 * lr_factor("cosine", k, 1, 7) for k in (4, 5, 6)])
    assert (out / "complete").is_file() and _summary(out)["steps"] == 7
    assert [r["resume_changes"] for r in _rows(out) if "resume_changes" in r] == [{"training.max_steps": [4, 7]}]


def test_the_first_row_after_a_resume_is_metered_from_the_resumed_step(tiny_llama_dir, copy):
    out = copy
    _train(tiny_llama_dir, out, f"training.resume={out / 'checkpoint-2'}", "training.log_steps=4")
    # no one-step row at step 3 (it would time the first step after loading alone)
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 4]


def test_changing_what_is_trained_stops_with_exit_2_and_the_differences(tiny_llama_dir, copy, capsys):
    out = copy
    code = main(
        [
            "train",
            DEMO,
            *_args(
                tiny_llama_dir,
                out,
                "training.max_steps=6",
                "training.lr=5e-3",
                "training.batch_size=4",
                "training.resume=true",
            ),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # one line, the last on stderr
    assert code == 2 and err.startswith("peftchat: error: training.resume:")
    assert "training.lr: 0.01 -> 0.005" in err and "training.batch_size: 8 -> 4" in err
    assert "training.max_steps" not in err  # a schedule key is no difference that stops the run
    assert "resume_changes=allow" in err
    assert not (out / "checkpoint-6").exists()


def test_allowed_changes_take_effect_and_are_recorded(tiny_llama_dir, copy):
    out = copy
    _train(
        tiny_llama_dir,
        out,
        "training.max_steps=6",
        "training.lr=5e-3",
        "training.resume=true",
        "training.resume_changes=allow",
    )
    rows = _rows(out)
    assert [r for r in rows if "resume_changes" in r] == [
        {"step": 4, "resume_changes": {"training.lr": [0.01, 0.005], "training.max_steps": [4, 6]}}
    ]
    step5 = next(r for r in rows if r.get("step") == 5 and "loss" in r)
    assert step5["lr"] == pytest.approx(5e-3 * lr_factor("cosine", 4, 1, 6))  # the new lr, at once
    header = (out / "recipe.yaml").read_text().splitlines()[0]
    assert header.startswith("# resumed at step 4 with changes:") and "training.lr: 0.01 -> 0.005" in header
    assert load_recipe(out / "recipe.yaml").training.lr == 5e-3  # still a loadable recipe


def test_resume_after_the_last_checkpoint_fills_the_summary(tiny_llama_dir, copy):
    out = copy
    first, rows = _summary(out), _rows(out)
    for name in ("complete", "training_summary.json", "adapter_model.safetensors"):  # died while publishing
        (out / name).unlink()
    _train(tiny_llama_dir, out, "training.resume=true")
    again = _summary(out)
    assert (out / "complete").is_file()
    assert again["final_loss"] is not None and again["final_loss"] == first["final_loss"]
    assert again["first_loss"] == first["first_loss"] and again["steps"] == 4
    assert _rows(out) == rows  # nothing trained, nothing logged twice


def test_every_recipe_key_has_a_resume_kind():
    from peftchat.config import SCHEMA_KEYS

    kinds = {k: key_kind(k) for k in SCHEMA_KEYS}
    trained = {
        "model.path",
        "model.quantization",
        "adapter.r",
        "data.train",
        "data.collator",
        "data.max_length",
        "training.lr",
        "training.lr_scheduler",
        "training.batch_size",
        "training.gradient_accumulation_steps",
        "training.seed",
        "training.warmup_steps",
    }
    assert all(kinds[k] == "trained" for k in trained)
    assert kinds["training.max_steps"] == kinds["training.epochs"] == kinds["training.save_total_limit"] == "schedule"
    assert kinds["training.device"] == kinds["training.compile"] == kinds["decoding.temperature"] == "runtime"
    with pytest.raises(ConfigError, match="resume_changes"):
        load_recipe(DEMO, ["model.path=x", "training.resume_changes=maybe"])

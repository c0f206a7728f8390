"""Issue 32's rough edges: what a new user meets first (messages before the model loads, CPU
summaries that say what runs, eval's console line and held-out default, quiet by default)."""

import logging
import os

import pytest
import yaml

from peftchat.cli import main
from peftchat.config import recipe_from_dict


def _no_model(monkeypatch):
    """Loading the model fails the test: the command must have stopped before."""
    import peftchat.model.load as load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(load, "load_base_model", refuse)


def test_train_reports_a_missing_data_file_before_the_model(
    tiny_llama_dir, infer_recipe_dict, tmp_path, monkeypatch, capsys
):
    _no_model(monkeypatch)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(infer_recipe_dict(tiny_llama_dir, tmp_path / "out")), encoding="utf-8")
    assert main(["train", str(recipe), f"data.train={tmp_path / 'gone.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftchat: error: ") and "gone.jsonl" in err and err.count("\n") == 1


def test_eval_reads_its_data_before_the_model(make_adapter, tmp_path, monkeypatch, capsys):
    adapter = make_adapter("chatglm")
    _no_model(monkeypatch)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"prompt": \n', encoding="utf-8")
    assert main(["eval", str(adapter), "--data", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"peftchat: error: {bad}:2: invalid JSON")
    assert main(["eval", str(adapter), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert main(["eval", str(adapter)]) == 2  # no --data and a run without eval data
    assert "has no eval data (data.eval or data.eval_split); pass --data FILE" in capsys.readouterr().err


def test_eval_scores_the_held_out_split_and_prints_them(make_adapter, capsys):
    adapter = make_adapter("chatglm", eval_split=0.2)
    assert main(["eval", str(adapter), "--limit", "2"]) == 0
    captured = capsys.readouterr()
    import json

    scores = json.loads(captured.out)
    assert scores["n"] == 2
    line = (
        f"2 answers: BLEU-4 {scores['bleu-4']:.1f}, ROUGE-1 {scores['rouge-1']:.1f}, "
        f"ROUGE-2 {scores['rouge-2']:.1f}, ROUGE-L {scores['rouge-l']:.1f}"
    )
    assert line in captured.err


def test_cpu_run_says_the_budget_is_ignored_and_what_checkpointing_runs(tiny_llama_dir, tmp_path, capsys):
    import torch

    from peftchat.train.loop import TrainHooks, setup_model

    recipe = recipe_from_dict(
        {
            "model": {"path": str(tiny_llama_dir), "dtype": "fp32", "compute_dtype": "fp32"},
            "adapter": {"r": 4},
            "data": {"train": "x.jsonl", "max_length": 64},
            "training": {
                "device": "cpu",
                "output_dir": str(tmp_path),
                "gradient_checkpointing": True,
                "checkpoint_offload": True,
                "max_memory_gib": 0.001,
            },
        }
    )
    setup_model(recipe, torch.device("cpu"), TrainHooks())
    out = capsys.readouterr().out
    assert "max_memory_gib 0.001: a GPU memory budget, ignored on this cpu run" in out
    assert "NOTHING FITS" not in out and "estimated" not in out
    assert (
        "speed-ups: loss:chunked, checkpointed 2/2 layers (checkpoint_offload: no GPU, inputs kept in memory)\n" in out
    )


def test_quiet_by_default_and_verbose_brings_the_messages_back(tmp_path, monkeypatch, capsys):
    import transformers

    from peftchat import quiet

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}, "data": {"train": str(recipe)}}))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["config", str(recipe), "--verbose"]) == 0
    assert quiet.verbose() and "HF_HUB_OFFLINE" not in os.environ
    transformers.utils.logging.enable_progress_bar()
    assert main(["config", str(recipe)]) == 0
    assert not quiet.verbose() and not transformers.utils.logging.is_progress_bar_enabled()
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # model and data are local paths: no hub look-ups
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["config", str(recipe), "model.path=Qwen/Qwen2-0.5B"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ  # a hub model: the hub stays reachable
    note = logging.LogRecord(
        "matplotlib.font_manager",
        logging.WARNING,
        "",
        0,
        "Matplotlib is building the font cache; this may take a moment.",
        None,
        None,
    )
    assert not logging.getLogger("matplotlib.font_manager").filter(note)
    capsys.readouterr()
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(autouse=True)
def _restore_hub_env(monkeypatch):
    """main() may set HF_HUB_OFFLINE / HF_HUB_DISABLE_PROGRESS_BARS: keep them to this module's tests."""
    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)

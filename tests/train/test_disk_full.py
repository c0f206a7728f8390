"""A full disk while saving costs nothing already saved: a checkpoint that cannot be written
leaves no partial dir, a final save that cannot be written leaves the last checkpoint complete,
and a resume then finishes the run with the same adapter. Each is one line, exit 2.

The disk is filled by replacing safetensors' writer (as peft calls it) with one that raises
OSError(ENOSPC) at the chosen call."""

import errno
import os

import peft.peft_model
import torch
from safetensors.torch import load_file

from peftchat.cli import main

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "demo.yaml")


def _args(tiny_llama_dir, out, *extra):
    return [
        "train",
        RECIPE,
        f"model.path={tiny_llama_dir}",
        f"training.output_dir={out}",
        "training.device=cpu",
        "training.tensorboard=false",
        "training.max_steps=2",
        "training.save_steps=1",
        "training.eval_steps=0",
        "training.save_total_limit=0",
        "data.max_length=96",
        "training.batch_size=2",
        "adapter.modules_to_save=null",
        *extra,
    ]


def _fill_disk_at_call(monkeypatch, n):
    real = peft.peft_model.safe_save_file
    calls = {"n": 0}

    def writer(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", writer)


def _one_line(err, then="is complete: free space, then continue with training.resume=true"):
    """One error line, the last (transformers' weight-loading progress may precede it)."""
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert [x for x in lines if "error" in x] == lines[-1:], err
    assert lines[-1].startswith("peftchat: error: no space left on the device writing "), err
    assert lines[-1].endswith(then), err  # only what is true: a checkpoint exists, or none does


def test_disk_full_during_a_checkpoint_leaves_no_partial_dir(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fill_disk_at_call(monkeypatch, 1)
    assert main(_args(tiny_llama_dir, out)) == 2
    _one_line(capsys.readouterr().err, then="no complete checkpoint was saved: free space, then run it again")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # no checkpoint-1, no .tmp-checkpoint-*


def test_disk_full_during_the_final_save_keeps_the_run(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fill_disk_at_call(monkeypatch, 3)  # checkpoint-1, checkpoint-2, then the final adapter
    assert main(_args(tiny_llama_dir, out)) == 2
    _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "complete").is_file()
    monkeypatch.undo()  # space freed: resume finishes the run from the intact checkpoint
    assert main(_args(tiny_llama_dir, out, "training.resume=true")) == 0
    final, saved = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(out / "checkpoint-2" / "adapter_model.safetensors")),
    )
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)

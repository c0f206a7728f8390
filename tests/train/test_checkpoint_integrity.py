"""Checkpoint checksums: every kind of damage to every kind of file is found, resume falls back to
the newest intact checkpoint (ending bit-equal to the uninterrupted run), a damaged
`training.resume=PATH` is one line and exit 2."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from peftchat.cli import main
from peftchat.config import load_recipe
from peftchat.rundir import CHECKSUMS_FILE, checkpoint_damage, latest_intact_checkpoint
from peftchat.train.loop import train

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
FILES = ["adapter_model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json"]


def _overrides(tiny_llama_dir, out, *more):
    return [
        f"model.path={tiny_llama_dir}",
        f"training.output_dir={out}",
        "training.device=cpu",
        "training.tensorboard=false",
        "training.max_steps=3",
        "training.save_steps=1",
        "training.save_total_limit=0",
        "training.eval_steps=0",
        *more,
    ]


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory):
    """An uninterrupted 3-step run with checkpoints 1, 2 and 3."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    train(load_recipe(os.path.join(RECIPES, "demo.yaml"), _overrides(tiny_llama_dir, out)))
    return out


def _damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # one bit flipped, same size
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def test_manifest_lists_every_file(finished_run):
    ckpt = finished_run / "checkpoint-3"
    listed = json.loads((ckpt / CHECKSUMS_FILE).read_text())["files"]
    assert set(FILES) <= listed.keys() and "complete" not in listed
    assert checkpoint_damage(ckpt) is None


@pytest.mark.parametrize("how", ["missing", "truncated", "bit-flip"])
@pytest.mark.parametrize("name", FILES)
def test_every_damage_is_found_and_skipped(finished_run, tmp_path, capsys, name, how):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _damage(out / "checkpoint-3" / name, how)
    damage = checkpoint_damage(out / "checkpoint-3")
    assert damage is not None and name in damage
    assert latest_intact_checkpoint(out).name == "checkpoint-2"
    assert f"skipping checkpoint-3: {name}" in capsys.readouterr().err


@pytest.mark.parametrize("name, how", [("optimizer.pt", "truncated"), ("adapter_model.safetensors", "bit-flip")])
def test_resume_falls_back_and_ends_as_the_uninterrupted_run(finished_run, tiny_llama_dir, tmp_path, capsys, name, how):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _damage(out / "checkpoint-3" / name, how)
    (out / "complete").unlink()  # as if the run had been killed after saving checkpoint-3
    recipe = load_recipe(os.path.join(RECIPES, "demo.yaml"), _overrides(tiny_llama_dir, out, "training.resume=true"))
    train(recipe)
    captured = capsys.readouterr()
    assert f"skipping checkpoint-3: {name}" in captured.err
    assert "resuming from" in captured.out and "checkpoint-2 (step 2" in captured.out
    want, got = (
        load_file(str(finished_run / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    assert checkpoint_damage(out / "checkpoint-3") is None  # rewritten whole


def test_resume_path_to_a_damaged_checkpoint_is_one_line(finished_run, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _damage(out / "checkpoint-2" / "rng_state.pt", "bit-flip")
    recipe = tmp_path / "r.yaml"
    shutil.copy(os.path.join(RECIPES, "demo.yaml"), recipe)
    rc = main(["train", str(recipe), *_overrides(tiny_llama_dir, out, f"training.resume={out / 'checkpoint-2'}")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("peftchat: error: training.resume: checkpoint")
    assert "rng_state.pt does not match its checksum" in err and len(err.strip().splitlines()) == 1

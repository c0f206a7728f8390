"""Fixtures of tests/reliability: a world of user files (a base model copy, data, a recipe) and
one real trained run dir (with its checksums)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_helpers import recipe_text

from peftchat.demo_assets import asset_path


@pytest.fixture
def user_world(tmp_path, tiny_llama_dir):
    """tmp_path holding what a user owns: model/ (a copy of the tiny Llama), data.jsonl, r.yaml
    (trains model/ on data.jsonl into run/)."""
    t = tmp_path
    shutil.copytree(tiny_llama_dir, t / "model")
    shutil.copy(asset_path("demo/messages_demo.jsonl"), t / "data.jsonl")
    (t / "r.yaml").write_text(recipe_text(t / "model", t), encoding="utf-8")
    return t


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_llama_dir):
    """A run dir written by `peftchat train` (2 steps, a checkpoint at each): final outputs with
    checksums.json and the `complete` marker, checkpoint-1 and checkpoint-2. Read-only: copy it."""
    from peftchat.cli import main

    t = tmp_path_factory.mktemp("trained")
    shutil.copy(asset_path("demo/messages_demo.jsonl"), t / "data.jsonl")
    (t / "r.yaml").write_text(recipe_text(Path(tiny_llama_dir), t), encoding="utf-8")
    assert main(["train", str(t / "r.yaml")]) == 0
    return t / "run"

"""Issue 29.1: no command writes over a file or dir it did not create. Every output path is
checked against every input of the same command (symlinks and hard links count, and so does an
output dir holding an input) before anything is loaded: exit 2, one line naming both paths, and
every file of the user byte-equal afterwards (even with --force)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from reliability_helpers import error_line, run_cli, tree_digest


def _link(name: str, target: str, hard: bool = False):
    def prep(t, run):
        (os.link if hard else os.symlink)(t / target, t / name)

    return prep


def _prompts(t, run):
    (t / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n", encoding="utf-8")


def _two_data_files(t, run):
    shutil.copy(t / "data.jsonl", t / "data2.jsonl")


# (id, argv with {T} = the user's dir and {R} its recipe, paths the line must name, prep)
ROWS = [
    (
        "train-output-dir-is-the-base-model",
        ["train", "{R}", "training.output_dir={T}/model"],
        ["training.output_dir {T}/model", "model.path {T}/model"],
        None,
    ),
    (
        "train-output-dir-is-a-symlink-to-the-base-model",
        ["train", "{R}", "training.output_dir={T}/link"],
        ["training.output_dir {T}/link", "model.path {T}/model"],
        _link("link", "model"),
    ),
    (
        "train-output-dir-is-the-tokenizer",
        ["train", "{R}", "training.output_dir={T}/tok", "model.tokenizer={T}/tok"],
        ["training.output_dir {T}/tok", "model.tokenizer {T}/tok"],
        lambda t, run: shutil.copytree(t / "model", t / "tok"),
    ),
    (
        "train-output-dir-holds-the-data",
        ["train", "{R}", "training.output_dir={T}/sets", "data.train={T}/sets/a.jsonl"],
        ["training.output_dir {T}/sets", "data.train file {T}/sets/a.jsonl"],
        lambda t, run: (t / "sets").mkdir() or shutil.copy(t / "data.jsonl", t / "sets" / "a.jsonl"),
    ),
    (
        "train-output-dir-holds-a-glob-data-file",
        ["train", "{R}", "training.output_dir={T}/sets", "data.train={T}/sets/*.jsonl"],
        ["training.output_dir {T}/sets", "{T}/sets/a.jsonl"],
        lambda t, run: (t / "sets").mkdir() or shutil.copy(t / "data.jsonl", t / "sets" / "a.jsonl"),
    ),
    (
        "train-output-dir-holds-the-eval-data",
        ["train", "{R}", "training.output_dir={T}/evals", "data.eval={T}/evals/e.jsonl"],
        ["training.output_dir {T}/evals", "data.eval file {T}/evals/e.jsonl"],
        lambda t, run: (t / "evals").mkdir() or shutil.copy(t / "data.jsonl", t / "evals" / "e.jsonl"),
    ),
    (
        "dump-out-is-the-train-file",
        ["data", "dump", "{R}", "--out", "{T}/data.jsonl", "--force"],
        ["--out {T}/data.jsonl", "data.train file {T}/data.jsonl"],
        None,
    ),
    (
        "dump-out-is-a-hard-link-to-the-train-file",
        ["data", "dump", "{R}", "--out", "{T}/hard.jsonl", "--force"],
        ["--out {T}/hard.jsonl", "data.train file {T}/data.jsonl"],
        _link("hard.jsonl", "data.jsonl", hard=True),
    ),
    (
        "dump-out-is-the-second-source-of-a-list",
        ["data", "dump", "{R}", "--out", "{T}/data2.jsonl", "--force", "data.train=[{T}/data.jsonl,{T}/data2.jsonl]"],
        ["--out {T}/data2.jsonl", "data.train file {T}/data2.jsonl"],
        _two_data_files,
    ),
    (
        "dump-out-is-the-recipe",
        ["data", "dump", "{R}", "--out", "{T}/r.yaml", "--force"],
        ["--out {T}/r.yaml", "the recipe {T}/r.yaml"],
        None,
    ),
    (
        "eval-out-is-the-data-file",
        ["eval", "{T}/run", "--data", "{T}/data.jsonl", "--out", "{T}/data.jsonl", "--force"],
        ["--out {T}/data.jsonl", "--data {T}/data.jsonl"],
        None,
    ),
    (
        "plot-out-is-the-metrics",
        ["plot", "{T}/run", "--out", "{T}/run/metrics.jsonl", "--force"],
        ["--out {T}/run/metrics.jsonl", "{T}/run/metrics.jsonl"],
        None,
    ),
    (
        "generate-out-is-in",
        ["generate", "{T}/run", "--in", "{T}/p.jsonl", "--out", "{T}/p.jsonl", "--force"],
        ["--out {T}/p.jsonl", "--in {T}/p.jsonl"],
        _prompts,
    ),
    (
        "generate-out-is-the-adapter-weights",
        ["generate", "{T}/run", "--in", "{T}/p.jsonl", "--out", "{T}/run/adapter_model.safetensors", "--force"],
        ["--out {T}/run/adapter_model.safetensors", "the source {T}/run"],
        _prompts,
    ),
    (
        "export-gguf-is-the-source-weights",
        ["export", "{T}/model", "--gguf", "{T}/model/model.safetensors", "--force"],
        ["--gguf {T}/model/model.safetensors", "the source {T}/model"],
        None,
    ),
    (
        "merge-out-is-the-base",
        ["merge", "--adapter", "{T}/run", "--base", "{T}/model", "--out", "{T}/model", "--force"],
        ["--out {T}/model", "--base {T}/model"],
        None,
    ),
    (
        "merge-out-is-a-symlink-to-the-adapter",
        ["merge", "--adapter", "{T}/run", "--out", "{T}/link", "--force"],
        ["--out {T}/link", "--adapter {T}/run"],
        _link("link", "run"),
    ),
    (
        "merge-out-holds-the-adapter",
        ["merge", "--adapter", "{T}/run/checkpoint-1", "--out", "{T}/run", "--force"],
        ["--out {T}/run", "--adapter {T}/run/checkpoint-1"],
        None,
    ),
]


@pytest.mark.parametrize("row_id,argv,names,prep", ROWS, ids=[r[0] for r in ROWS])
def test_an_output_never_overwrites_an_input(user_world, trained_run, capsys, row_id, argv, names, prep):
    t = user_world
    shutil.copytree(trained_run, t / "run")
    if prep is not None:
        prep(t, t / "run")
    before = tree_digest(t)
    rc, err = run_cli([a.replace("{T}", str(t)).replace("{R}", str(t / "r.yaml")) for a in argv], capsys)
    line = error_line(err)
    assert rc == 2, err
    assert "would overwrite" in line and "never writes over its inputs" in line, line
    for name in names:
        assert name.replace("{T}", str(t)) in line, (name, line)
    assert tree_digest(t) == before


def test_check_outputs_compares_outputs_with_each_other(tmp_path):
    from peftchat.errors import UserError
    from peftchat.paths import check_outputs

    with pytest.raises(UserError, match="--a .*/x would overwrite --b .*/x"):
        check_outputs([("--a", tmp_path / "x"), ("--b", tmp_path / "x")], [])
    check_outputs([("--a", tmp_path / "x"), ("--b", tmp_path / "y")], [("hub id", "org/model")])

"""Issue 29 item 6: paths no run can mean are refused before anything is read or loaded, one line,
exit 2, the user's files unchanged; a saved recipe holds absolute paths, so a run dir works from
any directory. (Numbers no run can mean, malformed overrides, an empty `chat --message`, a line
break in a path: rows of tests/test_bad_inputs.py.)"""

import os
import shutil

import pytest
from untouched import DEMO_RECIPE, digest, one_line_error, peftchat

from peftchat.cli import main
from peftchat.config import load_recipe
from peftchat.demo_assets import asset_path
from peftchat.train.lock import HOLDER_FILE, LOCK_FILE

MESSAGES = asset_path("demo/messages_demo.jsonl")
SESSIONS = sum(1 for line in open(MESSAGES, encoding="utf-8") if line.strip())


def _specials(t):
    """A FIFO, a symlink loop and a recipe extending the FIFO, under `t`."""
    os.mkfifo(t / "fifo.yaml")
    os.symlink(t / "loop-b.yaml", t / "loop-a.yaml")
    os.symlink(t / "loop-a.yaml", t / "loop-b.yaml")
    (t / "child.yaml").write_text("extends: fifo.yaml\n", encoding="utf-8")


@pytest.mark.parametrize(
    "name, message",
    [
        ("fifo.yaml", "recipe fifo.yaml is a FIFO, not a regular file; give a file"),
        ("/dev/zero", "recipe /dev/zero is a device, not a regular file; give a file"),
        ("loop-a.yaml", "recipe loop-a.yaml: a loop of symbolic links; point it at a file"),
        ("child.yaml", "fifo.yaml is a FIFO, not a regular file; give a file"),
    ],
)
def test_a_recipe_that_is_no_file_is_refused(tmp_path, name, message):
    # in a process of its own: without the check, reading a FIFO or /dev/zero never ends
    _specials(tmp_path)
    before = digest(tmp_path / "child.yaml")
    line = one_line_error(peftchat("config", name, cwd=tmp_path, timeout=60))
    assert line.startswith("peftchat: error: ") and line.endswith(message)
    assert digest(tmp_path / "child.yaml") == before


def _dump(tmp_path, tiny_llama_dir, train, capsys):
    capsys.readouterr()
    rc = main(
        [
            "data",
            "dump",
            str(DEMO_RECIPE),
            f"model.path={tiny_llama_dir}",
            "data.format=messages",
            "data.collator=chat_template",
            f"data.train={train}",
            "--out",
            str(tmp_path / "d.jsonl"),
        ]
    )
    return rc, capsys.readouterr()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: os.mkfifo(t / "d.jsonl") or "d.jsonl", "d.jsonl is a FIFO, not a regular file; give a file"),
        (lambda t: "/dev/zero", "/dev/zero is a device, not a regular file; give a file"),
        (
            lambda t: os.symlink(t / "b.jsonl", t / "a.jsonl") or os.symlink(t / "a.jsonl", t / "b.jsonl") or "a.jsonl",
            "a.jsonl: a loop of symbolic links; point it at a file",
        ),
    ],
)
def test_a_data_path_that_is_no_file_is_refused(tiny_llama_dir, tmp_path, monkeypatch, capsys, make, message):
    monkeypatch.chdir(tmp_path)
    name = make(tmp_path)
    rc, out = _dump(tmp_path / "out", tiny_llama_dir, name, capsys)
    assert rc == 2 and "Traceback" not in out.err
    assert out.err.strip().splitlines() == [f"peftchat: error: 'data.train': {message}"], out.err
    assert not (tmp_path / "out").exists()


def test_a_glob_through_a_symlink_loop_reads_each_file_once(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    shutil.copy(MESSAGES, tmp_path / "data" / "sub" / "m.jsonl")
    os.symlink("..", tmp_path / "data" / "sub" / "up")  # data/sub/up/sub/up/... names m.jsonl again and again
    before = digest(tmp_path / "data")
    rc, out = _dump(tmp_path, tiny_llama_dir, f"{tmp_path}/data/**/*.jsonl", capsys)
    assert rc == 0, out.err
    assert f"wrote {SESSIONS} samples" in out.out + out.err
    assert digest(tmp_path / "data") == before


def test_the_runs_own_lock_files_are_never_data(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(MESSAGES, run / "m.jsonl")
    (run / HOLDER_FILE).write_text('{"pid": 1, "host": "h", "started": "t"}\n')
    (run / LOCK_FILE).write_text("")
    assert HOLDER_FILE.startswith(".peftchat-train.") and LOCK_FILE.startswith(".peftchat-train.")
    rc, out = _dump(tmp_path, tiny_llama_dir, run, capsys)  # a dir: its hidden files are left out
    assert rc == 0 and f"wrote {SESSIONS} samples" in out.out + out.err, out.err
    (tmp_path / "second").mkdir()  # a new --out: the first dump's file is not replaced without --force
    rc, out = _dump(tmp_path / "second", tiny_llama_dir, run / HOLDER_FILE, capsys)
    assert rc == 2 and out.err.strip() == (
        f"peftchat: error: 'data.train': {run / HOLDER_FILE} is a file of peftchat's own (a run's lock), not data"
    )


def test_a_run_saved_with_relative_paths_works_from_any_directory(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    os.symlink(tiny_llama_dir, work / "base")
    shutil.copy(MESSAGES, work / "chats.jsonl")
    monkeypatch.chdir(work)
    assert (
        main(
            [
                "train",
                str(DEMO_RECIPE),
                "model.path=./base",
                "model.tokenizer=./base",
                "data.train=chats.jsonl",
                "data.format=messages",
                "data.collator=chat_template",
                "training.output_dir=runs/r",
                "training.device=cpu",
                "training.tensorboard=false",
                "training.max_steps=1",
                "training.eval_steps=0",
            ]
        )
        == 0
    )
    saved = load_recipe(work / "runs" / "r" / "recipe.yaml")
    assert saved.model.path == str(work / "base") and saved.data.train == str(work / "chats.jsonl")
    assert saved.training.output_dir == str(work / "runs" / "r")
    assert load_recipe(work / "runs" / "r" / "checkpoint-1" / "recipe.yaml").model.path == str(work / "base")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["chat", str(work / "runs" / "r"), "--message", "hi", "--max-new-tokens", "2"]) == 0, (
        capsys.readouterr().err
    )
    assert list(elsewhere.iterdir()) == []

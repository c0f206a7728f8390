"""Issue 29.2: an existing output is replaced only when asked, and only atomically.

An output file that exists is refused without --force (exit 2, one line, the file byte-equal);
with --force the new content is written beside it and renamed over it, so a failure mid-write
leaves the old file whole, and another name of the old file (a hard link) keeps the old bytes.
`training.output_dir` that holds someone else's files is refused unless --into-nonempty-dir, and
even then none of them is replaced. Two merges into one new --out: one wins, the other is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import error_line, run_cli, tree_digest

OLD = b"the user's previous output\n"

# (id, argv with {T} = the user's dir, {R} its recipe and {O} the existing output)
EXISTING = [
    ("data-dump", ["data", "dump", "{R}", "--out", "{O}"]),
    ("eval", ["eval", "{T}/run", "--data", "{T}/data.jsonl", "--out", "{O}"]),
    ("generate", ["generate", "{T}/run", "--in", "{T}/p.jsonl", "--out", "{O}"]),
    ("plot", ["plot", "{T}/run", "--out", "{O}"]),
    ("export", ["export", "{T}/model", "--gguf", "{O}"]),
]


def _fill(argv, t: Path, out: Path):
    return [a.replace("{T}", str(t)).replace("{R}", str(t / "r.yaml")).replace("{O}", str(out)) for a in argv]


@pytest.mark.parametrize("row_id,argv", EXISTING, ids=[r[0] for r in EXISTING])
def test_an_existing_output_is_refused_without_force(user_world, trained_run, capsys, row_id, argv):
    t = user_world
    shutil.copytree(trained_run, t / "run")
    (t / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n", encoding="utf-8")
    out = t / "previous.out"
    out.write_bytes(OLD)
    before = tree_digest(t)
    rc, err = run_cli(_fill(argv, t, out), capsys)
    assert rc == 2, err
    assert f"{out} exists; pass --force to replace it" in error_line(err)
    assert tree_digest(t) == before


def test_force_replaces_by_rename_and_leaves_no_temp(user_world, capsys):
    t = user_world
    out = t / "dump.jsonl"
    out.write_bytes(OLD)
    os.link(out, t / "another-name.jsonl")  # the old file under a second name
    rc, err = run_cli(["data", "dump", t / "r.yaml", "--out", out, "--force"], capsys)
    assert rc == 0, err
    new = out.read_bytes()
    assert new != OLD and all("input_ids" in json.loads(line) for line in new.splitlines())
    assert (t / "another-name.jsonl").read_bytes() == OLD  # renamed over, never written in place
    assert not [p for p in t.iterdir() if p.name.startswith(".peftchat-tmp-")]


def test_a_failed_write_keeps_the_previous_file_whole(user_world, capsys, monkeypatch):
    """The disk fills while the new dump is flushed: one line, the old file byte-equal, no temp."""
    import peftchat.paths

    t = user_world
    out = t / "dump.jsonl"
    out.write_bytes(OLD)
    before = tree_digest(t)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peftchat.paths.os, "fsync", full)
    rc, err = run_cli(["data", "dump", t / "r.yaml", "--out", out, "--force"], capsys)
    assert rc == 2, err
    assert "no space left on the device" in error_line(err)
    assert tree_digest(t) == before


def test_an_output_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    from peftchat.errors import UserError
    from peftchat.paths import atomic_output

    out = tmp_path / "o.txt"
    with pytest.raises(UserError, match="appeared while this command ran"):
        with atomic_output(out, "--out") as tmp:
            tmp.write_text("new")
            out.write_bytes(OLD)  # another process wrote it after our up-front check
    assert out.read_bytes() == OLD and sorted(p.name for p in tmp_path.iterdir()) == ["o.txt"]


# ------------------------------------------------------------------------------ training.output_dir


def test_a_nonempty_dir_of_someone_else_is_refused(user_world, capsys):
    t = user_world
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("my notes")
    before = tree_digest(t)
    rc, err = run_cli(["train", t / "r.yaml", f"training.output_dir={t / 'mine'}"], capsys)
    assert rc == 2, err
    line = error_line(err)
    assert f"training.output_dir {t / 'mine'} is not empty and holds no peftchat run (notes.txt)" in line
    assert "--into-nonempty-dir" in line
    assert tree_digest(t) == before


def test_opt_in_never_replaces_a_file_of_the_same_name(user_world, capsys):
    t = user_world
    (t / "mine").mkdir()
    (t / "mine" / "README.md").write_text("my readme")  # peft's save_pretrained writes a README.md
    before = tree_digest(t)
    rc, err = run_cli(["train", t / "r.yaml", f"training.output_dir={t / 'mine'}", "--into-nonempty-dir"], capsys)
    assert rc == 2, err
    assert f"holds {t / 'mine' / 'README.md'}, a name the run writes" in error_line(err)
    assert tree_digest(t) == before


def test_opt_in_trains_beside_the_users_files(user_world, capsys):
    t = user_world
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("my notes")
    rc, err = run_cli(
        ["train", t / "r.yaml", f"training.output_dir={t / 'mine'}", "--into-nonempty-dir", "training.max_steps=1"],
        capsys,
    )
    assert rc == 0, err
    assert (t / "mine" / "notes.txt").read_text() == "my notes" and (t / "mine" / "complete").is_file()


def test_empty_dirs_and_leftovers_of_a_killed_run_are_fine(tmp_path):
    from peftchat.train.lock import LOCK_FILE
    from peftchat.train.outputs import check_output_dir_owner

    check_output_dir_owner(tmp_path, into_nonempty=False)  # empty
    (tmp_path / LOCK_FILE).write_text("")
    (tmp_path / ".tmp-checkpoint-1-deadbeef").mkdir()
    check_output_dir_owner(tmp_path, into_nonempty=False)  # what a run killed during setup leaves


# ------------------------------------------------------------------------------ merge


def test_a_merge_into_an_out_being_written_is_refused(tmp_path, trained_run, capsys):
    from peftchat.dirswap import sole_writer_of

    out = tmp_path / "merged"
    with sole_writer_of(out, "--out"):  # a live merge writing `out` (flock is per open file)
        rc, err = run_cli(["merge", "--adapter", trained_run, "--out", out], capsys)
    assert rc == 2, err
    assert f"--out {out} is being written by another peftchat process" in error_line(err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_two_merges_at_once_one_wins_never_a_mix(tmp_path, trained_run):
    out = tmp_path / "merged"
    cmd = [
        sys.executable,
        "-m",
        "peftchat.cli",
        "merge",
        "--adapter",
        str(trained_run),
        "--out",
        str(out),
        "--no-verify",
    ]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "being written by another peftchat process" in loser or "exists and is not empty" in loser, loser
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # one whole model dir
    assert not [p for p in tmp_path.iterdir() if p.name != "merged"]  # no partial or lock left


def test_a_stream_target_is_written_in_place(tmp_path):
    """/dev/null, /dev/stdout, a FIFO: nothing to replace, so no --force and no temp file."""
    from peftchat.paths import atomic_output, check_new_file

    check_new_file("/dev/null", "--out", force=False)
    with atomic_output("/dev/null", "--out") as target:
        assert target == Path("/dev/null")
        target.write_text("discarded")

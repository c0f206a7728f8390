"""Replacing an export dir: the target holds the old or the new dir whole at every point a writer
can be killed; what killed writers leave beside it is cleaned (or, an old dir set aside, put back)."""

import subprocess
import sys

import pytest

from peftchat import dirswap
from peftchat.dirswap import remove_stale_partials, replace_dir


def _dir(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replace_dir_swaps_whole_dirs(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(dirswap, "_exchange", lambda a, b: False)
    target = _dir(tmp_path / "export", **{"old.txt": "old"})
    replace_dir(_dir(tmp_path / ".export.partial-1", **{"new.txt": "new"}), target)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_a_kill_between_the_two_renames_keeps_the_old_export(tmp_path, monkeypatch):
    """The fallback's window: the old dir is aside, the new not yet in; the next writer restores it."""
    monkeypatch.setattr(dirswap, "_exchange", lambda a, b: False)
    target = _dir(tmp_path / "export", **{"old.txt": "old"})
    real_replace = dirswap.os.replace
    calls = []

    def killed_on_second_rename(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill
        real_replace(a, b)

    monkeypatch.setattr(dirswap.os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(_dir(tmp_path / ".export.partial-1", **{"new.txt": "new"}), target)
    monkeypatch.setattr(dirswap.os, "replace", real_replace)
    aside = next(tmp_path.glob(".export.replaced-*"))
    aside.rename(tmp_path / f".export.replaced-{_dead_pid()}")  # as written by a process now dead
    remove_stale_partials(target)
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_stale_partials_of_dead_writers_go_live_ones_stay(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = _dir(tmp_path / "export", **{"a": "1"})
        dead = _dir(tmp_path / f".export.partial-{_dead_pid()}")
        running = _dir(tmp_path / f".export.partial-{live.pid}")
        other = _dir(tmp_path / f".other.partial-{_dead_pid()}")
        assert remove_stale_partials(target) == [dead]
        assert running.exists() and other.exists() and (target / "a").exists()
    finally:
        live.kill()
        live.wait()

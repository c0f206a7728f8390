"""Issue 29.5: temporary files never outlive their command. Export's fp32 merge and every atomic
output are written beside their destination as `.peftchat-tmp-PID-*` (never in a shared /tmp);
what a killed command left is removed by the next one. Crash logs are new files, mode 0600, in
the user's own state (else cache) dir."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reliability_helpers import run_cli


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_commands_go_live_ones_and_others_stay(tmp_path):
    from peftchat.paths import remove_stale_temps

    dead = _dead_pid()
    (tmp_path / f".peftchat-tmp-{dead}-0123abcd-model.merged").mkdir()
    (tmp_path / f".peftchat-tmp-{dead}-0123abcd-model.merged" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".peftchat-tmp-{dead}-89abcdef-dump.jsonl").write_text("half")
    live = tmp_path / f".peftchat-tmp-{os.getppid()}-0123abcd-other.gguf"
    live.write_text("being written")
    mine = tmp_path / ".peftchat-tmp-notes.txt"  # not our pattern: a user's file
    mine.write_text("keep")
    removed = remove_stale_temps(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])


def _killed_during_export(trained_run: Path, gguf: Path) -> Path:
    """Start `peftchat export` in another process, kill -9 it once its fp32 merge is being
    written beside the output; the temp dir it leaves behind."""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftchat.cli", "export", str(trained_run), "--gguf", str(gguf)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # safetensors under the temp dir: the fp32 merge is being written (its partial dir)
            try:
                left = [p for p in gguf.parent.glob(f".peftchat-tmp-{proc.pid}-*") if any(p.rglob("*.safetensors"))]
            except OSError:  # a dir renamed under the scan
                left = []
            if left:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return left[0]
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError("the export ended before its temp dir was seen")


def test_a_killed_export_leaves_its_temp_beside_the_output_and_the_next_export_removes_it(
    tmp_path, trained_run, capsys, monkeypatch
):
    import peftchat.export.command

    gguf = tmp_path / "m.gguf"
    stale = _killed_during_export(trained_run, gguf)
    assert stale.parent == tmp_path and not gguf.exists()  # beside the output, never in /tmp
    merge_dirs = []
    real_merge = peftchat.export.command.merge_adapter

    def spy(adapter_dir, out, **kwargs):
        merge_dirs.append(Path(out))
        return real_merge(adapter_dir, out, **kwargs)

    monkeypatch.setattr(peftchat.export.command, "merge_adapter", spy)
    shared_tmp = Path(tempfile.gettempdir())
    before = {p.name for p in shared_tmp.iterdir() if p.name.startswith(("peftchat", ".peftchat"))}
    rc, err = run_cli(["export", trained_run, "--gguf", gguf], capsys)
    assert rc == 0, err
    assert f"removed {stale}" in err
    assert merge_dirs[0].parent.parent == tmp_path  # inside .peftchat-tmp-PID-*, beside the output
    assert merge_dirs[0].parent.name.startswith(f".peftchat-tmp-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert {p.name for p in shared_tmp.iterdir() if p.name.startswith(("peftchat", ".peftchat"))} <= before


def test_crash_logs_are_private_new_files_in_the_users_state_dir(tmp_path, monkeypatch):
    from peftchat.failures import write_crash_log

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "shared-tmp"))
    (tmp_path / "shared-tmp").mkdir()
    logs = [write_crash_log(RuntimeError("boom"), ["train", "r.yaml"]) for _ in range(2)]
    assert logs[0] != logs[1]  # same second, same pid: a new file each time, never one written over
    for log in logs:
        assert log.parent == tmp_path / "state" / "peftchat" / "crash"
        assert stat.S_IMODE(log.stat().st_mode) == 0o600 and "boom" in log.read_text()
    assert stat.S_IMODE(logs[0].parent.stat().st_mode) == 0o700
    (tmp_path / "state2").write_text("a file, not a dir")  # the state dir cannot be made
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state2"))
    log = write_crash_log(RuntimeError("boom"), ["train"])
    assert log.parent == tmp_path / "cache" / "peftchat" / "crash" and stat.S_IMODE(log.stat().st_mode) == 0o600
    (tmp_path / "cache2").write_text("a file too")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    assert write_crash_log(RuntimeError("boom"), ["train"]) is None
    assert list((tmp_path / "shared-tmp").iterdir()) == []  # never the shared temp dir

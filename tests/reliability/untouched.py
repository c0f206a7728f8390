"""Shared checks of tests/reliability (items 3, 6, 7, 8 of issue 29): a command run as the user
runs it, and the user's files hashed before and after."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = ROOT / "recipes" / "demo.yaml"


def digest(*paths) -> dict:
    """{file: sha256} of every file under `paths` (files or dirs); a missing path maps to None."""
    out = {}
    for top in map(Path, paths):
        files = [top] if not top.is_dir() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
    return out


def peftchat(*args, cwd=None, env=None, timeout=300, code=None) -> subprocess.CompletedProcess:
    """`peftchat ARGS` in a fresh process (this tree's code), or `python -c CODE ARGS` when given."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "peftchat.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, rc: int = 2, last: bool = False) -> str:
    """The command's one stderr line, after checking its exit code and that no traceback shows.
    `last`: a command that reports progress on stderr (train): its last line."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == rc, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and (last or len(lines) == 1), err
    return lines[-1]

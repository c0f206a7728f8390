"""One writer per output dir: `peftchat train` holds an OS-level file lock on
`training.output_dir` from its first check to its exit.

The lock is `filelock`'s (flock on POSIX): the kernel drops it when the holder dies, even by
`kill -9`, so a stale lock file never blocks a later run. A side file names the holder (pid, host,
start time) so that a refused second run can say who writes the dir; filelock's own lock file
carries no such record in a form meant to be read.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from peftchat.errors import UserError

LOCK_FILE = ".peftchat-train.lock"
HOLDER_FILE = ".peftchat-train.holder.json"


def _holder_text(out: Path) -> str:
    try:
        holder = json.loads((out / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is between its lock and its note
        return "another process"


@contextmanager
def sole_writer(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `output_dir` for this process (creating it); UserError naming the holder when another
    live process holds it. On exit the lock files go, and the dir too when this call created it
    and nothing else was written there (a run refused at its checks leaves nothing behind)."""
    out = Path(output_dir).expanduser()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"training.output_dir {out} is in use by another peftchat train ({_holder_text(out)}); "
            f"wait for it to end, or choose another training.output_dir"
        ) from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        (out / HOLDER_FILE).write_text(json.dumps(holder) + "\n", encoding="utf-8")
        yield
    finally:
        # Unlinked while still held: filelock's acquire retries when the inode it locked has no
        # name any more, so a process racing this release cannot end up holding a dead file.
        (out / HOLDER_FILE).unlink(missing_ok=True)
        (out / LOCK_FILE).unlink(missing_ok=True)
        lock.release()
        if created:
            try:
                out.rmdir()  # only when empty
            except OSError:
                pass

"""Replace a directory by a complete new one so that, at any instant a process can be killed, the
target path holds either the old directory or the new one, whole; and clean up what killed
writers left beside it.

Linux has `renameat2(RENAME_EXCHANGE)`, one atomic swap of two paths; Python's os module does not
expose it, so it is called through ctypes. Elsewhere (or on a filesystem without it) the old dir is
renamed aside first and the new one moved in: a kill between those two renames leaves the old dir
under `.NAME.replaced-PID`, which `remove_stale_partials` moves back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def partial_dir(target: Path) -> Path:
    """Where a writer of `target` builds the new content: hidden, beside it, named by the pid."""
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS: no exchange here; the caller falls back


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete dir `new` at `target`, replacing what is there; the old content is deleted
    only once the new one is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old content
        return
    aside = target.parent / f".{target.name}.replaced-{os.getpid()}"
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete `.NAME.partial-PID` dirs of dead processes beside `target`; a `.NAME.replaced-PID`
    (an old export set aside by a writer killed before it moved the new one in) goes back to
    `target` when that is missing. Returns what was removed or restored."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(partial|replaced)-(\d+)$")
    done: list[Path] = []
    if not target.parent.is_dir():
        return done
    for path in sorted(target.parent.iterdir()):
        m = pattern.match(path.name)
        if not m or int(m.group(2)) == os.getpid() or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "replaced" and not target.exists():
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


@contextmanager
def sole_writer_of(target: Path, what: str) -> Iterator[None]:
    """Hold `target` for this process while it is written: a second writer of the same path is
    refused at once (UserError) instead of mixing its files in. The lock is filelock's flock on a
    hidden file beside `target`, dropped by the kernel when the holder dies (kill -9 too)."""
    from filelock import FileLock, Timeout

    from peftchat.errors import UserError

    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.peftchat-writer.lock"
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{what} {target} is being written by another peftchat process; "
            f"wait for it to end, or choose another {what}"
        ) from None
    try:
        yield
    finally:
        # Unlinked while still held, as peftchat.train.lock does: filelock's acquire retries when
        # the inode it locked has lost its name, so a racing writer never holds a dead file.
        path.unlink(missing_ok=True)
        lock.release()

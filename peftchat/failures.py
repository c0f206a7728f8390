"""What the CLI says when a command fails with something other than a UserError.

Two kinds remain once every bad input raises a UserError:

* failures of the machine that the user fixes by changing a setting or freeing a resource: out of
  (GPU or host) memory, a full disk, a path that cannot be written. `explain` turns each into one
  line saying what to do; the CLI exits 2 with it, as for any other user error;
* bugs. `write_crash_log` saves the traceback to a file, so the user sees one line with the
  file's path (to attach to a bug report) instead of a screenful of frames; the CLI exits 1.

Deliberately free of torch imports: it runs in `--help`-fast paths and looks up torch's
exception types only when torch was loaded by the failing command anyway.
"""

from __future__ import annotations

import datetime
import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator, Optional, Sequence

# Every recipe setting that lowers training memory, most effective first.
MEMORY_SETTINGS = (
    "training.batch_size (raise training.gradient_accumulation_steps to keep the batch)",
    "data.max_length",
    "training.gradient_checkpointing=true",
    "training.checkpoint_offload=true",
    "model.quantization=4bit",
    "training.max_memory_gib",
)
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during, innermost last."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom))


def _full_disk(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in FULL_DISK:
        return True
    # safetensors (SafetensorError) and torch.save (RuntimeError) report the OS error in words only
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _torch_write_failed(exc: BaseException) -> bool:
    """torch.save reports a failed write (a full disk among others) in its C++ writer's words
    only: "unexpected pos N vs M" raised during "basic_ios::clear: iostream error" (measured on
    a full tmpfs, torch 2.13), or "PytorchStreamWriter failed writing file ...: file write failed"."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "file write failed" in text
        or "iostream error" in text
        or ("inline_container.cc" in text and "unexpected pos" in text)
    )


def _where(exc: BaseException) -> str:
    name = getattr(exc, "filename", None)
    return f" writing {name}" if name else ""


def _after_train(checkpoint: Optional[Path]) -> str:
    """What a failed `train` leaves to continue from: only what is on disk (`checkpoint`: its
    newest complete checkpoint, None when it has none)."""
    if checkpoint is None:
        return "; no complete checkpoint was saved: free space, then run it again"
    return f"; {checkpoint} is complete: free space, then continue with training.resume=true"


def explain(exc: BaseException, command: Optional[str] = None, checkpoint: Optional[Path] = None) -> Optional[str]:
    """One line for a failure the user fixes by a setting or by freeing a resource; None when
    `exc` is not one (a bug, for the crash log). `checkpoint`: for `train`, the run's newest
    complete checkpoint (None: it has none)."""
    for e in _chain(exc):
        if _is_out_of_memory(e):
            where = "GPU" if type(e).__name__ == "OutOfMemoryError" else "host"
            first = (str(e).splitlines() or [""])[0][:160]
            return f"out of {where} memory ({first or type(e).__name__}); settings that lower memory: " + "; ".join(
                MEMORY_SETTINGS
            )
        if _full_disk(e):
            then = _after_train(checkpoint) if command == "train" else "; free space and run it again"
            return f"no space left on the device{_where(e)}{then}"
        if _torch_write_failed(e):
            then = _after_train(checkpoint) if command == "train" else "; free space and run it again"
            return f"writing a file failed ({(str(e).splitlines() or [''])[-1].strip()[:120]}); is the disk full?{then}"
        if isinstance(e, OSError) and e.errno in READ_ONLY:
            name = getattr(e, "filename", None) or "a file"
            return f"{os.strerror(e.errno).lower()}: {name}; fix its permissions or choose another location"
    return None


def log_dir() -> Path:
    """$XDG_STATE_HOME/peftchat/crash (default ~/.local/state/peftchat/crash)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "peftchat" / "crash"


def _cache_log_dir() -> Path:
    """$XDG_CACHE_HOME/peftchat/crash (default ~/.cache/peftchat/crash): the fallback, still the user's own."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "peftchat" / "crash"


def write_crash_log(exc: BaseException, argv: Sequence[str]) -> Optional[Path]:
    """Write the command line and the traceback of `exc` to a new file; its path, or None when no
    location was writable. Tries the XDG state dir, then the XDG cache dir: never a shared /tmp,
    since the command line and the frames may name private paths or values. The file is new
    (O_EXCL: nothing of the user's is ever written over) and readable by its owner only (0600)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = f"peftchat {' '.join(argv)}\npython {sys.version.split()[0]}\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )
    for root in (log_dir(), _cache_log_dir()):
        for n in range(100):
            path = root / f"crash-{stamp}-{os.getpid()}{f'-{n}' if n else ''}.log"
            try:
                root.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except (
                OSError,
                ValueError,
                UnicodeError,
            ):  # UnicodeError: a non-UTF-8 path; ValueError: a path with a NUL byte in $XDG_STATE_HOME
                break
            try:
                with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                    f.write(text)
            except OSError:  # a full disk: try the next place
                path.unlink(missing_ok=True)
                break
            return path
    return None


def crash_line(exc: BaseException, log: Optional[Path]) -> str:
    """The one line a bug gets: what it was, and where the traceback is."""
    first = (str(exc).splitlines() or [""])[0][:200]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    where = f"traceback in {log}" if log is not None else "no writable place for a crash log"
    return f"internal error ({what}); {where}; please report it"

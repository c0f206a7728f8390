"""Paths: telling a local path from a hub id (models, tokenizers, data sets); output locations we can
write; outputs that never collide with a command's inputs; output files replaced atomically; temp
files under one recognisable name (`.peftchat-tmp-PID-*`) that a later run cleans."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from peftchat.errors import UserError


def looks_local(source: str) -> bool:
    """A path the user meant as local (absolute, ./relative, ~, nested, or existing) rather than
    a hub id of the form `org/name`, so a missing one is reported instead of sent to the hub."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """UserError unless `path` is a directory, or can become one, that this process can write:
    checked before any slow work, so a bad output location costs nothing. Probes by creating a
    file (os.access says yes to root on a read-only dir); creates nothing that stays."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be created: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".peftchat-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"{what} {path} is not writable ({e.strerror} in {existing}); choose another location"
        ) from None


# ------------------------------------------------------------------------------ outputs vs inputs


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _same(a: Path, b: Path) -> bool:
    """One file or dir under two names: a symlink or a hard link counts (samefile), and so does a
    path that does not exist yet but resolves to the other."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolved(a) == _resolved(b)


def _holds(outer: Path, inner: Path) -> bool:
    """`inner` lies somewhere under the dir `outer` (after symlinks)."""
    return _resolved(outer) in _resolved(inner).parents


def _collision(out: Path, inp: Path) -> str | None:
    """How writing `out` would overwrite `inp`, or None."""
    if _same(out, inp):
        return "the same path"
    if _holds(out, inp):
        return "it lies inside the output"
    # An existing file a loader reads from an input dir (weights, configs, tokenizer files) is
    # part of that input; other files there (an earlier eval.json, a plot) are not.
    if inp.is_dir() and out.is_file() and _holds(inp, out) and _loaded_from_dir(out.name):
        return "the output is one of its files"
    return None


_LOADED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".jinja", ".yaml", ".yml", ".txt", ".gguf")
_LOADED_JSON = (
    "config.json",
    "tokenizer.json",
    "_map.json",
    "tokens.json",
    "vocab.json",
    "checksums.json",
    "index.json",
    "state.json",
    "summary.json",
)


def _loaded_from_dir(name: str) -> bool:
    """A file name transformers / peft / peftchat read when they load a model, adapter or checkpoint dir."""
    return name.endswith(_LOADED_SUFFIXES) or name.endswith(_LOADED_JSON) or name == "complete"


def check_outputs(
    outputs: Sequence[tuple[str, str | os.PathLike | None]], inputs: Sequence[tuple[str, str | os.PathLike | None]]
) -> None:
    """UserError, one line naming both paths, when an output (flag or key, path) is, holds, or
    replaces a file of one of the command's inputs, or collides with another output. Called
    before anything is loaded; inputs that do not exist locally (hub ids) are left out."""
    outs = [(label, Path(p).expanduser()) for label, p in outputs if p is not None and str(p) != ""]
    ins = [(label, Path(p).expanduser()) for label, p in inputs if p is not None and str(p) != ""]
    ins = [(label, p) for label, p in ins if p.exists()]
    for i, (olabel, out) in enumerate(outs):
        for ilabel, inp in ins + outs[i + 1 :]:
            how = _collision(out, inp)
            if how is not None:
                raise UserError(
                    f"{olabel} {out} would overwrite {ilabel} {inp} ({how}); "
                    f"peftchat never writes over its inputs: choose another {olabel}"
                )


# ------------------------------------------------------------------------------ atomic output files

TEMP_PREFIX = ".peftchat-tmp-"  # every temp file or dir a command leaves beside its output while it runs
_TEMP_RE = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-[0-9a-f]{{8}}-")


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh hidden name beside `target`, naming this process (so a later run can tell a dead
    writer's leftovers) and keeping `target`'s suffix (matplotlib picks the format by it)."""
    target = Path(target)
    return target.parent / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete `.peftchat-tmp-PID-*` files and dirs in `folder` whose process is gone (a command
    killed mid-write); returns them. Those of live processes stay."""
    from peftchat.dirswap import pid_alive

    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        m = _TEMP_RE.match(path.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def check_new_file(path: str | os.PathLike, flag: str, force: bool) -> None:
    """UserError, before any slow work, unless `path` can take a new file: not a dir, its dir
    writable, and not an existing file unless `force`."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory; expected a file path")
    if _is_stream(target):
        return
    if (target.exists() or target.is_symlink()) and not force:
        raise UserError(f"{flag} {path} exists; pass --force to replace it")
    check_writable_dir(target.parent, f"{flag} {path}: its directory")


def _is_stream(target: Path) -> bool:
    """/dev/stdout, /dev/null, a FIFO: written in place, as a stream (there is no file to replace)."""
    return target.exists() and not target.is_file() and not target.is_dir()


def _fsync_path(path: Path, is_dir: bool = False) -> None:
    """Flush `path` to disk. A file's error (a full disk found at flush time) is raised; a dir's
    is not: some filesystems cannot sync a dir, and the rename is atomic all the same."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def _publish(tmp: Path, target: Path, flag: str, force: bool) -> None:
    if force:
        os.replace(tmp, target)
        return
    # Without --force, link() refuses an existing name atomically: a file that appeared while
    # this command ran is never replaced (os.replace would).
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise UserError(
            f"{flag} {target} appeared while this command ran; nothing replaced (pass --force to replace it)"
        ) from None
    except OSError:  # a filesystem without hard links: the check and the rename are two steps
        if target.exists():
            raise UserError(f"{flag} {target} exists; pass --force to replace it") from None
        os.replace(tmp, target)
        return
    tmp.unlink()


@contextmanager
def atomic_output(path: str | os.PathLike, flag: str, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path` to write the whole output to; on success it is fsynced and
    renamed onto `path` (an existing file only with `force`), so a kill or a full disk leaves the
    previous file as it was. On failure the temp file goes."""
    target = Path(path).expanduser()
    if _is_stream(target):
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = temp_path(target)
    try:
        yield tmp
        _fsync_path(tmp)
        _publish(tmp, target, flag, force)
        _fsync_path(target.parent, is_dir=True)
    finally:
        tmp.unlink(missing_ok=True)

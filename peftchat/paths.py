"""Paths: telling a local path from a hub id (models, tokenizers, data sets); output locations we can write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
        raise UserError(f"{what} {path} is not writable ({e.strerror} in {existing}); choose another location") from None

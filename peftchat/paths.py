"""Telling a local path from a hub id, for models, tokenizers and data sets alike."""

from __future__ import annotations

from pathlib import Path


def looks_local(source: str) -> bool:
    """A path the user meant as local (absolute, ./relative, ~, nested, or existing) rather than
    a hub id of the form `org/name`, so a missing one is reported instead of sent to the hub."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1

"""The recipes shipped inside the package: listed, shown and copied by name, and found by name.

The one copy of the recipes is the repository's `recipes/`; `peftchat/recipes` is a committed
symlink to it, which setuptools follows, so the sdist and the wheel carry the files themselves.
A recipe argument names a shipped recipe (`demo` or `demo.yaml`) only when no file of that name
exists: a file always wins, and a line on stderr says which one was used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from peftchat.errors import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"
SUFFIX = ".yaml"


def shipped_names() -> list[str]:
    """Names of the shipped recipes (file names without `.yaml`), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob(f"*{SUFFIX}"))


def shipped_path(name: str) -> Path | None:
    """The shipped recipe `name` (with or without `.yaml`), or None when it is not a bare name of one."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    path = RECIPES_DIR / f"{stem}{SUFFIX}"
    return path if path.is_file() else None


def summary(path: Path) -> str:
    """The recipe's one-line description: the first line of its header comment."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            return text
    return ""


def resolve_recipe_name(arg: str | os.PathLike, what: str = "recipe") -> Path:
    """The file a recipe argument means: the file of that name when there is one, else the shipped
    recipe of that name (either way with a line on stderr when both could be meant), else the path
    as given (so the caller's 'not found' names it)."""
    path = Path(arg).expanduser()
    shipped = shipped_path(str(arg))
    if shipped is None:
        return path
    if path.exists():
        if path.resolve() != shipped.resolve():
            _say(f"{what} {arg}: using {path.resolve()} (it exists here), not the shipped recipe {shipped.stem}")
        return path
    _say(f"{what} {arg}: using the shipped recipe {shipped}")
    return shipped


def _say(message: str) -> None:
    # stderr: `peftchat config`'s stdout is the recipe itself
    print(f"peftchat: {message}", file=sys.stderr, flush=True)


def require(name: str) -> Path:
    """The shipped recipe `name`, or a UserError listing the names there are."""
    path = shipped_path(name)
    if path is None:
        raise UserError(f"no shipped recipe named '{name}'; shipped: {', '.join(shipped_names())}")
    return path


def copy_recipe(name: str, dest: str | os.PathLike | None = None) -> Path:
    """Write an editable copy of a shipped recipe to `dest` (a file, or a dir to put `NAME.yaml`
    in; default `./NAME.yaml`). Refuses to write over an existing file."""
    source = require(name)
    target = Path(dest).expanduser() if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    try:
        # "x": the refusal and the write are one step, so nothing written in between is lost
        with open(target, "x", encoding="utf-8") as f:
            f.write(source.read_text(encoding="utf-8"))
    except FileExistsError:
        raise UserError(f"{target} already exists; not overwriting it (choose another DEST or remove it)") from None
    except FileNotFoundError:
        raise UserError(f"cannot write {target}: its directory {target.parent} does not exist") from None
    return target

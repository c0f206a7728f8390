"""Helpers of tests/reliability: run the CLI in-process, read its one error line, hash a tree
before and after, write a recipe over the user's files."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too) with the sha256 of its bytes; dirs as 'dir',
    symlinks as their target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        else:
            out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def recipe_text(model: Path, t: Path, output_dir: Path | None = None) -> str:
    return (
        f"model: {{path: {model}, dtype: fp32, compute_dtype: fp32}}\n"
        f"adapter: {{r: 4, alpha: 8, dropout: 0.0}}\n"
        f"data: {{train: {t / 'data.jsonl'}, format: messages, collator: chat_template, max_length: 128}}\n"
        f"training: {{device: cpu, output_dir: {output_dir or t / 'run'}, max_steps: 2, save_steps: 1,"
        f" tensorboard: false, gradient_checkpointing: false}}\n"
        f"decoding: {{max_new_tokens: 4, temperature: 0}}\n"
    )


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `peftchat ARGV` run in-process."""
    from peftchat.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one `peftchat: error:` line of stderr (progress notes may come before it); fails on a
    traceback or on more than one error line."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("peftchat: error:")]
    assert len(errors) == 1, err
    return errors[0]

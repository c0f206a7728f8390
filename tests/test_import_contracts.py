"""The layering contract of pyproject.toml ([tool.importlinter]) holds: config → formats → data →
kernels → model → train / infer → cli, lower layers never import infer/train/cli, no import cycles."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = (
    "layers: cli > export > merge > infer > train > model > kernels > data > formats > rundir",
    "the lower layers never import infer, train or cli",
    "no import cycles between sibling modules or packages anywhere in peftchat",
)


def lint(root: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"
    )
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}  # a contract's name on one line
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for name in CONTRACTS:
        assert f"{name} KEPT" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "peftchat", tmp_path / "peftchat", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "peftchat" / "formats" / "samples.py", "a", encoding="utf-8") as fh:
        fh.write("\nfrom peftchat.infer import decoding  # noqa: E402,F401\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    for name in CONTRACTS:
        assert f"{name} BROKEN" in result.stdout

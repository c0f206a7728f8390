"""Project rule: no function in peftchat/ over 80 lines (split it into named steps instead)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peftchat"
MAX_LINES = 80


def test_no_function_over_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long

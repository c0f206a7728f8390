"""Issue 29 item 8: no traceback anywhere, names that are not UTF-8 included (the crash-log writer
itself failed on one): one line, exit 2, nothing created; a bug's crash log is written whatever
bytes its command line holds."""

import os

import pytest
from untouched import DEMO_RECIPE, digest, one_line_error, peftchat

from peftchat.cli import main
from peftchat.failures import write_crash_log

BAD = os.fsdecode(b"out\xff")  # how Python hands over a byte that is not UTF-8 (as \udcff)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", str(DEMO_RECIPE), f"training.output_dir={BAD}"],
            "override 'training.output_dir=out\\xff' is not UTF-8 text; recipes and the run's recipe.yaml are UTF-8, "
            "so use a UTF-8 name",
        ),
        (
            ["tiny-model", BAD],
            "argument 'out\\xff' is not UTF-8 text; peftchat reads and writes UTF-8 names only: rename it",
        ),
        (["data", "dump", str(DEMO_RECIPE), "--out", f"{BAD}.jsonl"], "argument 'out\\xff.jsonl' is not UTF-8 text"),
        (["plot", "run", "--out", f"{BAD}.png"], "argument 'out\\xff.png' is not UTF-8 text"),
    ],
)
def test_a_name_that_is_not_utf8_is_one_line(tmp_path, argv, message):
    # the real command line of a fresh process: bytes reach Python as the OS gives them
    line = one_line_error(peftchat(*argv, cwd=tmp_path, env={"XDG_STATE_HOME": str(tmp_path / "state")}))
    assert line.startswith("peftchat: error: ") and message in line
    assert list(tmp_path.iterdir()) == []  # no output, no crash log


def test_a_bug_with_such_a_name_still_gets_its_crash_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr("peftchat.config.recipe_to_yaml", _fail(RuntimeError(f"cannot open {BAD}")))
    before = digest(DEMO_RECIPE)
    assert main(["config", str(DEMO_RECIPE), "name=x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error (RuntimeError: cannot open out\\udcff); traceback in " in err
    (log,) = (tmp_path / "state").rglob("crash-*.log")
    text = log.read_text(encoding="utf-8")
    assert "cannot open out\\udcff" in text and "Traceback (most recent call last)" in text
    assert digest(DEMO_RECIPE) == before


def test_the_crash_log_writer_takes_any_text(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    try:
        raise ValueError("lone \ud800 and escaped \udcff")
    except ValueError as e:
        path = write_crash_log(e, ["train", BAD])
    assert path is not None and path.parent == tmp_path / "peftchat" / "crash"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("peftchat train out\\udcff\n") and "lone \\ud800 and escaped \\udcff" in text


def _fail(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail

"""Each recipe key is declared once (peftchat/config.py `key(...)`); validation, the resume rules,
`peftchat config --explain` and the README's table come from that declaration."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from peftchat import config
from peftchat.cli import main
from peftchat.config import KEYS, RESUME_POLICIES, ConfigError, key, recipe_from_dict
from peftchat.train.resume import key_kind

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"path": "m"}, "data": {"train": "x.jsonl"}}


def test_the_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == config.readme_with_table(readme), (
        "README's recipe-key table is out of date: python -m peftchat.config --update-readme README.md"
    )


def test_every_key_has_a_doc_and_a_resume_policy():
    assert len(KEYS) > 80
    for name, info in KEYS.items():
        assert info.spec.doc.strip() and "\n" not in info.spec.doc, name
        assert info.spec.resume in RESUME_POLICIES, name
        assert key_kind(name) == info.spec.resume, name


def test_a_field_declared_without_key_is_refused():
    @dataclass
    class Section:
        declared: int = key(1, "a key", range=config.POSITIVE)
        bare: int = 2

    with pytest.raises(TypeError, match="bare is not declared with config.key"):
        config._declared_keys(Section)
    with pytest.raises(ValueError, match="resume policy"):
        key(1, "a key", resume="sometimes")


@pytest.mark.parametrize("name", sorted(config.CHOICES))
def test_a_value_outside_the_declared_choices_names_the_key(name):
    bad = "zz-not-a-choice"
    with pytest.raises(ConfigError, match=rf"^'{name}' is '{bad}'; expected one of {config.CHOICES[name][0]}, "):
        recipe_from_dict(MINIMAL, [f"{name}={bad}"])


@pytest.mark.parametrize("name", sorted(config.RANGES))
def test_a_value_outside_the_declared_range_names_the_key(name):
    allowed = config.RANGES[name]
    info = KEYS[name]
    outside = allowed.low - 1 if allowed.low is not None else allowed.high + 1
    value = int(outside) if "int" in info.type else float(outside)
    with pytest.raises(ConfigError, match=re.escape(f"'{name}' must be {allowed}, got {value}")):
        recipe_from_dict(MINIMAL, [f"{name}={value}"])


def test_checks_normalize_the_spellings():
    r = recipe_from_dict(MINIMAL, ["training.fused_lora=TRUE", "training.fused_kernels=false", "training.resume=true"])
    assert r.training.fused_lora is True and r.training.fused_kernels is False and r.training.resume is True
    with pytest.raises(ConfigError, match="^'training.fused_lora' is 'maybe'; expected one of auto, true, false"):
        recipe_from_dict(MINIMAL, ["training.fused_lora=maybe"])


def test_explain_one_key(capsys):
    assert main(["config", "--explain", "training.lr"]) == 0
    out = capsys.readouterr().out
    assert "training.lr\n    peak learning rate\n    type float; default 0.0002; allowed > 0; on resume: trained" in out
    assert "training.batch_size" not in out


def test_explain_a_section_with_a_recipe_shows_its_values(capsys):
    assert main(["config", "demo", "decoding.temperature=0.25", "--explain", "decoding"]) == 0
    out = capsys.readouterr().out
    assert "decoding.temperature = 0.25\n    sampling temperature; 0 = greedy\n" in out
    assert out.count("\ndecoding.") == len([k for k in KEYS if k.startswith("decoding.")])
    assert "training.lr" not in out
    assert main(["config", "demo", "training.lr=0.003", "--explain", "training.lr"]) == 0
    assert "training.lr = 0.003\n" in capsys.readouterr().out


def test_explain_everything_and_the_markdown_table(capsys):
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name}\n" in out for name in KEYS)
    assert main(["config", "--explain", "--markdown"]) == 0
    assert capsys.readouterr().out == config.markdown_table()


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["config", "--explain", "training.lrr"],
            "peftchat: error: --explain: unknown key 'training.lrr' (did you mean 'training.lr'?); "
            "`peftchat config --explain` lists them all",
        ),
        (["config"], "peftchat: error: config: give a recipe to print, or --explain [KEY] to describe the recipe keys"),
    ],
)
def test_explain_mistakes_are_one_line(capsys, argv, line):
    assert main(argv) == 2
    assert capsys.readouterr().err == line + "\n"

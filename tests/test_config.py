"""Recipes: inheritance, overrides, interpolation, and one clear error per kind of mistake."""

from pathlib import Path

import pytest

from peftchat.cli import main
from peftchat.config import load_recipe, recipe_from_dict, recipe_to_yaml
from peftchat.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    write(
        tmp_path / "base" / "root.yaml",
        "model:\n  path: some/model\n  quantization: 4bit\n"
        "data:\n  train: a.jsonl\ntraining:\n  lr: 1.0e-4\n  batch_size: 2\n",
    )
    write(
        tmp_path / "mid.yaml",
        "extends: base/root.yaml\ntraining:\n  batch_size: 8\n  output_dir: runs/${model.quantization}-r${adapter.r}\n",
    )
    return write(tmp_path / "leaf.yaml", "extends: mid.yaml\nadapter:\n  r: 4\n")


def test_extends_chain_overrides_and_interpolation(chain: Path) -> None:
    r = load_recipe(chain, ["training.lr=3e-4", "adapter.target_modules=[q_proj,v_proj]"])
    assert r.model.path == "some/model" and r.model.quantization == "4bit"  # from the root
    assert r.training.batch_size == 8  # mid overrides root
    assert r.adapter.r == 4  # leaf
    assert r.training.lr == pytest.approx(3e-4)  # command line beats every file
    assert r.adapter.target_modules == ["q_proj", "v_proj"]
    assert r.training.output_dir == "runs/4bit-r4"  # interpolation across files, after merge
    assert r.training.gradient_accumulation_steps == 1  # schema default


def test_config_command_prints_resolved_recipe(chain: Path, capsys) -> None:
    assert main(["config", str(chain), "training.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "batch_size: 8" in out and "output_dir: runs/4bit-r4" in out
    assert "extends" not in out


def test_asset_resolver_points_into_package() -> None:
    r = recipe_from_dict({"model": {"path": "m"}, "data": {"train": "${asset:demo/x.jsonl}"}})
    assert Path(r.data.train).parts[-3:] == ("assets", "demo", "x.jsonl")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.lrr=1"], "unknown key 'training.lrr' (did you mean 'training.lr'?)"),
        (["lr=1"], "unknown key 'lr' (did you mean 'training.lr'?)"),
        (["training.batch_size=abc"], "wrong value for 'training.batch_size'"),
        (
            ["model.quantization=4bits"],
            "'model.quantization' is '4bits'; expected one of none, 8bit, 4bit (did you mean '4bit'?)",
        ),
        (["training.batch_size=0"], "'training.batch_size' must be > 0"),
        (["nonsense"], "override 'nonsense' is not of the form key=value"),
    ],
)
def test_override_errors(chain: Path, overrides, message) -> None:
    with pytest.raises(ConfigError) as e:
        load_recipe(chain, overrides)
    assert message in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "model:\n  path: m\n  quantisation: 4bit\ndata:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    assert str(bad) in str(e.value)
    assert "unknown key 'model.quantisation' (did you mean 'model.quantization'?)" in str(e.value)


def test_wrong_type_in_parent_names_the_parent(tmp_path: Path) -> None:
    parent = write(tmp_path / "p.yaml", "training:\n  max_steps: many\n")
    child = write(tmp_path / "c.yaml", "extends: p.yaml\nmodel:\n  path: m\ndata:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(child)
    assert str(parent) in str(e.value) and "'training.max_steps'" in str(e.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_missing_parent_file(tmp_path: Path) -> None:
    child = write(tmp_path / "c.yaml", "extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="extends 'gone.yaml', which is not found"):
        load_recipe(child)


def test_circular_extends(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"circular 'extends': .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_required_key(tmp_path: Path) -> None:
    r = write(tmp_path / "r.yaml", "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError, match="required key 'model.path' is not set"):
        load_recipe(r)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    r = write(tmp_path / "r.yaml", "model:\n  path: m\n data: [\n")
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: invalid YAML"):
        load_recipe(r)


def test_section_given_a_scalar(tmp_path: Path) -> None:
    r = write(tmp_path / "r.yaml", "model: llama\n")
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        load_recipe(r)


@pytest.mark.parametrize(
    "args, message",
    [
        (["config", "missing.yaml"], "recipe file not found"),
        (["train", "missing.yaml"], "recipe file not found"),
        (["config", "RECIPE", "training.nope=1"], "unknown key 'training.nope'"),
        (["config", "RECIPE", "--bogus"], "unrecognized argument(s): --bogus"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(chain: Path, capsys, args, message) -> None:
    args = [str(chain) if a == "RECIPE" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_round_trip_yaml_reloads_identically(chain: Path, tmp_path: Path) -> None:
    r = load_recipe(chain)
    saved = write(tmp_path / "saved.yaml", recipe_to_yaml(r))
    assert load_recipe(saved) == r


def test_yaml_spellings_become_real_types_and_overrides_have_one_parser():
    from peftchat.config import is_override, parse_overrides, recipe_from_dict

    base = {"model": {"path": "m"}, "data": {"train": "x.jsonl"}}
    for given, want in [("true", True), ("False", False), (True, True), ("ckpt/checkpoint-4", "ckpt/checkpoint-4")]:
        assert recipe_from_dict({**base, "training": {"resume": given}}).training.resume == want
    with pytest.raises(ConfigError, match="training.resume"):
        recipe_from_dict({**base, "training": {"resume": 3}})
    assert parse_overrides(["training.lr=1e-3", "data.train=[a, b]"]) == {
        "training": {"lr": 1e-3},
        "data": {"train": ["a", "b"]},
    }
    assert is_override("a.b=1") and not is_override("--flag=1") and not is_override("=1") and not is_override("word")
    r = recipe_from_dict(base, ["training.resume=true", "training.fused_kernels=false"])
    assert r.training.resume is True and r.training.fused_kernels is False

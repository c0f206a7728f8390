"""Numeric ranges (config.RANGES) and duplicate recipe keys."""

from pathlib import Path

import pytest

from peftchat.config import RANGES, SCHEMA_KEYS, Range, load_recipe, range_error
from peftchat.errors import ConfigError


def test_every_numeric_key_of_the_schema_has_a_range():
    numeric = {
        k
        for k, t in SCHEMA_KEYS.items()
        if isinstance(t, str) and t.removeprefix("Optional[").rstrip("]") in ("int", "float")
    }
    assert numeric - RANGES.keys() == set(), "add the new numeric keys to config.RANGES"
    assert RANGES.keys() <= SCHEMA_KEYS.keys()


def test_schema_defaults_are_inside_their_ranges(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model: {path: m}\ndata: {train: x}\n", encoding="utf-8")
    load_recipe(r)  # raises on a default outside its range


@pytest.mark.parametrize(
    "value, inside", [(0.0, False), (1e-9, True), (1.0, True), (1.0001, False), (float("nan"), False)]
)
def test_range_bounds(value, inside):
    assert (value in Range(0, 1, low_open=True)) is inside


@pytest.mark.parametrize(
    "value, ok", [(0, True), (0.1, True), (0.999, True), (1, True), (7, True), (7.0, True), (2.5, False), (-0.1, False)]
)
def test_eval_split_is_a_share_or_a_whole_count(value, ok):
    assert (range_error("data.eval_split", value) is None) is ok


def test_duplicate_key_in_a_parent_recipe_names_the_parent(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("training:\n  lr: 1.0e-4\n  batch_size: 2\n  lr: 1.0e-3\n", encoding="utf-8")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\nmodel: {path: m}\ndata: {train: x}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"base.yaml:4: duplicate key 'lr' \(first set on line 2\)"):
        load_recipe(tmp_path / "r.yaml")


def test_yaml_merge_keys_may_still_be_overridden():
    """`<<: *anchor` then a key of the anchor is YAML's override, not a duplicate."""
    import yaml

    from peftchat.config import _UniqueKeyLoader

    data = yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n", Loader=_UniqueKeyLoader)
    assert data["b"] == {"x": 3, "y": 2}

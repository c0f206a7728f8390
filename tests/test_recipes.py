"""Every shipped recipe loads, validates, and names a collator that matches its data format."""

from pathlib import Path

import pytest

from peftchat.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "demo_chatglm.yaml", "demo_qlora.yaml", "llama3_8b_qlora_moss.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path: Path) -> None:
    r = load_recipe(path)
    assert r.model.path and r.data.train and r.training.output_dir
    if r.data.format == "moss":
        assert r.data.collator in ("moss", "chatglm")
    if path.name.startswith("demo"):
        # Demo recipes must run on a CPU-only machine from shipped assets.
        assert r.training.device == "cpu"
        train = [r.data.train] if isinstance(r.data.train, str) else r.data.train
        assert all(Path(t).is_file() for t in train), train

"""Issue 29 item 7: a recipe value read from the environment (`${oc.env:VAR}`: how a recipe passes a
token) is saved as the interpolation, never as the secret, in recipe.yaml of the run and of every
checkpoint; the run still resumes and the saved recipe still loads (reading the variable again)."""

from pathlib import Path

from untouched import DEMO_RECIPE, digest

from peftchat.cli import main
from peftchat.config import load_recipe

SECRET = "hf_s3cr3t-T0KEN-do-not-save"


def _recipe(tmp_path, tiny_llama_dir):
    path = tmp_path / "secret.yaml"
    path.write_text(
        f"extends: {DEMO_RECIPE}\n"
        'description: "pulls with ${oc.env:PEFTCHAT_TEST_TOKEN}"\n'
        "name: ${oc.env:PEFTCHAT_TEST_NAME,demo}\n"
        f"model:\n  path: {tiny_llama_dir}\n",
        encoding="utf-8",
    )
    return path


def test_env_secret_never_reaches_the_run_dir(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTCHAT_TEST_TOKEN", SECRET)
    recipe, out = _recipe(tmp_path, tiny_llama_dir), tmp_path / "run"
    user = digest(recipe)
    args = [
        "train",
        str(recipe),
        f"training.output_dir={out}",
        "training.device=cpu",
        "training.tensorboard=false",
        "training.max_steps=2",
        "training.save_steps=1",
        "training.eval_steps=0",
    ]
    assert main(args) == 0
    assert main([*args, "training.max_steps=3", "training.resume=true"]) == 0  # re-reads the saved recipe
    saved = [out / "recipe.yaml", *sorted(out.glob("checkpoint-*/recipe.yaml"))]
    assert len(saved) == 3  # the final outputs and checkpoints 2, 3 (save_total_limit 2)
    for path in saved:
        text = path.read_text()
        assert "description: pulls with ${oc.env:PEFTCHAT_TEST_TOKEN}" in text, path
        assert "name: ${oc.env:PEFTCHAT_TEST_NAME,demo}" in text, path
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert load_recipe(out / "recipe.yaml").description == f"pulls with {SECRET}"
    assert digest(recipe) == user
    capsys.readouterr()
    # `peftchat config` prints the resolved recipe (cli_contract.md): on the user's terminal, not in a file
    assert main(["config", str(recipe)]) == 0
    assert f"description: pulls with {SECRET}" in capsys.readouterr().out


def test_a_key_set_after_loading_is_saved_as_set(tmp_path, monkeypatch):
    from peftchat.config import recipe_to_yaml

    monkeypatch.setenv("PEFTCHAT_TEST_TOKEN", SECRET)
    recipe = load_recipe(_recipe(tmp_path, Path("unused")))
    recipe.description = "replaced"  # as merge rewrites a recipe: the value is no longer the environment's
    text = recipe_to_yaml(recipe)
    assert "description: replaced" in text and SECRET not in text

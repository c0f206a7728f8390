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


# ---- shipped recipes by name (peftchat.shipped_recipes, `peftchat recipes`)

import os
import re
import shutil
import subprocess
import sys
import zipfile

from peftchat.cli import main
from peftchat.errors import ConfigError
from peftchat.shipped_recipes import RECIPES_DIR, shipped_names, summary

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_recipes_are_the_repository_recipes() -> None:
    # one copy: the package's recipes dir is the repository's recipes/, not a second tree
    assert RECIPES_DIR.resolve() == (ROOT / "recipes").resolve()
    assert shipped_names() == [p.stem for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_each_recipe_has_a_one_line_summary(path: Path) -> None:
    line = summary(path)
    assert line == path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
    assert line.endswith(".") and len(line) <= 110, line  # a whole sentence, one line


def test_recipes_lists_each_with_its_summary(capsys) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == shipped_names()
    for line, path in zip(out, RECIPES):
        assert line.endswith(summary(path))


def test_recipes_show_prints_the_file(capsys) -> None:
    assert main(["recipes", "show", "demo_qlora"]) == 0
    assert capsys.readouterr().out == (ROOT / "recipes" / "demo_qlora.yaml").read_text(encoding="utf-8")
    assert main(["recipes", "show", "nope"]) == 2
    assert "no shipped recipe named 'nope'; shipped: chatglm_round_split_lora, demo" in capsys.readouterr().err


def test_recipes_copy_writes_once_and_the_copy_extends_the_shipped_parent(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "demo_chatglm"]) == 0
    copy = tmp_path / "demo_chatglm.yaml"
    assert copy.read_text(encoding="utf-8") == (ROOT / "recipes" / "demo_chatglm.yaml").read_text(encoding="utf-8")
    copy.write_text(copy.read_text(encoding="utf-8") + "# mine\n", encoding="utf-8")
    assert main(["recipes", "copy", "demo_chatglm"]) == 2  # never over an existing file
    assert "demo_chatglm.yaml already exists; not overwriting it" in capsys.readouterr().err
    assert copy.read_text(encoding="utf-8").endswith("# mine\n")
    (tmp_path / "sub").mkdir()
    assert main(["recipes", "copy", "demo.yaml", "sub"]) == 0 and (tmp_path / "sub" / "demo.yaml").is_file()
    capsys.readouterr()
    # `extends: demo.yaml` has no sibling here: it names the shipped demo, and a line says so
    r = load_recipe("demo_chatglm.yaml", ["training.lr=0.5"])
    assert r.data.collator == "chatglm" and r.model.tiny_if_missing == "llama" and r.training.lr == 0.5
    err = capsys.readouterr().err
    assert f"using {copy} (it exists here), not the shipped recipe demo_chatglm" in err
    assert f"extends demo.yaml: using the shipped recipe {RECIPES_DIR / 'demo.yaml'}" in err


def test_a_file_wins_over_a_shipped_name_and_a_line_says_which(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["config", "demo"]) == 0
    captured = capsys.readouterr()
    assert "name: demo-moss" in captured.out
    assert captured.err == f"peftchat: recipe demo: using the shipped recipe {RECIPES_DIR / 'demo.yaml'}\n"
    Path("demo").write_text("extends: demo.yaml\nname: mine\n", encoding="utf-8")
    assert main(["config", "demo"]) == 0
    captured = capsys.readouterr()
    assert "name: mine" in captured.out and "not the shipped recipe demo" in captured.err
    assert main(["config", "./demo_qlora"]) == 2  # a path is never taken for a name
    err = capsys.readouterr().err
    assert err.startswith("peftchat: error: recipe file not found: ") and err.count("\n") == 1
    assert err.endswith("/demo_qlora (`peftchat recipes` lists the shipped ones)\n")


def test_tiny_if_missing_names_a_tiny_arch(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'model.tiny_if_missing' is 'gpt9'; expected one of llama, qwen2"):
        load_recipe(RECIPES_DIR / "demo.yaml", ["model.tiny_if_missing=gpt9"])


def test_no_tiny_model_is_built_over_a_hub_id(tmp_path, monkeypatch) -> None:
    from peftchat.cli import _build_missing_tiny_model

    monkeypatch.chdir(tmp_path)
    _build_missing_tiny_model(load_recipe("demo", ["model.path=Qwen/Qwen2.5-0.5B"]))
    assert os.listdir(tmp_path) == []


def test_the_demo_runs_from_an_empty_directory(tmp_path, monkeypatch, capsys) -> None:
    """`peftchat train demo` builds its tiny model, writes under ./runs/, and the adapter answers."""
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "train",
            "demo",
            "training.max_steps=2",
            "training.eval_steps=0",
            "training.save_steps=0",
            "training.tensorboard=false",
            "data.max_length=128",
            "data.eval_split=0",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "runs/demo/tiny-llama does not exist; building a random-init tiny llama model there" in err
    assert (tmp_path / "runs/demo/adapter/adapter_model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path / "runs/demo")) == ["adapter", "tiny-llama"]  # no building leftovers
    assert main(["chat", "runs/demo/adapter", "--message", "你好", "--max-new-tokens", "4", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip()


def _version_of_pyproject() -> str:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def test_python_m_peftchat_is_the_script_and_the_version_is_the_metadata(tmp_path) -> None:
    from importlib.metadata import version

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "peftchat", "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout == f"peftchat {version('peftchat')}\n"
    assert version("peftchat") == _version_of_pyproject()
    run = subprocess.run(
        [sys.executable, "-m", "peftchat", "recipes", "copy", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stderr.startswith("peftchat: error: no shipped recipe named 'nope'")


def test_the_wheel_holds_every_recipe_and_asset(tmp_path) -> None:
    """What `pip install peftchat` gets: built from a copy of the tree (no build dirs left in it)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "peftchat", src / "peftchat", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # no build isolation: offline, with the setuptools of the dev extra
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("peftchat-*.whl")
    assert wheel.name.startswith(f"peftchat-{_version_of_pyproject()}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [f"peftchat/recipes/{p.name}" for p in RECIPES]
    assets = [
        f"peftchat/{p.relative_to(ROOT / 'peftchat').as_posix()}"
        for p in (ROOT / "peftchat" / "assets").rglob("*")
        if p.is_file()
    ]
    assert len(assets) >= 6 and {"peftchat/__main__.py", *shipped, *assets} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert re.search(r"^peftchat = peftchat\.cli:main$", zipfile.ZipFile(wheel).read(entry_points).decode(), re.M)

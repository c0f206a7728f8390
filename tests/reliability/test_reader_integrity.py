"""Issue 29.4: every reader verifies what it loads. A run writes `checksums.json` beside its final
outputs (as in every checkpoint) and the `complete` marker last; merge, chat, generate, serve, eval
and export check both before loading: a changed byte, an edited adapter_config.json or a run that
never completed is exit 2, one line naming the file (an unfinished run: its newest intact
checkpoint), and nothing the user owns changes. `--no-integrity-check` loads it anyway.
(Resume's check: tests/train/test_checkpoint_integrity.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_helpers import error_line, run_cli, tree_digest


def _flip_byte(run: Path) -> None:
    f = run / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # same size, one bit of a weight
    f.write_bytes(bytes(data))


def _edit_config(run: Path) -> None:
    f = run / "adapter_config.json"
    config = json.loads(f.read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    f.write_text(json.dumps(config, indent=2))


def _interrupted(run: Path) -> None:
    (run / "complete").unlink()


def _interrupted_newest_checkpoint_damaged(run: Path) -> None:
    (run / "complete").unlink()
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")


# (id, damage, what the line must say; {RUN} = the run dir)
DAMAGES = [
    ("bit-flipped-weights", _flip_byte, "{RUN}: adapter_model.safetensors does not match its checksum"),
    ("edited-adapter-config", _edit_config, "{RUN}: adapter_config.json has"),
    (
        "interrupted-run",
        _interrupted,
        "{RUN} is an unfinished run (no 'complete' marker); use its newest complete checkpoint {RUN}/checkpoint-2",
    ),
    (
        "interrupted-newest-checkpoint-damaged",
        _interrupted_newest_checkpoint_damaged,
        "use its newest complete checkpoint {RUN}/checkpoint-1",
    ),
]

# (id, argv with {T} = the user's dir, {S} = the source)
READERS = [
    ("merge", ["merge", "--adapter", "{S}", "--out", "{T}/merged"]),
    ("chat", ["chat", "{S}", "--message", "hi"]),
    ("generate", ["generate", "{S}", "--in", "{T}/p.jsonl", "--out", "{T}/g.jsonl"]),
    ("serve", ["serve", "{S}", "--port", "1"]),
    ("eval", ["eval", "{S}", "--data", "{T}/p.jsonl"]),
    ("export", ["export", "{S}", "--gguf", "{T}/m.gguf"]),
]


def _world(tmp_path: Path, trained_run: Path) -> Path:
    shutil.copytree(trained_run, tmp_path / "run")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n", encoding="utf-8")
    return tmp_path / "run"


def _fill(argv, t: Path, source: Path):
    return [a.replace("{T}", str(t)).replace("{S}", str(source)) for a in argv]


@pytest.mark.parametrize("reader,argv", READERS, ids=[r[0] for r in READERS])
@pytest.mark.parametrize("damage_id,damage,message", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_or_unfinished_run_is_refused(
    tmp_path, trained_run, capsys, reader, argv, damage_id, damage, message
):
    run = _world(tmp_path, trained_run)
    damage(run)
    before = tree_digest(tmp_path)
    rc, err = run_cli(_fill(argv, tmp_path, run), capsys)
    assert rc == 2, err
    line = error_line(err)
    assert message.replace("{RUN}", str(run)) in line, line
    assert "--no-integrity-check" in line
    assert tree_digest(tmp_path) == before


def test_a_recipe_source_checks_the_run_it_names(tmp_path, trained_run, capsys):
    """chat RECIPE loads the final adapter of training.output_dir: checked the same way."""
    run = _world(tmp_path, trained_run)
    _flip_byte(run)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((run / "recipe.yaml").read_text())
    rc, err = run_cli(["chat", recipe, f"training.output_dir={run}", "--message", "hi"], capsys)
    assert rc == 2, err
    assert f"{run}: adapter_model.safetensors does not match its checksum" in error_line(err)


def test_a_damaged_checkpoint_given_directly_is_refused(tmp_path, trained_run, capsys):
    run = _world(tmp_path, trained_run)
    _flip_byte(run / "checkpoint-1")
    rc, err = run_cli(["chat", run / "checkpoint-1", "--message", "hi"], capsys)
    assert rc == 2, err
    assert f"{run / 'checkpoint-1'}: adapter_model.safetensors does not match its checksum" in error_line(err)


def test_an_intact_run_loads_and_the_opt_out_loads_an_edited_one(tmp_path, trained_run, capsys):
    run = _world(tmp_path, trained_run)
    rc, err = run_cli(["chat", run, "--message", "hi"], capsys)
    assert rc == 0, err
    config = run / "adapter_config.json"
    config.write_text(config.read_text() + "\n")  # edited on purpose (same meaning)
    rc, err = run_cli(["chat", run, "--message", "hi"], capsys)
    assert rc == 2 and "adapter_config.json" in error_line(err)
    rc, err = run_cli(["chat", run, "--message", "hi", "--no-integrity-check"], capsys)
    assert rc == 0, err
    assert "--no-integrity-check: " in err and "used without checking" in err


def test_the_final_outputs_carry_a_manifest_of_every_file(trained_run):
    files = json.loads((trained_run / "checksums.json").read_text())["files"]
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "recipe.yaml",
        "training_summary.json",
        "tokenizer_config.json",
    ):
        assert name in files
    assert "metrics.jsonl" not in files and "complete" not in files  # live / the marker itself


def test_resume_checks_its_checkpoint_and_the_opt_out_resumes_from_it(tmp_path, trained_run, capsys):
    """training.resume=PATH to a changed checkpoint: one line naming the file; with
    --no-integrity-check the run resumes from it (the user edited it on purpose)."""
    run = _world(tmp_path, trained_run)
    state = run / "checkpoint-1" / "trainer_state.json"
    state.write_text(state.read_text() + " ")  # same meaning, other bytes
    argv = [
        "train",
        run / "recipe.yaml",
        f"training.output_dir={run}",
        f"training.resume={run / 'checkpoint-1'}",
        "training.max_steps=3",
    ]
    rc, err = run_cli(argv, capsys)
    assert rc == 2, err
    assert "trainer_state.json" in error_line(err) and "--no-integrity-check" in error_line(err)
    rc, err = run_cli(argv + ["--no-integrity-check"], capsys)
    assert rc == 0, err
    assert (run / "complete").is_file() and (run / "checkpoint-3").is_dir()

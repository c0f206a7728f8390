"""benchmarks.real_data: the real-moss sessions file built from MOSS's own session JSON files, and
the bench's real-moss scenario on the CPU (every variant reads that file through the moss collator)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import real_data

REPO = Path(__file__).resolve().parent.parent


def _turn(i: int, k: int) -> dict:
    return {
        "Human": f"<|Human|>: 问题{i}.{k}：番茄炒蛋怎么做？<eoh>\n",
        "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
        "Commands": "<|Commands|>: None<eoc>\n",
        "Tool Responses": "<|Results|>: None<eor>\n",
        "MOSS": f"<|MOSS|>: 回答{i}.{k}：先炒蛋，再炒番茄，最后一起翻炒。<eom>\n",
    }


def _moss_dir(root: Path, n: int) -> Path:
    for i in range(n):
        folder = root / "conversations" / ("with_plugins" if i % 2 else "without_plugins")
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "conversation_id": i,
            "meta_instruction": "You are MOSS.\n",
            "num_turns": 2,
            "chat": {"turn_1": _turn(i, 1), "turn_2": _turn(i, 2)},
        }
        (folder / f"conversation_{i}.json").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    (root / "user_prompts.json").write_text(json.dumps(["not a session"]), encoding="utf-8")
    return root


def test_builder_writes_every_session_in_path_order_and_a_manifest(tmp_path):
    manifest = real_data.build(_moss_dir(tmp_path / "SFT_data", 4), tmp_path / "out", source="moss@abc")
    lines = (tmp_path / "out" / real_data.MOSS_FILE).read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line)["conversation_id"] for line in lines]
    assert ids == [1, 3, 0, 2]  # with_plugins/ sorts before without_plugins/; the prompts list is no session
    info = manifest["real-moss"]
    assert info["sessions"] == info["samples"] == 4 and info["source"] == "moss@abc"
    assert 0 < info["tokens_median"] <= info["tokens_p90"] <= info["tokens_max"]
    assert json.loads((tmp_path / "out" / real_data.MANIFEST).read_text()) == manifest
    spec = real_data.scenario_data("real-moss", str(tmp_path / "out"))
    assert spec["sessions_format"] == spec["sessions_collator"] == "moss"
    # the peers' samples come from the same file through the same collator as peftchat's rows
    from benchmarks.chat_sessions import sessions_recipe

    recipe = sessions_recipe(
        {**spec, "work_dir": str(tmp_path / "w"), "model_dir": str(tmp_path), "seq": 64, "device": "cpu"}
    )
    assert (recipe.data.format, recipe.data.collator) == ("moss", "moss")
    with pytest.raises(ValueError, match="python -m benchmarks real-data"):
        real_data.scenario_data("real-moss", str(tmp_path / "nowhere"))


def test_bench_real_moss_scenario_on_the_cpu(tmp_path):
    real_data.build(_moss_dir(tmp_path / "SFT_data", 8), tmp_path / "data")
    plan = "real-moss/tiny/nf4/peer:tuned,real-moss/tiny/nf4/peftchat:lean+packing"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "bench",
            "--smoke",
            "--plan",
            plan,
            "--real-data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert set(rows) == {"peer:tuned", "peftchat:lean+packing"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert row["scenario"] == "real-moss" and 0 < row["label_tokens_per_s"] < row["tokens_per_s"]
    assert rows["peer:tuned"]["padded_tokens_per_s"] >= rows["peer:tuned"]["tokens_per_s"]

"""benchmarks.real_data: the real-moss sessions file built from MOSS's own session JSON files, the
real-sharegpt one from a ShareGPT export, and the bench's real-data scenarios on the CPU (every
variant reads the same file through the same collator)."""

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


def _sharegpt_file(path: Path) -> Path:
    """Three real-shaped conversations (one ends on an unanswered question) and one that can't train."""
    rows = [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "番茄炒蛋怎么做？"}, {"from": "gpt", "value": "先炒蛋。"}],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "human", "value": "What is LoRA?"},
                {"from": "gpt", "value": "A low-rank adapter for fine-tuning."},
                {"from": "human", "value": "And QLoRA?"},
                {"from": "gpt", "value": "LoRA over a 4-bit base model."},
                {"from": "human", "value": "继续"},
            ],
        },
        {"id": "c", "conversations": [{"from": "gpt", "value": "no question first"}, {"from": "gpt", "value": "x"}]},
        {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
            "system": "Be brief.",
        },
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_builder_writes_sharegpt_sessions_peftchat_reads_and_keeps_the_moss_entry(tmp_path):
    out = tmp_path / "out"
    real_data.build(_moss_dir(tmp_path / "SFT_data", 2), out, source="moss@abc")
    manifest = real_data.build(None, out, sharegpt=_sharegpt_file(tmp_path / "sg.jsonl"), sharegpt_source="sg@def")
    assert manifest["real-moss"]["sessions"] == 2 and manifest["real-moss"]["source"] == "moss@abc"
    info = manifest["real-sharegpt"]
    assert info["source"] == "sg@def" and info["sessions"] == info["samples"] == 3
    assert 0 < info["tokens_median"] <= info["tokens_p90"] <= info["tokens_max"]
    rows = [json.loads(line) for line in (out / real_data.SHAREGPT_FILE).read_text(encoding="utf-8").splitlines()]
    # file order kept; the unanswered last question cut; the session that opens with gpt left out
    assert [len(r["conversations"]) for r in rows] == [2, 4, 2]
    assert rows[1]["conversations"][-1]["value"] == "LoRA over a 4-bit base model."
    assert rows[2]["system"] == "Be brief." and "id" not in rows[0]
    spec = real_data.scenario_data("real-sharegpt", str(out))
    assert (spec["sessions_format"], spec["sessions_collator"]) == ("sharegpt", "chat_template")
    # the peers' batches: the same file through the chat_template collator, in file order, labels on replies
    from benchmarks.chat_sessions import padded_batches, sessions_recipe, tokenized_samples

    recipe = sessions_recipe(
        {**spec, "work_dir": str(tmp_path / "w"), "model_dir": str(tmp_path), "seq": 512, "device": "cpu"}
    )
    samples = tokenized_samples(recipe)
    assert len(samples) == 3 and len(samples[1]["input_ids"]) > len(samples[0]["input_ids"])
    [batch] = padded_batches(samples, 3, 1, pad_id=0)
    assert batch["real_tokens"] == sum(len(s["input_ids"]) for s in samples) < batch["input_ids"].numel()
    assert 0 < batch["label_tokens"] < batch["real_tokens"]
    # a JSON list reads as well as JSON lines
    as_list = tmp_path / "sg.json"
    as_list.write_text(json.dumps([json.loads(x) for x in (tmp_path / "sg.jsonl").read_text().splitlines()]))
    assert real_data.sharegpt_sessions(as_list) == rows


def test_builder_cli_needs_a_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        real_data.main(["--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--moss, --sharegpt or both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


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
    # real-sharegpt differs from this only in its file and collator, which the builder test runs
    # through the peers' sample path; its training is the chat scenario's (kept to 2 jobs for time)
    jobs = [("real-moss", "peer:tuned"), ("real-moss", "peftchat:lean+packing")]
    plan = ",".join(f"{s}/tiny/nf4/{v}" for s, v in jobs)
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
    results = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    rows = {(r["scenario"], r["variant"]): r for r in results}
    assert set(rows) == set(jobs)
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert 0 < row["label_tokens_per_s"] < row["tokens_per_s"]
    peer = rows[("real-moss", "peer:tuned")]
    assert peer["scenario"] == "real-moss" and peer["padded_tokens_per_s"] >= peer["tokens_per_s"]
    # the sessions are tokenized into one cache for the run, which every job reads, not one per job
    work = tmp_path / "out" / "work"
    assert (work / "hf_cache").is_dir() and not list(work.glob("*/hf_cache"))

"""The benchmark's CPU smoke mode runs every variant path (peer, peftchat's recipe loop) on a
tiny model; speed is not asserted, only that each path trains and the report is written."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke_runs_every_variant_path(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert {r["mode"] for r in rows} == {"nf4", "int8", "bf16"}
    kinds = {r["variant"].split(":")[0] for r in rows}
    assert kinds == {"peer", "peftchat"}
    unsloth = [r for r in rows if r["variant"].startswith("peer:unsloth")]
    assert len(unsloth) == 3 and all("skipped" in r for r in unsloth)  # CUDA only: skipped with a note
    rows = [r for r in rows if r not in unsloth]
    for r in rows:
        assert "error" not in r, (r["mode"], r["variant"], r["error"])
        assert r["tokens_per_s"] > 0 and r["step_s_median"] > 0
        assert r["losses"] and all(math.isfinite(x) and 0 < x < 20 for x in r["losses"])
    # loss gate: every nf4 peftchat row of a scenario with a reference is compared with it; on CPU
    # the eager paths compute the same losses
    gated = [r for r in rows if r["variant"].startswith("peftchat:") and r["mode"] == "nf4"]
    assert gated and all(r["loss_max_rel_diff"] <= 0.01 and not r["gated_out"] for r in gated)
    # chat scenario: real tokens counted (fewer label tokens than tokens), padded peer and packed peftchat
    chat = {r["variant"]: r for r in rows if r["scenario"] == "chat"}
    assert set(chat) == {"peer:tuned", "peftchat:ref+packing", "peftchat:lean+packing"}
    assert all(0 < r["label_tokens_per_s"] < r["tokens_per_s"] for r in chat.values())
    assert chat["peer:tuned"]["padded_tokens_per_s"] >= chat["peer:tuned"]["tokens_per_s"]
    # every peftchat row went through the real loop (its metrics), the peer rows through the peer
    assert all(r.get("timed_steps") == 1 for r in rows if r["variant"].startswith("peftchat:"))
    table = (out / "results.md").read_text()
    assert "| tiny | nf4 | dense | peer:tuned |" in table and "| tiny | bf16 | dense | peftchat:lean |" in table
    assert "| tiny | nf4 | chat | peftchat:lean+packing |" in table
    # `collect` merges run dirs into one results.json (the spec's fields) and one table
    from benchmarks import collect

    merged = tmp_path / "merged"
    merged.mkdir()
    assert collect.main([str(out), "--out", str(merged)]) == 0
    rows = json.loads((merged / "results.json").read_text())["rows"]
    assert len(rows) == len(doc["rows"]) and all({"shape", "mode", "variant", "run"} <= set(r) for r in rows)


def test_flops_per_token_formula_for_the_8b_shape():
    sys.path.insert(0, str(REPO))
    from benchmarks.shapes import flops_per_token, linear_params, shape_dict

    cfg = shape_dict("8b")
    per_layer = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert linear_params(cfg) == 32 * per_layer + 128256 * 4096
    assert flops_per_token(cfg, 2048) == 4 * linear_params(cfg) + 12 * 32 * 2048 * 4096
    assert 33.2e9 < flops_per_token(cfg, 2048) < 33.3e9


def test_a_plan_item_without_a_variant_kind_is_refused_before_any_job_runs(tmp_path):
    """Round 10 wrote `dense/8b/nf4/ref` for `peftchat:ref`: the row failed only when its turn came,
    after the ceiling and the model build, and that run had no loss gate."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "bench",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--plan",
            "dense/tiny/nf4/peftchat:lean,dense/tiny/nf4/ref",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--plan item 'dense/tiny/nf4/ref': expected [scenario/]shape/mode/KIND:VARIANT" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "results.json").exists()

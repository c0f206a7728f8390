"""benchmarks.quality: the FP8-vs-bf16 quality runs through the recipe path, and runs pooled by kind
across reports."""

import json

import pytest

from benchmarks import peftchat_variants, quality


def _report(shape: str, runs: dict[str, tuple[float, float | None]]) -> dict:
    entry = {"shape": shape, "steps": 300, "setting": "lean", "dropout": 0.05, "runs": list(runs) + ["cut#9"]}
    for label, (train, evl) in runs.items():
        entry[label] = {"final_train_loss": train, "eval_loss_bf16_path": evl}
    return {"quality": [entry]}


def test_runs_pool_by_kind_across_reports_and_repeats():
    reports = [
        _report("1b", {"bf16": (1.0, 2.0), "fp8": (1.03, 2.02)}),
        _report("1b", {"fp8": (1.01, 2.04), "bf16#2": (1.2, 2.2), "bf16#3": (1.1, 2.1)}),
        _report("8b", {"bf16": (3.0, 4.0)}),
    ]
    pooled = quality.pooled_runs(reports)
    assert sorted(pooled) == ["1b:300:lean@dropout 0.05", "8b:300:lean@dropout 0.05"]
    one_b = pooled["1b:300:lean@dropout 0.05"]
    assert [r["final_train_loss"] for r in one_b["bf16"]] == [1.0, 1.2, 1.1]  # "cut#9" never finished: absent
    summary = quality.summarize(one_b, "bf16")
    assert summary["bf16"]["n"] == 3 and summary["fp8"]["n"] == 2
    assert summary["bf16"]["train_loss"]["mean"] == pytest.approx(1.1)
    assert summary["bf16"]["train_loss"]["spread_rel"] == pytest.approx(0.2 / 1.1)
    assert summary["fp8"]["train_mean_rel_diff"] == pytest.approx(1.02 / 1.1 - 1)  # signed: FP8 below here
    assert summary["fp8"]["eval_mean_rel_diff"] == pytest.approx(2.03 / 2.1 - 1)
    assert summary["bf16"]["train_mean_rel_diff"] == 0
    # Welch: sqrt(stdev_fp8^2 / 2 + stdev_bf16^2 / 3) / mean_bf16, stdevs 0.01414 and 0.1
    assert summary["fp8"]["train_mean_rel_diff_se"] == pytest.approx((0.0002 / 2 + 0.01 / 3) ** 0.5 / 1.1)


def test_a_missing_reference_leaves_the_diffs_out_and_the_cli_writes_its_summary(tmp_path, capsys):
    summary = quality.summarize({"fp8": [{"final_train_loss": 1.0, "eval_loss_bf16_path": None}]}, "bf16")
    assert summary == {
        "fp8": {
            "n": 1,
            "train_loss": {"mean": 1.0, "stdev": 0.0, "min": 1.0, "max": 1.0, "spread_rel": 0.0},
            "eval_loss": None,
        }
    }
    one_each = quality.summarize({"bf16": [{"final_train_loss": 1.0}], "fp8": [{"final_train_loss": 1.1}]}, "bf16")
    assert (
        one_each["fp8"]["train_mean_rel_diff"] == pytest.approx(0.1)
        and one_each["fp8"]["train_mean_rel_diff_se"] is None
    )
    f = tmp_path / "check_fp8.json"
    f.write_text(json.dumps(_report("1b", {"bf16": (1.0, 2.0), "fp8": (1.05, 2.1)})))
    assert quality.main(["pool", str(f), "--out", str(tmp_path / "s.json")]) == 0
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["summary"]["1b:300:lean@dropout 0.05"]["fp8"]["train_mean_rel_diff"] == pytest.approx(0.05)
    assert json.loads(capsys.readouterr().out) == written


def test_the_bf16_run_turns_fp8_off_whatever_the_options_say():
    options = peftchat_variants.apply_options({}, "fp8rec")["overrides"]
    assert {**options, **quality.QUALITY_BASES["bf16"]}["training.fp8"] is False
    assert {**options, **quality.QUALITY_BASES["fp8"]}["training.fp8"] is True


def test_each_run_trains_with_the_setting_and_its_own_options(tmp_path):
    quality.main(
        [
            "run",
            "--out",
            str(tmp_path / "out"),
            "--work-dir",
            str(tmp_path / "work"),
            "--model-root",
            str(tmp_path / "models"),
            "--shapes",
            "tiny:1",
            "--device",
            "cpu",
            "--runs",
            "peft,fused+skip2",
            "--repeats",
            "2",
            "--batch",
            "2",
            "--seq",
            "64",
            "--eval-sessions",
            "4",
            "--setting",
            "lean+skip1",
        ]
    )
    (result,) = json.loads((tmp_path / "out" / "quality.json").read_text())["quality"]
    assert result["runs"] == ["peft", "fused+skip2", "peft#2", "fused+skip2#2"]
    assert result["reference"] == "peft" and result["peft"]["train_loss_rel_diff"] == 0
    for label in ("peft", "peft#2"):  # skip1: one of the tiny model's two layers left out of checkpointing
        assert "checkpointed 1/2 layers (checkpoint_offload: no GPU, inputs kept in memory)" in result[label]["applied"]
        assert not any(a.startswith("fused_lora") for a in result[label]["applied"])
    for label in ("fused+skip2", "fused+skip2#2"):  # the run's own option comes after the setting's
        assert "checkpointed 0/2 layers (checkpoint_offload: no GPU, inputs kept in memory)" in result[label]["applied"]
        assert "fused_lora:14 layers" in result[label]["applied"]
        assert result[label]["train_loss_rel_diff"] is not None
    assert result["summary"]["peft"]["n"] == result["summary"]["fused+skip2"]["n"] == 2
    assert result["summary"]["peft"]["train_mean_rel_diff"] == 0

"""benchmarks.peftchat_variants.apply_options: a setting's `+options` as the bench and check_fp8's
quality check apply them."""

import pytest

from benchmarks import peftchat_variants
from peftchat.model import fp8, frozen_linear


def test_options_become_recipe_overrides_and_spec_fields():
    spec = peftchat_variants.apply_options({"batch": 4, "overrides": {"training.lr": 1e-4}}, "skip13+mem16+mb2")
    assert spec["overrides"] == {"training.lr": 1e-4, "training.checkpoint_skip_layers": 13,
                                 "training.max_memory_gib": 16.0}
    assert spec["micro_batch"] == 2
    assert peftchat_variants.apply_options({"batch": 4}, "") == {"batch": 4, "overrides": {}}


def test_kernel_ablations_set_their_flags(monkeypatch):
    for module, name in ((fp8, "WEIGHT_TILES"), (fp8, "TRANSPOSE_KERNEL"), (frozen_linear, "TRITON_DEQUANT")):
        monkeypatch.setattr(module, name, True)  # the defaults since round 9; restored after the test
    spec = peftchat_variants.apply_options({}, "fp8elem+bnbdq")
    assert spec["overrides"] == {"training.fp8": True}
    assert (fp8.WEIGHT_TILES, fp8.TRANSPOSE_KERNEL, frozen_linear.TRITON_DEQUANT) == (False, False, False)


def test_an_unknown_option_is_refused():
    with pytest.raises(ValueError, match="unknown peftchat option 'nosuch'"):
        peftchat_variants.apply_options({}, "skip2+nosuch")


def test_the_quality_checks_bf16_run_turns_fp8_off_whatever_the_options_say():
    from benchmarks.check_fp8 import QUALITY_BASES

    options = peftchat_variants.apply_options({}, "fp8tiles")["overrides"]
    assert {**options, **QUALITY_BASES["bf16"]}["training.fp8"] is False
    assert {**options, **QUALITY_BASES["fp8"]}["training.fp8"] is True


def test_the_quality_check_trains_each_run_with_the_settings_and_its_own_options(tmp_path):
    import json

    from benchmarks import check_fp8

    check_fp8.main(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--sections", "quality",
                    "--model-root", str(tmp_path / "models"), "--quality-shapes", "tiny:2", "--device", "cpu",
                    "--quality-runs", "peft,fused+skip2", "--quality-repeats", "2", "--quality-parallel", "2",
                    "--batch", "2", "--seq", "128", "--quality-setting", "lean+skip1"])
    (result,) = json.loads((tmp_path / "out" / "check_fp8.json").read_text())["quality"]
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

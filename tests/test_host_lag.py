"""benchmarks/host_lag.py: its points on a real (tiny, CPU) run; the slack itself needs CUDA."""

import json

from benchmarks import host_lag


def test_points_follow_the_step_in_order(tmp_path):
    assert host_lag.main(["--device", "cpu", "--shape", "tiny", "--seq", "64", "--steps", "3",
                          "--setting", "lean", "--sample", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "host_lag.json").read_text())
    # two checkpointed layers: forward in order, recompute in reverse, then the optimizer
    assert [r["point"] for r in summary["points"]] == ["S", "F0", "F1", "R1", "R0", "O", "P"]
    hosts = [r["host_ms"] for r in summary["points"]]
    assert hosts == sorted(hosts) and hosts[-1] > 0
    assert summary["forward"]["starved_share"] == 1.0  # on the CPU the "GPU" clock is the host's
    assert "| R0 |" in (tmp_path / "host_lag.md").read_text()
    assert "garbage collections" in (tmp_path / "host_lag.md").read_text()
    assert all(c["generation"] in (0, 1, 2) and c["ms"] >= 0 for c in summary["collections"])
    stacks = (tmp_path / "host_lag_stacks.md").read_text()
    assert "peftchat/train/loop.py" in stacks and "innermost frame" in stacks  # the steps were sampled
    assert "write_training_curves" not in stacks  # not the run's wrap-up after the last step

"""benchmarks/fp8_store_bounds.py in Triton's interpreter: the weight kernels store only inside
their outputs, and the check sees a store that does not."""

import pytest
import torch

from benchmarks import fp8_store_bounds as bounds


@pytest.mark.parametrize("kernel", ["rows", "transposed", "rows_tiled", "transposed_tiled", "both"])
def test_weight_kernels_write_all_of_their_output_and_nothing_else(kernel):
    row = bounds.check(96, 320, kernel, "cpu")  # partial tiles on both axes (64 x 128 tiles)
    assert row == {"n": 96, "k": 320, "kernel": kernel, "outside_written": 0, "inside_unwritten": 0,
                   "mismatch": 0, "inputs_changed": 0}


def test_the_check_counts_a_store_past_the_output_and_a_changed_input(monkeypatch):
    real = bounds._launch

    def overrunning(kernel, args, meta, views, n, k):
        real(kernel, args, meta, views, n, k)
        v = views["rows"].view(torch.uint8)
        past = torch.as_strided(v, (3,), (1,), v.storage_offset() + v.numel())  # 3 bytes after the view
        past.fill_(0)
        args[0].view(-1)[0] ^= 1  # one bit of the packed codes

    monkeypatch.setattr(bounds, "_launch", overrunning)
    row = bounds.check(64, 128, "rows", "cpu")
    assert (row["outside_written"], row["inside_unwritten"], row["mismatch"], row["inputs_changed"]) == (3, 0, 0, 1)


def test_shapes_by_name_or_size():
    assert bounds.parse_shapes("8b_k_v,96x320") == {"8b_k_v": (1024, 4096), "96x320": (96, 320)}

"""benchmarks/check_lora_dropout.py: the launch-shape sweep's parsing (the timing itself needs CUDA)."""

import pytest

from benchmarks.check_lora_dropout import parse_sweep
from peftchat.model.lora_dropout import Tiles


def test_sweep_shapes_parse_and_refuse_tiles_off_the_philox_group():
    assert parse_sweep("64x128x4x3,128x64x8x2") == [Tiles(64, 128, 4, 3), Tiles(128, 64, 8, 2)]
    assert parse_sweep("") == []
    with pytest.raises(ValueError, match="multiple of 8"):
        parse_sweep("64x100x4x3")

"""benchmarks/kernel_ptx.py: the LoRA dropout kernels compiled for sm_90 on the CPU (Triton's
compiler and ptxas, no GPU): `down` must load x in 16-byte asynchronous copies, never one bf16
per thread, as it did for a while in round 6 when its column offsets were not provably aligned
(benchmarks/RESULTS.md, round 6). The NF4 -> e4m3 weight kernels: tiled, a fraction of the
per-element loads, and 16-byte stores in every layout; the FP8 kernels divide as torch does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled() -> dict:
    # its own process: tests/conftest.py sets TRITON_INTERPRET, under which kernels cannot be compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_ptx", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {row["kernel"]: row for row in json.loads(out.stdout.strip().splitlines()[-1])}


def test_down_loads_x_through_cp_async_not_one_bf16_per_thread(compiled):
    ins = compiled["down"]["instructions"]
    assert ins["cp.async"] >= 16 and ins["mma"] > 0
    assert "ld.global.b16" not in ins  # the symptom of unaligned column starts (80 per loop step)
    assert ins.get("st.shared.b16", 0) == 0


def test_grad_a_pipelines_its_x_tiles(compiled):
    assert compiled["grad_a"]["instructions"]["cp.async"] > 0 and compiled["grad_a"]["instructions"]["mma"] > 0


def test_instruction_counts_parse_ptx_lines():
    from benchmarks.kernel_ptx import instruction_counts

    ptx = "\tcp.async.cg.shared.global [%r1], [%rd2], 16;\n\tld.global.b16 {%rs1}, [%rd3];\n\tmma.sync.aligned.m16n8k16;\n"
    counts = instruction_counts(ptx)
    assert counts["cp.async"] == 1 and counts["ld.global.b16"] == 1 and counts["mma"] == 1


def _global_loads(row: dict) -> int:
    return sum(n for k, n in row["instructions"].items() if k.startswith("ld.global"))


def test_tiled_weight_kernels_issue_a_fraction_of_the_per_element_loads(compiled):
    # per thread and 64 x 128 tile: the per-element kernels load each code byte and each absmax
    # (code, its code2 entry, absmax2) per element, 336 loads; tiled, 75 (Triton 3.9)
    assert 3 * _global_loads(compiled["nf4_rows_tiled"]) < _global_loads(compiled["nf4_rows"])
    assert 3 * _global_loads(compiled["nf4_transposed_tiled"]) < _global_loads(compiled["nf4_transposed"])
    # the bf16 dequantization (frozen_linear.TRITON_DEQUANT) decodes the same way
    assert 3 * _global_loads(compiled["nf4_dequant"]) < _global_loads(compiled["nf4_rows"])
    for name in ("nf4_rows", "nf4_rows_tiled", "nf4_transposed", "nf4_transposed_tiled", "nf4_dequant"):
        ins = compiled[name]["instructions"]
        assert ins.get("st.global.v4.b32", 0) > 0 and "st.global.b8" not in ins  # 16-byte stores, never a byte each


def test_fp8_kernels_divide_as_torch_does(compiled):
    # Triton's `/` on fp32 compiles to div.full.f32, 2 ulp from IEEE: r24 found 2-3e-5 of the
    # quantized gradients' values unlike torch's on the GPU. tl.math.div_rn is torch's division.
    for name in ("nf4_rows", "nf4_rows_tiled", "nf4_transposed", "nf4_transposed_tiled", "quantize_rows"):
        ins = compiled[name]["instructions"]
        assert ins.get("div.rn.f32", 0) > 0 and "div.full.f32" not in ins and "div.approx.f32" not in ins, name

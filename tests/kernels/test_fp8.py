"""peftchat.kernels.fp8 on CPU (torch._scaled_mm runs there too): scales against a float64 reference,
quantization error within the format's rounding bound, and the two scaled matmuls."""

import pytest
import torch

from peftchat.kernels import fp8, nf4


def _random(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: what per-row scales are for
    t = (
        torch.randn(shape, generator=gen, dtype=torch.float64)
        * torch.logspace(-3, 3, shape[0], dtype=torch.float64)[:, None]
    )
    t[1] = 0.0  # an all-zero row (padding) must not give NaN
    return t.to(torch.bfloat16)


@pytest.mark.parametrize("fp8_dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("dim", [0, 1])
def test_scales_equal_a_float64_reference(fp8_dtype, dim):
    t = _random((24, 40), seed=dim)
    q, scale = fp8.quantize(t, dim, fp8_dtype)
    t64 = t.double()
    ref = t64.abs().amax(dim=dim, keepdim=True).clamp(min=fp8.AMAX_FLOOR) / torch.finfo(fp8_dtype).max
    assert scale.dtype == torch.float32 and scale.shape == ref.shape
    torch.testing.assert_close(scale.double(), ref, rtol=2e-7, atol=0)  # fp32 rounding of the division
    assert q.dtype == fp8_dtype and q.shape == t.shape and torch.isfinite(q.float()).all()


@pytest.mark.parametrize("fp8_dtype", [fp8.E4M3, fp8.E5M2])
def test_quantization_error_is_within_half_a_step(fp8_dtype):
    t = _random((32, 64), seed=3)
    q, scale = fp8.quantize(t, 1, fp8_dtype)
    back, t64 = q.double() * scale.double(), t.double()
    info = torch.finfo(fp8_dtype)
    mantissa_bits = {fp8.E4M3: 3, fp8.E5M2: 2}[fp8_dtype]
    # round to nearest: relative error <= 2^-(m+1) for normal numbers, half the smallest subnormal below them
    bound = t64.abs() * 2.0 ** -(mantissa_bits + 1) + scale.double() * info.smallest_normal * 2.0 ** -(
        mantissa_bits + 1
    )
    assert ((back - t64).abs() <= bound * (1 + 1e-6)).all()
    # each nonzero row's largest element lands on the format's largest value
    peak = q.float().abs().amax(dim=1)
    assert (peak[t.abs().amax(dim=1) > 0] == info.max).all() and peak[1] == 0


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def test_fp8_linear_and_input_gradient_match_float64_within_the_e4m3_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen).to(torch.bfloat16)  # 40 rows: M need not be a multiple of 16
    w = (torch.randn(48, 64, generator=gen) * 0.05).to(torch.bfloat16)
    g = torch.randn(40, 48, generator=gen).to(torch.bfloat16)
    y = fp8.fp8_linear(x, w, torch.bfloat16)
    gx = fp8.fp8_grad_input(g, w, fp8.E4M3, torch.bfloat16)
    assert y.dtype == gx.dtype == torch.bfloat16 and y.shape == (40, 48) and gx.shape == (40, 64)
    # both operands rounded to 3 mantissa bits (<= 6.25 % each, ~2 % rms), errors averaging over K
    assert _rel(y, x.double() @ w.double().t()) < 0.04
    assert _rel(gx, g.double() @ w.double()) < 0.04
    gx5 = fp8.fp8_grad_input(g, w, fp8.E5M2, torch.bfloat16)  # e5m2: one mantissa bit less
    assert _rel(gx5, g.double() @ w.double()) < 0.08


def test_shapes_fit_needs_multiples_of_16():
    assert fp8.fp8_shapes_fit(4096, 14336) and not fp8.fp8_shapes_fit(4096, 100)


# --- the Triton passes, run here by Triton's CPU interpreter (conftest sets TRITON_INTERPRET) ---


@pytest.mark.parametrize("fp8_dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("with_col_scale", [False, True])
def test_quantize_rows_kernel_equals_quantize_bit_for_bit(fp8_dtype, with_col_scale):
    # K = 300 is no power of two (the row block is masked); magnitudes over 10 decades reach the
    # subnormals, whose rounding the kernel writes out itself (fp8_kernels.round_to_fp8)
    gen = torch.Generator().manual_seed(4)
    t = (torch.randn(37, 300, generator=gen) * torch.logspace(-5, 5, 300)).to(torch.bfloat16)
    t[3] = 0.0
    col = torch.rand(300, generator=gen) + 0.5 if with_col_scale else None
    q, scale = fp8.quantize_rows_triton(t, fp8_dtype, col)
    ref_q, ref_scale = fp8.quantize(t.float() * col if col is not None else t, 1, fp8_dtype)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))  # -0.0 included


def _nf4(n, k, nested, quant_type="nf4", seed=5, blocksize=64):
    import bitsandbytes.functional as bf

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]).to(torch.bfloat16)
    packed, state = bf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    nibbles = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()
    absmax = (bf.dequantize_blockwise(state.absmax, state.state2) + state.offset) if nested else state.absmax
    exact = (state.code[nibbles] * absmax.float().repeat_interleave(blocksize)).view(
        n, k
    )  # fp32, before any bf16 rounding
    assert torch.equal(exact.to(torch.bfloat16), bf.dequantize_4bit(packed, state))  # the reference is bitsandbytes'
    return packed, state, exact


@pytest.mark.parametrize("nested,quant_type", [(False, "nf4"), (True, "nf4"), (True, "fp4")])
def test_nf4_to_fp8_equals_quantizing_the_dequantized_weight(nested, quant_type):
    packed, state, exact = _nf4(96, 320, nested, quant_type)  # 96 rows, 320 columns: partial tiles
    assert nf4.kernel_fits(packed, state)
    rows, transposed, row_scale = fp8.nf4_to_fp8(packed, state, rows=True, transposed=True)
    ref_q, ref_scale = fp8.quantize(exact, 1)
    assert torch.equal(row_scale, ref_scale.flatten())  # from the block absmaxes alone
    assert fp8.nf4_row_scales(packed, state) is row_scale  # computed once per weight
    assert torch.equal(rows.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(transposed.view(torch.uint8), ref_q.view(torch.uint8).t())
    only_t = fp8.nf4_to_fp8(packed, state, rows=False, transposed=True)
    assert only_t[0] is None and torch.equal(only_t[1].view(torch.uint8), transposed.view(torch.uint8))


@pytest.mark.parametrize("blocksize", [128, 256])  # one absmax block per tile row, and blocks wider than the tile
def test_tiled_weight_kernels_take_other_block_sizes(blocksize):
    # at 256 the small rows' decoded absmaxes are negative (offset 4.5 against 0.12): the row
    # scales take |absmax| (with the signed maximum they were the 1e-30 floor, every value ±448)
    packed, state, exact = _nf4(96, 512, True, blocksize=blocksize)
    rows, transposed, _ = fp8.nf4_to_fp8(packed, state, rows=True, transposed=True)
    ref_q = fp8.quantize(exact, 1)[0].view(torch.uint8)
    assert torch.equal(rows.view(torch.uint8), ref_q) and torch.equal(transposed.view(torch.uint8), ref_q.t())


def test_nf4_kernel_refuses_rows_that_split_a_block():
    import bitsandbytes.functional as bf

    packed, state = bf.quantize_4bit(torch.randn(16, 96, dtype=torch.bfloat16), blocksize=64)
    assert not nf4.kernel_fits(packed, state)


def test_folded_weight_scales_give_the_input_gradient():
    # grad @ W with W = rows * row_scale: the scales go into the gradient before it is quantized
    packed, state, exact = _nf4(64, 128, True)
    _, w_t, row_scale = fp8.nf4_to_fp8(packed, state, rows=False, transposed=True)
    grad = torch.randn(32, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    gq, gs = fp8.quantize_rows_triton(grad, fp8.E4M3, row_scale)
    got = fp8.scaled_matmul(gq, gs, w_t.t(), fp8.ones_row(128, grad.device)).double()
    ref = grad.double() @ exact.double()
    assert ((got - ref).norm() / ref.norm()).item() < 0.05  # e4m3 on both sides, as the eager path


def test_last_quantized_reuses_only_the_same_values(monkeypatch):
    calls = []
    quantize_rows = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda t: calls.append(1) or quantize_rows(t))
    cache = fp8.LastQuantized()
    x = torch.randn(8, 32).to(torch.bfloat16)
    first = cache.quantize(x)
    assert cache.quantize(x.view(8, 32)) is first and len(calls) == 1  # q, k, v: one quantization
    x.mul_(2)  # the version counter moves
    assert cache.quantize(x) is not first and len(calls) == 2
    assert cache.quantize(x.clone()) is not None and len(calls) == 3  # other memory
    cache.clear()
    assert cache.x is None and cache.value is None


@pytest.mark.parametrize("magnitude", [1.0, 1e-12, 1e-24])
def test_tiny_rows_keep_their_precision(magnitude):
    # an 8B model's input gradients times the weight's folded scales reach 1e-12 and below
    # (r23/r24: under a 1e-12 amax floor they were flushed and the run stopped learning)
    gen = torch.Generator().manual_seed(7)
    t = (torch.randn(8, 64, generator=gen, dtype=torch.float64) * magnitude).to(torch.bfloat16)
    col = torch.rand(64, generator=gen) * 1e-3 + 1e-4  # e.g. amax / 448 of weight rows
    for q, scale in (fp8.quantize_rows_triton(t, fp8.E4M3, col), fp8.quantize(t.float() * col, 1)):
        back, ref = q.double() * scale.double(), t.double() * col.double()
        assert ((back - ref).norm() / ref.norm()).item() < 0.05

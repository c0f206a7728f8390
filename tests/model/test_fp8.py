"""peftchat.model.fp8 on CPU (torch._scaled_mm runs there too): scales against a float64 reference,
quantization error within the format's rounding bound, and the two scaled matmuls."""

import pytest
import torch

from peftchat.model import fp8


def _random(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: what per-row scales are for
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.logspace(-3, 3, shape[0], dtype=torch.float64)[:, None]
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
    bound = t64.abs() * 2.0 ** -(mantissa_bits + 1) + scale.double() * info.smallest_normal * 2.0 ** -(mantissa_bits + 1)
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

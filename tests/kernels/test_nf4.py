"""peftchat.kernels.nf4 in Triton's interpreter: the tiled dequantization gives bitsandbytes' own
values bit for bit, and a fused LoRA layer computes the same with it as with bitsandbytes'."""

import pytest
import torch

from peftchat.kernels import frozen_linear as fl
from peftchat.kernels import nf4


def _quantized(dtype, nested, quant_type, blocksize, n=96, k=512):
    import bitsandbytes.functional as bf

    gen = torch.Generator().manual_seed(4)
    # rows from 0.01 to 10: at blocksize 256 the small rows' decoded absmaxes come out negative
    w = (torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]).to(dtype)
    return bf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested,quant_type", [(False, "nf4"), (True, "nf4"), (True, "fp4")])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_dequantize_is_bitsandbytes_bit_for_bit(dtype, nested, quant_type, blocksize):
    import bitsandbytes.functional as bf

    packed, state = _quantized(dtype, nested, quant_type, blocksize)
    assert nf4.kernel_fits(packed, state)
    assert torch.equal(nf4.dequantize(packed, state, dtype), bf.dequantize_4bit(packed, state))


def test_offset_is_read_once_per_weight():
    packed, state = _quantized(torch.bfloat16, True, "nf4", 64)
    offset = float(state.offset)
    first = nf4.decode_args(packed, state)
    state.offset = state.offset + 1  # a second read would see this
    assert nf4.decode_args(packed, state) is first and first[0][-1] == offset
    other, _ = _quantized(torch.bfloat16, False, "nf4", 64)
    assert nf4.decode_args(other, _)[0][-1] == 0.0


def test_kernel_refuses_rows_that_split_a_block():
    import bitsandbytes.functional as bf

    packed, state = bf.quantize_4bit(torch.randn(16, 96, dtype=torch.bfloat16), blocksize=64)
    assert not nf4.kernel_fits(packed, state)


def test_fused_lora_layer_is_unchanged_by_the_triton_dequantization(monkeypatch):
    from lora_helpers import nf4_lora_layer

    layer = nf4_lora_layer(128, 64, 0.0, "cpu")
    fl.fuse_lora_layers(layer)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 128, generator=gen).to(torch.bfloat16)
    g = torch.randn(1, 32, 64, generator=gen).to(torch.bfloat16)

    def run():
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(g)
        out = (y.detach(), xr.grad, layer.lora_A["default"].weight.grad.clone())
        layer.zero_grad()
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        bnb = run()
        calls = []
        dequantize = nf4.dequantize
        monkeypatch.setattr(nf4, "kernels_on", lambda t: True)  # the kernel, in the interpreter
        monkeypatch.setattr(nf4, "dequantize", lambda *a: calls.append(1) or dequantize(*a))
        ours = run()
    assert len(calls) == 2  # forward and backward
    for a, b in zip(ours, bnb):
        assert torch.equal(a, b)

"""benchmarks/fp8_grad_probe.py: every ablation still fits the code it patches (a probe whose
patch no longer matches a signature fails on the GPU, after the model build, costing device time).
Each mode runs a checkpointed NF4 LoRA layer through the Triton passes in the interpreter."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from benchmarks import fp8_grad_probe
from benchmarks.check_fp8 import nf4_lora_layer
from peftchat.model import fp8
from peftchat.model import frozen_linear as fl

PATCHED = {fp8: ["kernels_on", "_NF4_ARGS", "quantize_rows", "nf4_to_fp8", "TRANSPOSE_KERNEL", "WEIGHT_TILES"],
           fl: ["_RECOMPUTED_WEIGHTS", "_fp8_input_grad", "FP8_PASSES"]}


def _grad_x(layer, x, g):
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = checkpoint(layer, x, use_reentrant=False)
    y.backward(g)
    return x.grad.double()


@pytest.mark.parametrize("mode", [m for m in fp8_grad_probe.MODES if m != "bf16"])
def test_each_probe_mode_patches_a_working_fp8_path(mode, monkeypatch):
    for module, names in PATCHED.items():  # put back after the test whatever ablate() replaces
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(fl, "_LAST_INPUT", fp8.LastQuantized())
    monkeypatch.setattr(fp8, "kernels_on", lambda t: True)  # the Triton passes, in the interpreter
    layer = nf4_lora_layer(128, 64, 0.0, "cpu")
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(32, 128, generator=gen), torch.randn(32, 64, generator=gen).to(torch.bfloat16)
    fl.fuse_lora_layers(layer)
    bf16 = _grad_x(layer, x, g)
    fl.unfuse_lora_layers(layer)
    fp8_grad_probe.ablate(mode)
    fl.fuse_lora_layers(layer, fp8=True)
    got = _grad_x(layer, x, g)
    assert 0 <= ((got - bf16).norm() / bf16.norm()).item() < 0.05
    assert len(fl._RECOMPUTED_WEIGHTS) == 0  # whatever the recompute kept, its backward took

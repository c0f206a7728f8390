"""LoRA on a frozen base linear as one autograd function (`training.fused_lora`, `training.fp8`).

peft computes a LoRA layer as separate autograd nodes: the base linear (bitsandbytes' 4-bit or
int8 matmul, or nn.Linear), a defensive copy of its output (4-bit), the dropout (a copy of x even
at p = 0 is avoided by peft's Identity, but at p > 0 both the mask and the dropped copy of x are
kept), lora_A, lora_B, the scaling and the sum. `LoraOnFrozenLinear` does the same arithmetic in one
node:

    y = x @ W.T (+ bias) + scaling * (dropout(x) @ A.T) @ B.T

keeping for backward only x (the tensor the layer was given, not a copy), x @ A.T (M x r, small)
and A, B; never the dropped copy and bool mask that peft keeps. On the 8B NF4 lean row at dropout
0.05 the seven LoRA layers of a decoder layer held 912 MiB of copies and masks at the step's
memory peak (an allocator snapshot; benchmarks/HISTORY.md). The base weight W is dequantized (NF4/FP4 via
bitsandbytes, int8 rows times their scales) once in forward and once in backward, as
bitsandbytes' own matmul does, and gets no gradient. With `fp8` the base matmuls of the passes
`Fp8Passes` names (`KernelOptions.fp8`: by default a checkpointed layer's recompute and the input gradient, not the
forward the loss sees) go through `torch._scaled_mm` in e4m3 with per-row / per-channel scales
(peftchat.kernels.fp8); LoRA stays in the compute dtype. Weights stay stored as they are, so
checkpoints, merge and export do not change.

Dropout, two ways:
- On CUDA with Triton, for bf16/fp16 (`lora_dropout.usable`), the mask is drawn inside the LoRA
  matmuls from a seed (peftchat.kernels.lora_dropout): no dropped copy is ever written, and the
  LoRA term is computed first with the base GEMM accumulated onto it. Lean 8B NF4: 10,583 tok/s
  against 10,030 with torch's dropout (one run). Other draws than peft's, same distribution;
  the loss stays within 0.025 % of peft's layers (the bench's loss gate).
- Elsewhere (CPU, fp32), torch's native dropout (the kernel F.dropout
  uses) draws the very masks peft's layer would (tests/kernels/test_frozen_linear.py: same loss
  and LoRA gradients as peft with dropout, checkpointed or not, on CPU in fp32). Backward keeps
  the RNG state, not the mask, and draws the mask again from it.

`fuse_lora_layers` puts this in front of the forward of each eligible peft LoRA Linear (instance
attribute, the module and its state dict untouched); the call falls back to peft's own forward
whenever the layer is not plain training LoRA: eval mode (generation keeps bitsandbytes'
fast small-batch kernels), merged or disabled adapters, several active adapters,
mixed-batch adapter names, DoRA or other LoRA variants, LoRA bias, or dtypes peft would mix.
Under autocast it computes in the autocast dtype (as peft's layers do); without it, only when x,
the adapter and the base compute in one dtype.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from peftchat.kernels import fp8 as fp8_ops
from peftchat.kernels import lora_dropout, nf4
from peftchat.kernels.fp8 import Fp8Passes, fp8_grad_input, fp8_linear, fp8_shapes_fit

# Kernel choices are arguments (`Fp8Passes`, from `peftchat.kernels.options.KernelOptions`), never
# module flags. Paths that lost their measurement were deleted, their numbers kept in
# benchmarks/HISTORY.md: torch's dropout on CUDA where the kernels serve (lean 8B NF4 10,030 against
# 10,583 tok/s), the base GEMM first under the kernel dropout (10,467), bitsandbytes' dequant where
# the Triton one fits (lean 10,810 against 10,955), a recompute's dequantized weight kept for its
# backward (11,058 against 10,955: within run-to-run spread, for 0.30 GiB more), FP8 for the MLP
# only (1B final loss 0.6276, no better than all linears' 0.6233 mean).

_WRAPPED_FORWARD = "_peftchat_peft_forward"


def in_recompute() -> bool:
    """Whether this forward runs inside backward: a checkpointed layer's recomputation, whose
    outputs feed only its own backward (torch's checkpoint and `offload` both replay there)."""
    return torch._C._current_graph_task_id() != -1


@functools.cache
def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: only nn.Linear bases exist
        return None
    return bnb


def base_kind(base: nn.Module) -> Optional[str]:
    """ "nf4" (any 4-bit), "int8", "dense" for a frozen base this module can compute, else None."""
    bnb = _bnb()
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        return "nf4"
    if bnb is not None and isinstance(base, bnb.nn.Linear8bitLt):
        return None if base.state.has_fp16_weights else "int8"
    if type(base) is nn.Linear and not base.weight.requires_grad:
        return "dense"
    return None


def base_weight(base: nn.Module, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The frozen (out, in) weight of `base` (of `base_kind` `kind`) in `dtype`: dequantized for
    4-bit and int8 bases."""
    # bitsandbytes' Params4bit / Int8Params: their attributes are outside torch's Module typing
    w: Any = base.weight
    if kind == "nf4":
        import bitsandbytes.functional as bf

        qs = w.quant_state
        # bitsandbytes dequantizes to the weight's original dtype, then .to(dtype): the same values
        # as the kernel's one rounding when that dtype is `dtype` or fp32 (exact products)
        if qs.dtype in (dtype, torch.float32) and nf4.kernels_on(w) and nf4.kernel_fits(w.data, qs):
            return nf4.dequantize(w, qs, dtype)
        return bf.dequantize_4bit(w.data, qs).to(dtype)
    if kind == "int8":
        # bitsandbytes moves CB/SCB from the weight to `base.state` on the layer's first forward
        # base.state: Linear8bitLt's MatmulLtState, which nn.Module's typing cannot see
        scb: Any = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB  # type: ignore[union-attr]
        # int8 rows times their absmax / 127, like bitsandbytes' int8_vectorwise_dequant
        return (w.data.to(torch.float32) * (scb.to(torch.float32) / 127.0).unsqueeze(1)).to(dtype)
    return w.to(dtype)


def rng_state(device: torch.device) -> torch.Tensor:
    """The RNG state the next dropout mask on `device` is drawn from (no device sync)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped x, keep-mask as bools) of inverted dropout in one kernel (torch's native dropout,
    the one F.dropout uses on CUDA), drawn from torch's RNG so that checkpoint recomputation, which
    restores the RNG state, draws the same mask."""
    return torch.native_dropout(x, p, True)


class LoraOnFrozenLinear(torch.autograd.Function):
    """y = base(x) + scaling * (dropout(x) @ A.T) @ B.T for a 2-D x in its compute dtype.

    `fp8`: None for base matmuls in x's dtype, else which of them run in FP8 (e4m3 operands,
    the incoming gradient in `fp8.grad_dtype`). Saved for backward: x,
    dropout(x) @ A.T (times the scaling on the kernel-dropout path, whose kernels multiply it in),
    A and B, and at p > 0 the seed (kernel path) or RNG state (torch's dropout) of the mask.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        lora_a,
        lora_b,
        base,
        kind: str,
        scaling: float,
        p: float,
        fp8: Optional[Fp8Passes],
        state: Optional[FusedState] = None,
    ):
        dtype = x.dtype
        ctx.rng = ctx.seed = None
        ctx.state = state if state is not None else FusedState()
        if p > 0 and lora_dropout.usable(x, lora_a, p):
            # the kernels draw the mask from the seed; x @ A.T comes back (and is saved) times the
            # scaling, which no other kernel then multiplies in (forward or backward)
            ctx.seed = lora_dropout.new_seed(x.device)
            xa = lora_dropout.down(x, lora_a, ctx.seed, p, scale=scaling)
        else:
            ctx.rng = rng_state(x.device) if p > 0 else None  # the mask is drawn again in backward
            xa = (dropout(x, p)[0] if p > 0 else x) @ lora_a.to(dtype).t()
        b = lora_b.to(dtype)
        ctx.base, ctx.kind, ctx.scaling, ctx.p = base, kind, scaling, p
        ctx.fp8_grad = fp8.grad_dtype if fp8 is not None and fp8.grad_input else None
        if fp8 is not None and (fp8.recompute if in_recompute() else fp8.forward):
            y = _fp8_base_matmul(ctx, x, dtype)
            y.addmm_(xa, b.t(), alpha=1.0 if ctx.seed is not None else scaling)
        elif ctx.seed is not None:
            # LoRA term first, base matmul accumulated onto it: the base GEMM reads the LoRA term
            # in its epilogue, where a separate add would read and write the whole output again.
            # Measured with the kernel dropout only (8B NF4 lean: 10,583 tok/s, base first 10,467);
            # torch's dropout keeps the base-first order (9,098 with LoRA first).
            y = torch.mm(xa, b.t())
            y.addmm_(x, base_weight(base, kind, dtype).t())
        else:
            y = x @ base_weight(base, kind, dtype).t()
            y.addmm_(xa, b.t(), alpha=1.0 if ctx.seed is not None else scaling)
        if base.bias is not None:
            y += base.bias.to(dtype)
        ctx.save_for_backward(x, xa, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        dtype, s = x.dtype, ctx.scaling
        kept = ctx.state.recomputed.pop(ctx.base, None)  # what this layer's recompute kept, if anything
        ctx.state.last_input.clear()  # backward has begun: forward's quantized input is of no more use
        grad = grad.to(dtype).contiguous()
        grad_xa = grad @ lora_b.to(dtype)  # (M, r), without the scaling
        grad_b = grad.t() @ xa
        if ctx.seed is None:  # else the scaling is in xa and in the kernels' scale
            grad_xa.mul_(s)
            grad_b.mul_(s)
        grad_a, grad_x = _lora_input_grads(ctx, x, grad_xa, lora_a)
        if grad_x is not None:  # LoRA part first, so its mask is freed before the base weight is dequantized
            if ctx.fp8_grad is not None:
                grad_x += _fp8_input_grad(ctx, grad, dtype, kept)
            else:
                grad_x.addmm_(grad, base_weight(ctx.base, ctx.kind, dtype))
        ctx.base = ctx.rng = ctx.seed = ctx.state = None
        return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None, None, None, None, None


class FusedState:
    """What the fused layers of one model share between calls, owned by those layers (one per
    `fuse_lora_layers` call), never by this module.

    `last_input`: q, k and v (gate and up) quantize one x: the last one quantized is kept
    (fp8.LastQuantized). `recomputed`: base linear -> what its recompute kept for its backward,
    (transposed e4m3 weight, row scales) with FP8 input gradients. Not on ctx: torch's
    non-reentrant checkpoint runs the backward of the *first* forward's nodes and recomputes only
    to refill their saved tensors (offload's recompute builds nodes of its own).
    """

    def __init__(self) -> None:
        self.last_input = fp8_ops.LastQuantized()
        self.recomputed: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def _fp8_base_matmul(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ W.T with both in e4m3. A 4-bit base on CUDA goes from its codes to fp8 in one kernel;
    a recompute, whose backward comes next, also makes the transposed copy the input gradient
    needs and keeps it (`FusedState.recomputed`: one decoder layer's worth at a time)."""
    base, kind = ctx.base, ctx.kind
    w = base.weight
    if kind == "nf4" and fp8_ops.kernels_on(x) and nf4.kernel_fits(w.data, w.quant_state):
        keep_t = ctx.fp8_grad is not None and in_recompute()
        w_rows, w_t, row_scale = fp8_ops.nf4_to_fp8(w, w.quant_state, rows=True, transposed=keep_t)
        assert w_rows is not None  # rows=True
        if keep_t:
            ctx.state.recomputed[base] = (w_t, row_scale)
        xq, xs = ctx.state.last_input.quantize(x)
        return fp8_ops.scaled_matmul(xq, xs, w_rows.t(), row_scale.view(1, -1), dtype)
    return fp8_linear(x, base_weight(base, kind, dtype), dtype)


def _fp8_input_grad(ctx, grad: torch.Tensor, dtype: torch.dtype, kept: Any) -> torch.Tensor:
    """grad @ W in FP8: the weight's per-row scales are folded into the gradient before it is
    quantized per row, so the e4m3 weight needs no scales of its own along its columns. `kept`:
    the recompute's (transposed e4m3 weight, row scales), or None."""
    base, kind = ctx.base, ctx.kind
    w = base.weight
    if kind == "nf4" and fp8_ops.kernels_on(grad) and nf4.kernel_fits(w.data, w.quant_state):
        w_t, row_scale = kept or fp8_ops.nf4_to_fp8(w, w.quant_state, rows=False, transposed=True)[1:]
        assert w_t is not None  # transposed=True
        gq, gs = fp8_ops.quantize_rows(grad, ctx.fp8_grad, col_scale=row_scale)
        return fp8_ops.scaled_matmul(gq, gs, w_t.t(), fp8_ops.ones_row(w_t.shape[0], grad.device), dtype)
    return fp8_grad_input(grad, base_weight(base, kind, dtype), ctx.fp8_grad, dtype)


def _lora_input_grads(
    ctx, x: torch.Tensor, grad_xa: torch.Tensor, lora_a: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(LoRA A's gradient, LoRA's part of x's gradient or None) through forward's dropout mask.
    `grad_xa`: the gradient of x @ A.T, times the scaling except on the kernel path (whose kernels
    multiply it in)."""
    p, need_x = ctx.p, ctx.needs_input_grad[0]
    if ctx.seed is not None:
        s = ctx.scaling
        grad_x = lora_dropout.grad_input(grad_xa, lora_a, ctx.seed, p, scale=s) if need_x else None
        return lora_dropout.grad_a(x, grad_xa, ctx.seed, p, scale=s), grad_x
    a = lora_a.to(x.dtype)
    if p == 0:
        return grad_xa.t() @ x, (grad_xa @ a if need_x else None)
    cuda = x.device.type == "cuda"
    with torch.random.fork_rng(devices=[x.device] if cuda else []):  # the generator is put back after
        if cuda:
            torch.cuda.set_rng_state(ctx.rng, x.device)
        else:
            torch.set_rng_state(ctx.rng)
        lora_in, mask = dropout(x, p)  # forward's very mask: same RNG state, tensor and shape
    grad_a = grad_xa.t() @ lora_in
    del lora_in
    grad_x = torch.ops.aten.native_dropout_backward(grad_xa @ a, mask, 1.0 / (1.0 - p)) if need_x else None
    return grad_a, grad_x


def _compute_dtype(base: nn.Module, kind: str, x: torch.Tensor, lora_a: torch.Tensor) -> Optional[torch.dtype]:
    """The one dtype peft's layer would compute in, or None where it would mix dtypes."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    base_dtype = getattr(base, "compute_dtype", None) or (base.weight.dtype if kind == "dense" else x.dtype)
    if x.dtype == lora_a.dtype == base_dtype and x.dtype.is_floating_point:
        return x.dtype
    return None


def _plain_lora_adapter(layer: Any) -> Optional[str]:  # a peft LoRA layer
    """The single active adapter when the layer trains vanilla LoRA right now, else None."""
    if not layer.training or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (
        name not in layer.lora_A
        or name in getattr(layer, "lora_variant", {})
        or getattr(layer, "lora_bias", {}).get(name, False)
    ):
        return None
    return name


def fused_lora_forward(
    layer: Any, kind: str, fp8: Optional[Fp8Passes], state: FusedState, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """`layer.forward` through LoraOnFrozenLinear when eligible, else peft's own forward. `kind`:
    the base's `base_kind`, found once by `fuse_lora_layers` (it is fixed per layer; this runs
    every forward of every LoRA layer)."""
    peft_forward: Callable = getattr(layer, _WRAPPED_FORWARD)
    # Training mode decides, not grad mode: a checkpointed layer's first forward runs without grad
    # and must draw the same dropout masks as its recompute.
    name = None if (args or kwargs) else _plain_lora_adapter(layer)
    if name is None:
        return peft_forward(x, *args, **kwargs)
    base = layer.get_base_layer()
    quant_state = getattr(base.weight, "quant_state", None)
    if kind == "nf4" and (quant_state is None or getattr(quant_state, "packing_format_for_cpu", False)):
        return peft_forward(x, *args, **kwargs)  # not quantized yet, or repacked by bnb's CPU inference path
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    dtype = _compute_dtype(base, kind, x, lora_a)
    if dtype is None:
        return peft_forward(x, *args, **kwargs)
    dropout = layer.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    out_features, in_features = lora_b.shape[0], lora_a.shape[1]
    use_fp8 = (
        fp8 if (fp8 is not None and dtype == torch.bfloat16 and fp8_shapes_fit(in_features, out_features)) else None
    )
    x2d = x.reshape(-1, in_features).to(dtype)
    y = LoraOnFrozenLinear.apply(x2d, lora_a, lora_b, base, kind, float(layer.scaling[name]), p, use_fp8, state)
    # the dtype peft's layer returns: bitsandbytes bases give back the input's, nn.Linear under
    # autocast the autocast dtype (without autocast all three are `dtype` anyway)
    out_dtype = dtype if kind == "dense" else x.dtype
    return y.reshape(*x.shape[:-1], out_features).to(out_dtype)


def fusable(layer: nn.Module) -> bool:
    """A peft LoRA Linear over a frozen base this module computes, with no LoRA variant (DoRA)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer) or not hasattr(layer, "lora_A") or hasattr(layer, _WRAPPED_FORWARD):
        return False
    if getattr(layer, "lora_variant", None) or any(getattr(layer, "lora_bias", {}).values()):
        return False  # DoRA and the like, or LoRA bias: peft computes them
    if getattr(layer, "fan_in_fan_out", False):
        return False
    return base_kind(layer.get_base_layer()) is not None


def fuse_lora_layers(model: nn.Module, fp8: Optional[Fp8Passes] = None) -> dict[str, int]:
    """Route each eligible LoRA Linear of `model` through LoraOnFrozenLinear: base matmuls in the
    compute dtype, or those `fp8` names in FP8 (`KernelOptions.fp8`).

    Returns counts: "fused" layers, "fp8" of them whose shapes suit `_scaled_mm` (in and out
    features multiples of 16; the others keep a bf16 base matmul), and "dropout" of them with
    LoRA dropout > 0 (the ones the kernel dropout can serve).
    """
    fused = fp8_count = with_dropout = 0
    state = FusedState()
    layer: Any  # peft LoRA layers: their attributes are outside torch's Module typing
    for layer in model.modules():
        if not fusable(layer):
            continue
        base = layer.get_base_layer()
        setattr(layer, _WRAPPED_FORWARD, layer.forward)
        kind = base_kind(base)
        assert kind is not None  # fusable
        layer.forward = functools.partial(fused_lora_forward, layer, kind, fp8, state)
        fused += 1
        fp8_count += fp8 is not None and fp8_shapes_fit(base.in_features, base.out_features)
        with_dropout += any(isinstance(d, nn.Dropout) and d.p > 0 for d in layer.lora_dropout.values())
    return {"fused": fused, "fp8": fp8_count, "dropout": with_dropout}


def unfuse_lora_layers(model: nn.Module) -> int:
    """Undo `fuse_lora_layers`; returns the number of layers restored."""
    n = 0
    for layer in model.modules():
        if hasattr(layer, _WRAPPED_FORWARD):
            del layer.forward  # the instance attribute; the class's forward shows again
            delattr(layer, _WRAPPED_FORWARD)
            n += 1
    return n

"""Training-speed knobs applied to a loaded model: Liger fused kernels and the checkpoint policy.

Both are measured in ``benchmarks/`` (see benchmarks/RESULTS.md for what each one buys).

* ``apply_fused_kernels`` swaps RMSNorm, SwiGLU and RoPE for liger-kernel's Triton versions when
  ``training.fused_kernels`` allows it, liger-kernel is importable and the model is on CUDA.
  Liger's fused linear cross-entropy (LM head + loss without materialising logits) is exposed as
  ``fused_linear_cross_entropy`` for the loss to call; it is not patched into ``model.forward``
  because peftchat computes its loss itself over label positions only.
* ``apply_checkpoint_policy`` turns gradient checkpointing on for all decoder layers but the last
  ``training.checkpoint_skip_layers``: each layer left out trades its activations for one less
  forward recompute.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from peftchat.errors import ConfigError

_MODES = {"auto": "auto", "true": True, "false": False}


def fused_kernels_mode(recipe: Any) -> bool | str:
    """`training.fused_kernels` as True, False or "auto" (YAML booleans and strings accepted)."""
    value = getattr(recipe.training, "fused_kernels", "auto")
    key = str(value).strip().lower()
    if key not in _MODES:
        raise ConfigError(f"'training.fused_kernels' is {value!r}; expected one of auto, true, false")
    return _MODES[key]


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (liger patches the transformers modules)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def fused_kernels_enabled(model: torch.nn.Module, recipe: Any) -> bool:
    """Whether the recipe and this machine allow liger kernels for `model`.

    `auto` quietly means "when possible"; `true` raises if liger-kernel or CUDA is missing, so a
    recipe that asks for them never silently runs slower.
    """
    mode = fused_kernels_mode(recipe)
    if mode is False:
        return False
    on_cuda = _model_device(model).type == "cuda"
    if mode is True:
        if not liger_installed():
            raise ConfigError("'training.fused_kernels' is true but liger-kernel is not installed "
                              "(pip install 'peftchat[fast]')")
        if not on_cuda:
            raise ConfigError("'training.fused_kernels' is true but the model is not on a CUDA device")
        return True
    return on_cuda and liger_installed()


def apply_fused_kernels(model: torch.nn.Module, recipe: Any) -> list[str]:
    """Patch liger-kernel's RMSNorm, SwiGLU and RoPE into `model` in place; return what was applied.

    Works before or after peft wraps the model (LoRA layers inside the MLP keep working: liger's
    SwiGLU forward calls the same gate/up/down modules). Returns [] when disabled, unavailable, or
    the architecture has no liger patch.
    """
    if not fused_kernels_enabled(model, recipe):
        return []
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = _unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        if fused_kernels_mode(recipe) is True:
            raise ConfigError(f"'training.fused_kernels' is true but liger-kernel has no kernels for "
                              f"model type {model_type!r}")
        return []
    # The loss is peftchat's own (label positions only), so liger must not replace model.forward.
    apply_fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
             model=base)
    applied = [f"liger:{k}" for k in ("rms_norm", "swiglu", "rope")]
    base._peftchat_fused_ce = True  # read by fused_ce_available()
    applied.append("liger:fused_linear_cross_entropy")
    return applied


def fused_ce_available(model: torch.nn.Module) -> bool:
    """True once apply_fused_kernels enabled liger for `model` (the loss may then use the fused CE)."""
    return bool(getattr(_unwrap(model), "_peftchat_fused_ce", False))


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against `labels` without materialising the logits.

    hidden: (N, d) states at the positions that carry a label (already shifted), labels: (N,).
    The logits are computed chunk by chunk in liger's Triton kernel and their gradient is formed in
    the forward pass, so memory stays O(chunk x vocab) instead of O(N x vocab) in fp32.
    """
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels, None, None, -100, 0.0, 0.0,
                                                      reduction)
    return loss[0] if isinstance(loss, tuple) else loss


def apply_checkpoint_policy(model: torch.nn.Module, recipe: Any) -> int:
    """Gradient checkpointing (non-reentrant) on every decoder layer but the last `checkpoint_skip_layers`.

    Returns the number of checkpointed layers (0 when `training.gradient_checkpointing` is off).
    Non-reentrant checkpointing needs no `enable_input_require_grads` and keeps bf16 activations.
    """
    base = _unwrap(model)
    if not recipe.training.gradient_checkpointing:
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        return 0
    skip = int(getattr(recipe.training, "checkpoint_skip_layers", 0) or 0)
    if skip < 0:
        raise ConfigError(f"'training.checkpoint_skip_layers' must be >= 0, got {skip}")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(base.config, "use_cache", None):
        base.config.use_cache = False
    layers = [m for m in base.modules() if getattr(type(m), "gradient_checkpointing", None) is not None
              and hasattr(m, "_gradient_checkpointing_func")]
    # The last layers run first in the backward pass, so their kept activations are freed first.
    for layer in layers[len(layers) - skip:] if skip else []:
        layer.gradient_checkpointing = False
    return max(len(layers) - skip, 0)

"""Training-speed knobs applied to a loaded model: fused kernels, checkpoint policy, compilation.

Both are measured in ``benchmarks/`` (see benchmarks/RESULTS.md and HISTORY.md for what each one buys). Which
kernels run is one ``KernelOptions`` (peftchat.kernels.options), built here once per run.

* ``apply_fused_kernels`` swaps RMSNorm, SwiGLU/GeGLU and RoPE (per family: ``LIGER_LAYER_KERNELS``)
  for liger-kernel's Triton versions when ``training.fused_kernels`` allows it, liger-kernel is
  importable and the model is on CUDA.
  Liger's fused linear cross-entropy (LM head + loss without materialising logits) is handed to
  the loss as ``Speedups.head_loss``; it is not patched into ``model.forward`` because peftchat
  computes its loss itself over label positions only.
* ``apply_checkpoint_policy`` turns gradient checkpointing on for all decoder layers but the last
  ``training.checkpoint_skip_layers``: each layer left out trades its activations for one less
  forward recompute. ``training.checkpoint_offload`` parks the checkpointed layer inputs in
  pinned host memory (``peftchat.kernels.offload``, double-buffered copies back).
* ``training.compile`` compiles each decoder layer with torch.compile (regional compilation), with
  random ops left to torch's generator so dropout masks are eager's (``compile_decoder_layers``).
* ``training.fused_lora`` / ``training.fp8`` route each LoRA Linear through one autograd function
  with the frozen base matmul (``peftchat.kernels.frozen_linear``), in bf16 or in FP8 on Hopper.
* ``apply_training_speedups`` does all of the above in the right order and is the one place
  checkpointing is turned on; the training loop calls it once after LoRA is applied and gets back
  what was applied and the head loss to use.

Every function takes the validated ``TrainingConfig`` (``peftchat.config`` normalizes its keys).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch

from peftchat.config import TrainingConfig
from peftchat.errors import ConfigError
from peftchat.formats.samples import IGNORE_INDEX
from peftchat.kernels.offload import OffloadState, offloaded_checkpoint, run_layer
from peftchat.kernels.options import KernelOptions
from peftchat.model.adapters import unwrap_peft

# (hidden (N, d), lm_head weight (V, d), targets (N,)) -> summed cross-entropy, no logits kept
HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Speedups:
    """What `apply_training_speedups` did: `applied` for the log, `head_loss` for the loss
    (liger's fused linear cross-entropy, or None for peftchat's chunked one), `kernels` the
    options the run's kernels were given (logged too)."""

    applied: list[str] = field(default_factory=list)
    head_loss: Optional[HeadLoss] = None
    kernels: KernelOptions = field(default_factory=KernelOptions)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fused_kernels_enabled(model: torch.nn.Module, cfg: TrainingConfig) -> bool:
    """Whether `training.fused_kernels` and this machine allow liger kernels for `model`.

    `auto` quietly means "when possible"; `true` raises if liger-kernel or CUDA is missing, so a
    recipe that asks for them never silently runs slower.
    """
    mode = cfg.fused_kernels
    if mode is False:
        return False
    on_cuda = _model_device(model).type == "cuda"
    if mode is True:
        if not liger_installed():
            raise ConfigError(
                "'training.fused_kernels' is true but liger-kernel is not installed (pip install 'peftchat[fast]')"
            )
        if not on_cuda:
            raise ConfigError("'training.fused_kernels' is true but the model is not on a CUDA device")
        return True
    return on_cuda and liger_installed()


# The layer kernels (flags of liger's `apply_liger_kernel_to_<family>`) used per model type, for
# the families peftchat tests (README, "Supported model families"). Family quirks:
# * gemma2 / gemma3_text: the MLP is GeGLU (gelu-tanh), so `geglu` instead of `swiglu`; liger's
#   RMSNorm for them computes Gemma's (1 + w) scaling.
# * glm4: liger has no RoPE for GLM-4 (half-width, interleaved rotary; its apply function raises).
# * glm (GLM-4-9B-chat, GlmForCausalLM): liger has no function at all: chunked loss, no patches.
# * phi3: fused qkv_proj / gate_up_proj; liger's Phi-3 SwiGLU splits gate_up_proj's output itself.
# Other model types liger knows get every layer kernel its function takes.
LIGER_LAYER_KERNELS: dict[str, tuple[str, ...]] = {
    "llama": ("rms_norm", "swiglu", "rope"),
    "mistral": ("rms_norm", "swiglu", "rope"),
    "qwen2": ("rms_norm", "swiglu", "rope"),
    "qwen3": ("rms_norm", "swiglu", "rope"),
    "phi3": ("rms_norm", "swiglu", "rope"),
    "gemma2": ("rms_norm", "geglu", "rope"),
    "gemma3_text": ("rms_norm", "geglu", "rope"),
    "glm4": ("rms_norm", "swiglu"),
}
_LAYER_KERNEL_FLAGS = ("rms_norm", "swiglu", "geglu", "rope")
# Logit transforms after the head that liger's fused CE cannot do (final_logit_softcapping it can);
# each is one of train/loss.py's LOGIT_SCALING_ATTRIBUTES (a test holds the two together).
UNFUSED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling")


def _parameters(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


def liger_layer_kernels(config: Any, apply_fn: Any = None) -> tuple[str, ...]:
    """The liger layer kernels to patch into a model of `config` (see LIGER_LAYER_KERNELS)."""
    kernels = LIGER_LAYER_KERNELS.get(getattr(config, "model_type", ""))
    if kernels is None:
        if apply_fn is None:
            return ()
        accepted = _parameters(apply_fn)
        kernels = tuple(k for k in _LAYER_KERNEL_FLAGS if k in accepted)
    rope = getattr(config, "rope_parameters", None) or {}
    if float(rope.get("partial_rotary_factor", 1.0) or 1.0) < 1.0:
        # Phi-4-mini and the like rotate part of each head; liger's RoPE rotates all of it
        kernels = tuple(k for k in kernels if k != "rope")
    return kernels


def apply_fused_kernels(model: torch.nn.Module, cfg: TrainingConfig) -> list[str]:
    """Patch liger-kernel's layer kernels (RMSNorm, SwiGLU/GeGLU, RoPE, per family: see
    LIGER_LAYER_KERNELS) into `model` in place; return what was applied.

    Works before or after peft wraps the model (LoRA layers inside the MLP keep working: liger's
    SwiGLU forward calls the same gate/up/down modules). Returns [] when disabled, unavailable, or
    the architecture has no liger patch.
    """
    if not fused_kernels_enabled(model, cfg):
        return []
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = unwrap_peft(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        if cfg.fused_kernels is True:
            raise ConfigError(
                f"'training.fused_kernels' is true but liger-kernel has no kernels for model type {model_type!r}"
            )
        return []
    layer_kernels = liger_layer_kernels(base.config, apply_fn)
    flags = {k: k in layer_kernels for k in _LAYER_KERNEL_FLAGS if k in _parameters(apply_fn)}
    # The loss is peftchat's own (label positions only), so liger must not replace model.forward.
    apply_fn(**flags, cross_entropy=False, fused_linear_cross_entropy=False, model=base)
    return [f"liger:{k}" for k in layer_kernels]


def fused_ce_supports_head(head: torch.nn.Module, config: Any) -> bool:
    """Whether the fused CE can stand for `head(hidden)` + the model's logit transforms: a plain
    bias-free Linear head (not peft's modules_to_save wrapper) and no logit scaling it cannot do."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return all(getattr(config, k, None) is None for k in UNFUSED_LOGIT_TRANSFORMS)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against `labels` without materialising the logits.

    hidden: (N, d) states at the positions that carry a label (already shifted), labels: (N,).
    The logits are computed chunk by chunk in liger's Triton kernel and their gradient is formed in
    the forward pass, so memory stays O(chunk x vocab) instead of O(N x vocab) in fp32. `softcap`:
    Gemma 2's final logit soft-capping, ``softcap * tanh(logits / softcap)``, done in the kernel.
    """
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    loss = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, None, None, IGNORE_INDEX, 0.0, 0.0, reduction, softcap
    )
    return loss[0] if isinstance(loss, tuple) else loss


def kernel_options(model: torch.nn.Module, cfg: TrainingConfig) -> KernelOptions:
    """The `KernelOptions` of training `model` with `cfg` on the device it is on."""
    return KernelOptions.from_training(cfg, _model_device(model), fused_lora_enabled(model, cfg))


def apply_training_speedups(
    model: torch.nn.Module, cfg: TrainingConfig, kernels: Optional[KernelOptions] = None
) -> Speedups:
    """Everything this module does to a model about to train: what was applied, for the log, and
    the head loss the training loss should use.

    Order: liger kernels (or, with `training.compile`, torch.compile of each decoder layer, whose
    own fusions replace liger's per-layer kernels; the fused CE is kept either way), then the
    checkpoint policy. With `training.max_memory_gib`, `cfg` is the one `memory_budget` resolved.
    `kernels`: the kernel options (a benchmark's variant); by default `kernel_options(model, cfg)`.
    """
    done = Speedups(kernels=kernels or kernel_options(model, cfg))
    if cfg.compile:
        fused = fused_kernels_enabled(model, cfg)
    else:
        done.applied += apply_fused_kernels(model, cfg)
        fused = bool(done.applied)
    base = unwrap_peft(model)
    if fused and fused_ce_supports_head(base.get_output_embeddings(), base.config):
        softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        done.head_loss = partial(fused_linear_cross_entropy, softcap=softcap) if softcap else fused_linear_cross_entropy
        done.applied.append("liger:fused_linear_cross_entropy")
    else:  # causal_lm_loss's own chunked loss runs whenever no fused head loss does (CPU included)
        done.applied.append("loss:chunked")
    done.applied += apply_fused_lora(model, cfg, done.kernels)
    n = apply_checkpoint_policy(model, cfg)
    if cfg.gradient_checkpointing:
        offload = ""
        if cfg.checkpoint_offload:  # on CPU there is no GPU memory to free: the inputs stay as copies
            on_gpu = next(model.parameters()).device.type == "cuda"
            offload = " (inputs offloaded)" if on_gpu else " (checkpoint_offload: no GPU, inputs kept in memory)"
        budget = f"max_memory_gib {cfg.max_memory_gib:g} -> " if cfg.max_memory_gib else ""
        done.applied.append(f"{budget}checkpointed {n}/{len(decoder_layers(model))} layers{offload}")
    if cfg.compile:
        compile_decoder_layers(model, eager_random=True)
        done.applied.append("torch.compile:decoder_layers (eager RNG)")
    return done


def compile_decoder_layers(model: torch.nn.Module, eager_random: bool = True) -> None:
    """torch.compile each decoder layer (regional compilation: the layers share one compiled graph,
    weights as inputs, so compile time does not grow with depth).

    `eager_random`: inductor's `fallback_random`, random ops (LoRA dropout) run as torch's own
    kernels on torch's generator, so the compiled layer draws the very masks eager draws and the
    checkpoint recompute replays them (without it, on CPU, compiled gradients were 0.76 off eager's;
    tests/model/test_compile.py). It does not explain the 8B GPU divergence: with it the 8B run's
    loss still leaves eager's by 2.7 % at dropout 0.05 (benchmarks/HISTORY.md, round 3), so
    `training.compile` stays out of every measured setting. Random ops are a few elementwise
    kernels, so it costs little; with dropout 0 there are none.
    Layers checkpointed by `offloaded_checkpoint` (streams, host copies, RNG state: not traceable)
    get their body compiled inside it (one compiled `offload.run_layer`); the others are compiled
    whole, torch's checkpoint included (dynamo turns it into its own recompute region).
    """
    options: Optional[dict[str, Any]] = {"fallback_random": True} if eager_random else None
    body = None
    for layer in decoder_layers(model):
        hook = getattr(layer, "_gradient_checkpointing_func", None)
        if layer.gradient_checkpointing and isinstance(hook, partial) and hook.func is offloaded_checkpoint:
            body = body or torch.compile(run_layer, options=options)
            layer._gradient_checkpointing_func = partial(hook, body=body)
        else:
            layer.compile(options=options)


def check_fp8_device(cfg: TrainingConfig, device: torch.device) -> None:
    """ConfigError when `training.fp8` is set but `device` has no FP8 matmul (CUDA capability < 9.0)."""
    if not cfg.fp8:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"'training.fp8' needs a CUDA GPU of compute capability 9.0 or newer (Hopper); "
            f"this run is on {device.type}: set training.fp8=false"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        raise ConfigError(
            f"'training.fp8' needs a CUDA GPU of compute capability 9.0 or newer (Hopper); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}: set training.fp8=false"
        )


def fused_lora_enabled(model: torch.nn.Module, cfg: TrainingConfig) -> bool:
    """Whether `training.fused_lora` (or `training.fp8`, which runs inside it) applies to `model`."""
    if cfg.fp8 or cfg.fused_lora is True:
        return True
    if cfg.fused_lora is False or cfg.compile:
        return False
    # `auto`: on for CUDA training (lean 8B NF4 on an H200: 10,488 tok/s fused, 9,709 with
    # peft's layers; benchmarks/HISTORY.md), off on the CPU, where peft's layers are the reference
    return _model_device(model).type == "cuda"


def apply_fused_lora(model: torch.nn.Module, cfg: TrainingConfig, kernels: KernelOptions) -> list[str]:
    """Fuse each eligible LoRA Linear with its frozen base (the FP8 base matmuls `kernels.fp8`)."""
    if not kernels.fused_lora:
        return []
    from peftchat.kernels.frozen_linear import fuse_lora_layers

    check_fp8_device(cfg, _model_device(model))
    counts = fuse_lora_layers(model, fp8=kernels.fp8)
    applied = [f"fused_lora:{counts['fused']} layers"]
    if counts["dropout"] and kernels.triton:
        applied.append(f"lora_dropout:in_matmul {counts['dropout']} layers")  # bf16/fp16 ones (lora_dropout.usable)
    if cfg.fp8:
        applied.append(f"fp8:base_linears {counts['fp8']}")
        # said where the run is logged, not only in the README (round 10: 1B, 5 FP8 runs against 6
        # bf16 runs from the same init and data, whose own final losses spread over 4 %)
        print(
            "training.fp8 trades a little accuracy for speed: measured final loss 0.1 % above bf16's at 8B "
            "(100 steps) and 0.8 % above at 1B (300 steps, mean of 5 runs) (README, 'training.fp8')",
            flush=True,
        )
    return applied


def decoder_layers(model: torch.nn.Module) -> list[Any]:
    """The repeated blocks transformers can checkpoint, in forward order (GradientCheckpointingLayer;
    Any, as the checkpointing attributes set on them are outside torch's Module typing)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in unwrap_peft(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_checkpoint_policy(model: torch.nn.Module, cfg: TrainingConfig) -> int:
    """Gradient checkpointing on every decoder layer but the last `training.checkpoint_skip_layers`.

    Non-reentrant torch checkpointing (activations stay bf16), or,
    with `training.checkpoint_offload` on CUDA, `offloaded_checkpoint`: the layer inputs, the
    only activations checkpointing keeps, go to pinned host memory too. Returns the number of
    checkpointed layers (0 when `training.gradient_checkpointing` is off).
    """
    base = unwrap_peft(model)
    if not cfg.gradient_checkpointing:
        if getattr(base, "is_activation_checkpointing", False):
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()
        return 0
    skip = cfg.checkpoint_skip_layers
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not (getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None)):
        # remote code that checkpoints with the reentrant variant only backpropagates into LoRA
        # weights when the layer inputs require grad (newer transformers set the hook above)
        base.enable_input_require_grads()
    if getattr(base.config, "use_cache", None):
        base.config.use_cache = False
    layers = decoder_layers(base)
    hook = partial(offloaded_checkpoint, state=OffloadState()) if cfg.checkpoint_offload else None
    for i, layer in enumerate(layers):
        # The last layers run first in the backward pass, so their kept activations are freed first.
        layer.gradient_checkpointing = i < len(layers) - skip
        if hook is not None:
            layer._gradient_checkpointing_func = hook
    return sum(layer.gradient_checkpointing for layer in layers)

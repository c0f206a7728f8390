"""`KernelOptions`: which kernels a training run uses, decided once from the recipe and the device.

Every kernel choice is a value passed down as an argument (to `frozen_linear.fuse_lora_layers`,
whose layers hand `fp8` to the autograd function, and to the checkpoint policy's offload hooks),
never a module flag rewritten at run time: a benchmark variant is a different `KernelOptions`.
What is not a choice here was measured once and kept (the losers' numbers: benchmarks/HISTORY.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from peftchat.config import TrainingConfig
from peftchat.kernels import lora_dropout
from peftchat.kernels.fp8 import Fp8Passes


@dataclass(frozen=True)
class KernelOptions:
    """`fused_lora`: LoRA Linears run as one autograd function with their frozen base
    (`frozen_linear`). `fp8`: which of the base matmuls run in FP8 (None: none; the recipe's
    `training.fp8` gives `Fp8Passes()`: the recompute and the input gradient, not the forward the
    loss sees). `triton`: the device runs peftchat's Triton kernels (NF4 dequant, FP8 passes,
    LoRA dropout in the matmuls); for the log, each kernel still checks the tensors it gets.
    `offload`: checkpointed layers park their inputs in host memory (`offload`)."""

    fused_lora: bool = False
    fp8: Optional[Fp8Passes] = None
    triton: bool = False
    offload: bool = False

    @classmethod
    def from_training(cls, cfg: TrainingConfig, device: torch.device, fused_lora: bool) -> KernelOptions:
        """The options of a run of `cfg` on `device`; `fused_lora`: what `training.fused_lora`
        resolved to for this model (auto: on CUDA)."""
        return cls(
            fused_lora=fused_lora or bool(cfg.fp8),
            fp8=Fp8Passes() if cfg.fp8 else None,
            triton=lora_dropout.available(device),
            offload=bool(cfg.gradient_checkpointing and cfg.checkpoint_offload),
        )

    def describe(self) -> str:
        """One line for the run's log, in the speed-ups line's style."""
        parts = ["fused_lora" if self.fused_lora else "peft_lora"]
        if self.fp8 is not None:
            passes = [name for name in ("forward", "recompute", "grad_input") if getattr(self.fp8, name)]
            grad = f", grad {str(self.fp8.grad_dtype).removeprefix('torch.')}" if self.fp8.grad_input else ""
            parts.append(f"fp8 {'+'.join(passes)}{grad}")
        parts.append("triton kernels" if self.triton else "torch kernels (no CUDA Triton)")
        if self.offload:
            parts.append("offloaded checkpoint inputs")
        return ", ".join(parts)

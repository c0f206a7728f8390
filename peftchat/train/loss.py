"""Causal-LM loss that never holds the full float32 logits.

The decoder runs to hidden states; only the positions whose next token carries loss
(`labels[:, 1:] != -100`) go through lm_head + cross-entropy, a chunk of tokens at a time, each
chunk under activation checkpointing so that the backward pass also holds one chunk's logits at
a time. Memory is O(chunk x vocab) instead of O(batch x seq x vocab) and, with loss only on
answers, most of the lm_head work is skipped too. Hand-written because transformers' own loss
takes full logits and peft has none; the result equals transformers' `ForCausalLMLoss`.

`causal_lm_loss` is the one place a fused kernel (liger-kernel's fused linear cross-entropy on
CUDA) would plug in: it gets the hidden states, the head and the targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from peftchat.model.adapters import unwrap_peft
from peftchat.model.kernels import fused_causal_lm_ce

IGNORE_INDEX = -100
# Logit elements per chunk: 2**27 float32 logits = 512 MiB (e.g. ~870 tokens of a 152k vocab).
LOGITS_PER_CHUNK = 2**27
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def count_label_tokens(labels: Tensor) -> int:
    """Tokens that carry loss after the causal shift: `labels[:, 1:] != -100` (call on CPU labels)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(positions, targets): flat indices into the (batch*seq) hidden states whose next token
    carries loss, and those next tokens. Computed on CPU before the forward, the boolean
    selection costs the GPU no host sync."""
    seq = labels.shape[1]
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * seq + cols, shifted[rows, cols]


def with_loss_targets(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch with `loss_positions` / `loss_targets` (see `loss_targets`) in place of `labels`,
    which the loss then no longer needs: one tensor fewer to copy to the device each micro-batch."""
    positions, targets = loss_targets(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return {**inputs, "loss_positions": positions, "loss_targets": targets}


def _logits_transform(config):
    """Post-lm_head scaling some architectures apply in their forward (kept so the loss matches)."""
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(config, "logit_scale", None)  # Cohere: multiplies
    divide = getattr(config, "logits_scaling", None)  # Granite: divides

    def transform(logits: Tensor) -> Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _chunk_loss(head, transform, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = transform(head(hidden).float())
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(model, batch: dict[str, Tensor], *, normalizer: float | None = None,
                   chunk_tokens: int | None = None) -> Tensor:
    """Summed next-token cross-entropy of `batch`, divided by `normalizer` (default: this batch's
    label-token count, i.e. the mean).

    `batch` holds `input_ids`, `attention_mask` or `position_ids` (packed rows), and either
    `labels` or, from `with_loss_targets` on the CPU, `loss_positions` / `loss_targets`; all on the
    model's device. A gradient-accumulation loop passes the label-token count of the
    whole window as `normalizer`, so the window's loss is a per-token mean.
    """
    base = unwrap_peft(model)
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    if "loss_positions" in batch:
        positions, targets = batch["loss_positions"], batch["loss_targets"]
    else:
        positions, targets = loss_targets(batch["labels"])
    n = targets.shape[0]
    if normalizer is None:
        normalizer = max(n, 1)
    if n == 0:  # no loss-bearing token: a zero that still backpropagates
        return hidden.sum() * 0.0
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    fused = fused_causal_lm_ce(model, head, selected, targets)  # liger's kernel on CUDA when enabled, else None
    if fused is not None:
        return fused / normalizer
    transform = _logits_transform(base.config)
    vocab = base.config.get_text_config().vocab_size
    step = chunk_tokens or max(1, LOGITS_PER_CHUNK // vocab)
    total = None
    for start in range(0, n, step):
        h, y = selected[start:start + step], targets[start:start + step]
        if torch.is_grad_enabled():
            # recompute this chunk's logits in backward instead of keeping them
            part = checkpoint(_chunk_loss, head, transform, h, y, use_reentrant=False)
        else:
            part = _chunk_loss(head, transform, h, y)
        total = part if total is None else total + part
    return total / normalizer

"""Causal-LM loss that never holds the full float32 logits.

The decoder runs to hidden states; only the positions whose next token carries loss
(`labels[:, 1:] != -100`) go through lm_head + cross-entropy, a chunk of tokens at a time, each
chunk under activation checkpointing so that the backward pass also holds one chunk's logits at
a time. Memory is O(chunk x vocab) instead of O(batch x seq x vocab) and, with loss only on
answers, most of the lm_head work is skipped too. Hand-written because transformers' own loss
takes full logits and peft has none; the result equals transformers' `ForCausalLMLoss`.

`causal_lm_loss` is the one micro-batch loss of training and evaluation. A fused head loss
(liger-kernel's fused linear cross-entropy on CUDA, `Speedups.head_loss` from
`peftchat.train.speedups.apply_training_speedups`) plugs in through `make_loss`: it gets the
hidden states, the head weight and the targets.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from peftchat.data.batching import loss_targets
from peftchat.kernels.varlen import VARLEN_ATTENTION, packed_kwargs
from peftchat.model.adapters import unwrap_peft
from peftchat.train.speedups import HeadLoss, fused_ce_supports_head

# Logit elements per chunk: 2**27 float32 logits = 512 MiB (e.g. ~870 tokens of a 152k vocab).
LOGITS_PER_CHUNK = 2**27
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Model-config attributes of the scaling some architectures apply to the logits after lm_head, in
# their forward; the loss applies them too (`logits_transform`), and a fused head loss, which
# cannot do (train.speedups.UNFUSED_LOGIT_TRANSFORMS), is skipped when a config sets one. Add a
# family's attribute here and to the transform.
LOGIT_SCALING_ATTRIBUTES = (
    "logit_scale",  # Cohere: multiplies
    "logits_scaling",  # Granite: divides
    "final_logit_softcapping",  # Gemma 2/3: tanh soft-cap
)


def has_logit_scaling(config) -> bool:
    return any(getattr(config, k, None) is not None for k in LOGIT_SCALING_ATTRIBUTES)


def logits_transform(config) -> Callable[[Tensor], Tensor]:
    """The post-lm_head scaling of `LOGIT_SCALING_ATTRIBUTES` (kept so the loss matches the model)."""
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)

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


def tokens_per_chunk(config, chunk_tokens: int | None = None) -> int:
    """Scored tokens whose logits one chunk holds: `LOGITS_PER_CHUNK` over the vocabulary."""
    return chunk_tokens or max(1, LOGITS_PER_CHUNK // config.get_text_config().vocab_size)


def over_head_chunks(
    fn: Callable[..., Tensor], head, config, hidden: Tensor, targets: Tensor, chunk_tokens: int | None = None
) -> list[Tensor]:
    """`fn(head, transform, hidden_chunk, target_chunk)` over chunks of the scored positions, each
    recomputed in backward (checkpointed) when gradients are on, so one chunk's vocab-sized logits
    exist at a time. SFT sums the parts (`causal_lm_loss`); preference objectives keep per-token
    log-probs (`train.preference.sequence_logps`)."""
    transform = logits_transform(config)
    step = tokens_per_chunk(config, chunk_tokens)
    parts = []
    for start in range(0, targets.shape[0], step):
        h, y = hidden[start : start + step], targets[start : start + step]
        if torch.is_grad_enabled():
            parts.append(checkpoint(fn, head, transform, h, y, use_reentrant=False))
        else:
            parts.append(fn(head, transform, h, y))
    return parts


def _fused_applies(head, config, hidden: Tensor) -> bool:
    """A fused head loss needs a plain bias-free Linear head (not e.g. peft's modules_to_save
    wrapper), no logit scaling it cannot do, and a backward pass (its gradient is formed in the
    forward)."""
    return torch.is_grad_enabled() and hidden.is_cuda and fused_ce_supports_head(head, config)


def causal_lm_loss(
    model,
    batch: dict[str, Tensor],
    *,
    normalizer: float | None = None,
    chunk_tokens: int | None = None,
    head_loss: Optional[HeadLoss] = None,
) -> Tensor:
    """Summed next-token cross-entropy of `batch`, divided by `normalizer` (default: this batch's
    label-token count, i.e. the mean).

    `batch` holds `input_ids`, `attention_mask` or `position_ids` (packed rows), and either
    `labels` or, from `with_loss_targets` on the CPU, `loss_positions` / `loss_targets`; all on the
    model's device. A gradient-accumulation loop passes the label-token count of the
    whole window as `normalizer`, so the window's loss is a per-token mean. `head_loss`: a fused
    (hidden, head weight, targets) -> summed loss, used where it applies (`_fused_applies`).
    """
    base = unwrap_peft(model)
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    if "cu_seq_lens" in batch and getattr(base.config, "_attn_implementation", None) == VARLEN_ATTENTION:
        inputs.update(packed_kwargs(batch["cu_seq_lens"], batch["max_seq_len"]))
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
    if head_loss is not None and _fused_applies(head, base.config, selected):
        return head_loss(selected, head.weight, targets) / normalizer
    parts = over_head_chunks(_chunk_loss, head, base.config, selected, targets, chunk_tokens)
    total = parts[0]
    for part in parts[1:]:  # in order, as the single loop summed them
        total = total + part
    return total / normalizer


def make_loss(head_loss: Optional[HeadLoss] = None) -> Callable[..., Tensor]:
    """The micro-batch loss of a run: `causal_lm_loss` with the head loss the speed-up setup chose."""
    return partial(causal_lm_loss, head_loss=head_loss) if head_loss is not None else causal_lm_loss

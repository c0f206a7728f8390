"""Packed rows on a tiny Llama: attention never crosses samples (transformers' packed-sequence
detection from position_ids), so the summed token loss of a packed batch equals the sum of the
samples' losses run alone. Needs use_cache=False — the test pins that trap too."""

import pytest
import torch

from peftchat.data.batching import collate

PAD = 3


def summed_loss(model, batch, **kw):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, **kw).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


# flex_attention: transformers turns the same packed-sequence detection into a block mask, so flex
# skips the blocks across samples instead of masking them (the fast path for packed rows on CUDA)
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_loss_equals_sum_of_samples_alone(tiny_llama_dir, packing_samples, attn):
    samples = packing_samples
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation=attn)
    model.train()  # a training forward, as the loop runs it (no dropout in the tiny model)
    with torch.no_grad():
        alone = sum(summed_loss(model, collate([[s]], PAD, packing=False), use_cache=False) for s in samples)
        packed_batch = collate([samples[:3], samples[3:]], PAD, packing=True)  # row 2 is padded
        packed = summed_loss(model, packed_batch, use_cache=False)
        assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
        # The trap: with the config's use_cache=True and no gradient checkpointing, Llama builds a
        # KV cache and transformers then skips packed-sequence detection — attention crosses samples.
        leaky = summed_loss(model, packed_batch)
        assert abs(leaky.item() - alone.item()) > 1e-3 * alone.item()

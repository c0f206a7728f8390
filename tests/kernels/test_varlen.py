"""peftchat.kernels.varlen: packed rows through the variable-length attention path.

The flash kernel itself needs CUDA (benchmarks check it on the GPU against the eager reference's
loss); here: the per-sample reference against sdpa with a block-diagonal mask, the call into
torch's `varlen_attn` for both of its signatures (a fake kernel that runs the reference), the
transformers registration end to end on a tiny Llama, and which implementation a recipe gets."""

import pytest
import torch

import peftchat.kernels.varlen as varlen
from peftchat.data.batching import collate, sample_bounds, with_loss_targets
from peftchat.train.loss import causal_lm_loss

PAD = 3


def _packed(lengths, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=g)
    k, v = (torch.randn(total, kv_heads, dim, generator=g) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _block_diagonal_sdpa(q, k, v, lengths, scale):
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    mask = causal & (seg[:, None] == seg[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_reference_matches_block_diagonal_mask(kv_heads):
    lengths = [5, 1, 9, 3]
    q, k, v, cu = _packed(lengths, kv_heads=kv_heads)
    got = varlen.packed_causal_attention(q, k, v, cu, max(lengths), scale=0.3)
    torch.testing.assert_close(got, _block_diagonal_sdpa(q, k, v, lengths, 0.3), atol=1e-5, rtol=1e-5)


CALLS: list = []


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
    """torch 2.10's signature (is_causal, no GQA switch): a fake that records and runs the reference."""
    assert is_causal and key.shape[1] == query.shape[1]  # no enable_gqa: the heads were repeated
    CALLS.append(("2.10", max_q, max_k))
    return varlen._reference_varlen(query, key, value, cu_seq_q, scale)


def varlen_attn_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """torch >= 2.11's signature: window_size (-1, 0) is causal; GQA needs enable_gqa."""
    assert tuple(window_size) == (-1, 0) and enable_gqa == (key.shape[1] != query.shape[1])
    CALLS.append(("2.11", max_q, max_k))
    return varlen._reference_varlen(query, key, value, cu_seq_q, scale)


@pytest.mark.parametrize("fake", [varlen_attn_2_10, varlen_attn_2_11])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash_call_for_each_torch_signature(monkeypatch, fake, kv_heads):
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", fake)
    CALLS.clear()
    lengths = [4, 7, 2]
    q, k, v, cu = _packed(lengths, kv_heads=kv_heads)
    got = varlen._flash_varlen(q, k, v, cu, max(lengths), 0.25)
    assert CALLS == [(fake.__name__[-4:].replace("_", "."), 7, 7)]
    torch.testing.assert_close(got, _block_diagonal_sdpa(q, k, v, lengths, 0.25), atol=1e-5, rtol=1e-5)


def test_sample_bounds_cover_samples_and_padding():
    batch = collate(
        [
            [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
            [{"input_ids": [4], "labels": [4]}],
        ],
        PAD,
        packing=True,
    )
    cu, longest = sample_bounds(batch["position_ids"])
    # row 1: samples of 3 and 2; row 2: a sample of 1, then 4 padding positions
    assert cu.tolist() == [0, 3, 5, 6, 10] and cu.dtype == torch.int32 and longest == 4
    assert "cu_seq_lens" not in with_loss_targets(collate([[{"input_ids": [1], "labels": [1]}]], PAD, packing=False))


def test_packed_loss_through_registered_varlen_attention(tiny_llama_dir, packing_samples, monkeypatch):
    """A packed batch through `sdpa_varlen` (the per-sample path, counted) has the summed loss of
    the samples run alone with sdpa; an unpacked batch never reaches the per-sample path."""
    from transformers import AutoModelForCausalLM

    samples = packing_samples
    calls = []
    reference = varlen._reference_varlen
    monkeypatch.setattr(varlen, "_reference_varlen", lambda *a: calls.append(1) or reference(*a))
    name = varlen.register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation=name)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        alone = sum(
            causal_lm_loss(sdpa, with_loss_targets(collate([[s]], PAD, packing=False)), normalizer=1.0) for s in samples
        )
        unpacked = collate([[samples[0]], [samples[2]]], PAD, packing=False)  # padded rows: sdpa's mask
        torch.testing.assert_close(
            causal_lm_loss(model, with_loss_targets(unpacked)), causal_lm_loss(sdpa, with_loss_targets(unpacked))
        )
        assert calls == []
        packed = with_loss_targets(collate([samples[:3], samples[3:]], PAD, packing=True))
        got = causal_lm_loss(model, packed, normalizer=1.0)
    assert len(calls) == layers
    assert got.item() == pytest.approx(alone.item(), rel=1e-5)


def test_recipe_attention_choice(tiny_llama_dir, monkeypatch):
    from peftchat.config import recipe_from_dict
    from peftchat.errors import UserError
    from peftchat.model import load

    def recipe(attn="sdpa", packing=True):
        return recipe_from_dict(
            {
                "model": {"path": str(tiny_llama_dir), "attn_implementation": attn},
                "data": {"train": "x.jsonl", "packing": packing},
            }
        )

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert load.attention_for(str(tiny_llama_dir), recipe(), cpu, for_training=True) == "sdpa"  # no kernel here
    monkeypatch.setattr(load, "flash_varlen_available", lambda device: device.type == "cuda")
    assert load.attention_for(str(tiny_llama_dir), recipe(), cuda, for_training=True) == varlen.VARLEN_ATTENTION
    assert load.attention_for(str(tiny_llama_dir), recipe(packing=False), cuda, for_training=True) == "sdpa"
    assert load.attention_for(str(tiny_llama_dir), recipe(), cuda, for_training=False) == "sdpa"
    # sdpa_masked: transformers gets plain sdpa, packed CUDA training included (the benchmarks' reference)
    masked = recipe(attn="sdpa_masked")
    assert load.attention_for(str(tiny_llama_dir), masked, cuda, for_training=True) == "sdpa"
    assert load.attention_for(str(tiny_llama_dir / "missing"), masked, cuda, for_training=True) == "sdpa"
    explicit = recipe(attn=varlen.VARLEN_ATTENTION)
    assert load.attention_for(str(tiny_llama_dir), explicit, cpu) == varlen.VARLEN_ATTENTION
    monkeypatch.setattr("transformers.LlamaForCausalLM._supports_attention_backend", False)
    with pytest.raises(UserError, match="registered attention functions"):
        load.attention_for(str(tiny_llama_dir), explicit, cpu)
    with pytest.raises(UserError, match="needs a model class of transformers itself"):
        load.attention_for(str(tiny_llama_dir / "missing"), explicit, cpu)  # no config: e.g. remote code

"""The chunked, label-selected loss equals transformers' own; accumulation is per token."""

import pytest
import torch

from peftchat.config import recipe_from_dict
from peftchat.data.batching import MicroBatch, count_label_tokens, loss_targets, with_loss_targets
from peftchat.model.adapters import apply_lora
from peftchat.model.load import load_base_model
from peftchat.train.loss import LOGIT_SCALING_ATTRIBUTES, causal_lm_loss
from peftchat.train.step import backward_window

IGN = -100


@pytest.fixture(scope="module")
def lora_model(tiny_llama_dir):
    """A LoRA model whose adapter is not a no-op (B != 0), in fp32 on CPU, dropout off."""
    r = recipe_from_dict(
        {
            "model": {"path": str(tiny_llama_dir), "dtype": "fp32"},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": "x"},
            "training": {"device": "cpu", "gradient_checkpointing": False},
        }
    )
    torch.manual_seed(0)
    model = apply_lora(load_base_model(r), r, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _pad(samples, pad_id=3):
    """Right-pad (input_ids, labels) pairs into a batch with an attention mask."""
    t = max(len(ids) for ids, _ in samples)
    out = {
        "input_ids": torch.full((len(samples), t), pad_id),
        "labels": torch.full((len(samples), t), IGN),
        "attention_mask": torch.zeros((len(samples), t), dtype=torch.long),
    }
    for i, (ids, lab) in enumerate(samples):
        out["input_ids"][i, : len(ids)] = torch.tensor(ids)
        out["labels"][i, : len(lab)] = torch.tensor(lab)
        out["attention_mask"][i, : len(ids)] = 1
    return out


def _micro(samples):
    batch = _pad(samples)
    return MicroBatch(with_loss_targets(batch), count_label_tokens(batch["labels"]), 0)


def _samples():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(20, 3000, (23,), generator=g).tolist()
    b = torch.randint(20, 3000, (9,), generator=g).tolist()
    return [(a, [IGN] * 10 + a[10:]), (b, [IGN] * 3 + b[3:])]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_label_selection_is_the_causal_shift():
    labels = torch.tensor([[IGN, IGN, 5, 6, IGN], [IGN, 7, IGN, IGN, IGN]])
    positions, targets = loss_targets(labels)
    assert positions.tolist() == [1, 2, 5]  # row 0 positions 1, 2 predict 5, 6; row 1 position 0 predicts 7
    assert targets.tolist() == [5, 6, 7]
    assert count_label_tokens(labels) == 3


@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_loss_and_grads_equal_transformers(lora_model, chunk_tokens):
    batch = _pad(_samples())
    lora_model.zero_grad()
    ref = lora_model(**batch).loss  # transformers + peft: full logits, mean over label tokens
    ref.backward()
    ref_grads = _grads(lora_model)
    lora_model.zero_grad()
    ours = causal_lm_loss(lora_model, with_loss_targets(batch), chunk_tokens=chunk_tokens)
    ours.backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    for n, g in _grads(lora_model).items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_no_grad_path_and_targets_computed_on_the_fly(lora_model):
    batch = _pad(_samples())
    with torch.no_grad():
        ref = lora_model(**batch).loss
        ours = causal_lm_loss(lora_model, batch, chunk_tokens=3)
    assert abs(ours.item() - ref.item()) < 1e-5


def test_accumulation_is_normalised_over_the_window_not_per_micro_batch(lora_model):
    s1, s2 = _samples()  # 13 and 6 loss tokens: per-micro-batch means would weight them equally
    lora_model.zero_grad()
    loss_big, n_big = backward_window(lora_model, [_micro([s1, s2])], torch.device("cpu"))
    big = _grads(lora_model)
    lora_model.zero_grad()
    loss_acc, n_acc = backward_window(lora_model, [_micro([s1]), _micro([s2])], torch.device("cpu"))
    acc = _grads(lora_model)
    assert n_big == n_acc == 13 + 6
    assert loss_acc.item() == pytest.approx(loss_big.item(), abs=1e-5)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-5, atol=1e-7, msg=n)
    # the naive mean of micro-batch means gives a different gradient (so this test can fail)
    lora_model.zero_grad()
    for s in (s1, s2):
        (causal_lm_loss(lora_model, _pad([s])) / 2).backward()
    naive = _grads(lora_model)
    assert max((naive[n] - big[n]).abs().max().item() for n in big) > 1e-4


@pytest.mark.parametrize("attribute", LOGIT_SCALING_ATTRIBUTES)
def test_every_logit_scaling_attribute_is_applied_and_stops_the_fused_head_loss(attribute):
    from types import SimpleNamespace

    from peftchat.train.loss import _fused_applies, has_logit_scaling, logits_transform

    logits = torch.tensor([[3.0, -1.0, 40.0]])
    config = SimpleNamespace(**{attribute: 2.0})
    assert has_logit_scaling(config) and not has_logit_scaling(SimpleNamespace())
    assert not torch.equal(logits_transform(config)(logits), logits)  # the list and the transform agree
    head = torch.nn.Linear(4, 3, bias=False)
    hidden = torch.zeros(2, 4)
    assert not _fused_applies(head, config, hidden)
    assert not _fused_applies(head, SimpleNamespace(), hidden)  # CPU: liger's kernel is CUDA-only

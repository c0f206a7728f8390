"""peftchat's DPO / SimPO / ORPO against TRL's own loss code, side by side on the tiny Llama and one
fixed batch of pairs: loss, chosen/rejected rewards and the LoRA gradients (TRL is a test-only
dependency: the `dev` extra)."""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")

from peftchat.config import recipe_from_dict  # noqa: E402
from peftchat.data.preference import pair_tensors  # noqa: E402
from peftchat.train.preference import PreferenceLoss  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)


def _model(tiny_llama_dir, recipe):
    from transformers import AutoModelForCausalLM

    from peftchat.model.adapters import apply_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = apply_lora(base, recipe, verbose=False)
    with torch.no_grad():  # a LoRA that moves the policy away from the base (B starts at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _recipe(tiny_llama_dir, tmp_path, objective, **training):
    return recipe_from_dict(
        {
            "model": {"path": str(tiny_llama_dir), "dtype": "fp32", "compute_dtype": "fp32"},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": "unused.jsonl"},
            "training": {
                "device": "cpu",
                "output_dir": str(tmp_path / "run"),
                "objective": objective,
                "gradient_checkpointing": False,
                **training,
            },
        }
    )


def _batch():
    """Two pairs, right-padded, rows [chosen0, chosen1, rejected0, rejected1]: (input_ids,
    attention_mask, completion_mask), prompts of 5 and 7 tokens, replies of 3-6 tokens."""
    g = torch.Generator().manual_seed(1)
    rows, prompts = [], []
    for prompt_len, reply_len in [(5, 4), (7, 6), (5, 3), (7, 5)]:
        rows.append(torch.randint(20, 3000, (prompt_len + reply_len,), generator=g))
        prompts.append(prompt_len)
    rows[2][:5], rows[3][:7] = rows[0][:5], rows[1][:7]  # a pair shares its prompt
    width = max(len(r) for r in rows)
    ids = torch.zeros(4, width, dtype=torch.long)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(r)], mask[i, : len(r)], completion[i, p : len(r)] = r, 1, 1
    return ids, mask, completion


def _ours(model, recipe, ids, mask, completion):
    labels = ids.masked_fill(completion == 0, -100)
    loss_fn = PreferenceLoss(recipe.training)
    loss = loss_fn(model, pair_tensors({"input_ids": ids, "attention_mask": mask, "labels": labels}))
    return loss, loss_fn.take_metrics()


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _same_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["hello"], "chosen": [" yes"], "rejected": [" no"]})


def test_dpo_sigmoid_equals_trl(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    recipe = _recipe(tiny_llama_dir, tmp_path, "dpo", beta=0.1)
    model = _model(tiny_llama_dir, recipe)
    ids, mask, completion = _batch()
    ours, metrics = _ours(model, recipe, ids, mask, completion)
    our_grads = _grads(model, ours)

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=["sigmoid"],
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=False,
        bf16=False,
        precompute_ref_log_probs=False,
    )
    from transformers import AutoModelForCausalLM

    # the base as TRL's reference model: what peftchat's adapter-off reference is (TRL would take a
    # PeftModel handed over with its weights as re-training, and copy the adapter as the reference)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    model.train()
    theirs = trainer._compute_loss(
        trainer.model, {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}, return_outputs=False
    )
    torch.testing.assert_close(ours.detach(), theirs.detach(), **TOL)
    logged = trainer._metrics["train"]
    assert metrics["rewards/chosen"] == pytest.approx(logged["rewards/chosen"][-1], rel=1e-4, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(logged["rewards/rejected"][-1], rel=1e-4, abs=1e-6)
    assert metrics["rewards/margin"] == pytest.approx(logged["rewards/margins"][-1], rel=1e-4, abs=1e-6)
    assert metrics["rewards/accuracy"] == pytest.approx(logged["rewards/accuracies"][-1])
    assert abs(metrics["rewards/margin"]) > 1e-4  # the LoRA moved the policy: a real comparison
    _same_grads(our_grads, _grads(model, theirs))


def _trl_logps(model, ids, mask, completion, average):
    from trl.experimental.cpo import CPOTrainer

    labels = ids.masked_fill(completion == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo(tiny_llama_dir, tmp_path, smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    recipe = _recipe(tiny_llama_dir, tmp_path, "simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    model = _model(tiny_llama_dir, recipe)
    ids, mask, completion = _batch()
    ours, metrics = _ours(model, recipe, ids, mask, completion)
    our_grads = _grads(model, ours)
    # CPOTrainer's loss code on an object with its settings (building the trainer re-tokenizes a dataset)
    trainer = copy.copy(CPOTrainer.__new__(CPOTrainer))
    args = CPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.7,
        cpo_alpha=0.0,
        label_smoothing=smoothing,
        report_to=[],
        use_cpu=True,
    )
    trainer.loss_type, trainer.beta, trainer.simpo_gamma = args.loss_type, args.beta, args.simpo_gamma
    trainer.label_smoothing, trainer.alpha = args.label_smoothing, args.alpha
    trainer.accelerator = type("A", (), {"device": torch.device("cpu")})()
    logps = _trl_logps(model, ids, mask, completion, average=True)
    losses, r_c, r_r = trainer.cpo_loss(*logps.chunk(2))
    theirs = losses.mean()
    torch.testing.assert_close(ours.detach(), theirs.detach(), **TOL)
    assert metrics["rewards/chosen"] == pytest.approx(r_c.mean().item(), rel=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(r_r.mean().item(), rel=1e-4)
    _same_grads(our_grads, _grads(model, theirs))


def test_orpo_equals_trl_odds_ratio(tiny_llama_dir, tmp_path):
    """ORPO: TRL's odds-ratio term and rewards exactly; the NLL term on the chosen reply's tokens
    (TRL's ORPOTrainer also scores the prompt there: peftchat follows the paper and SFT)."""
    from trl.experimental.orpo import ORPOTrainer

    recipe = _recipe(tiny_llama_dir, tmp_path, "orpo", beta=0.25)
    model = _model(tiny_llama_dir, recipe)
    ids, mask, completion = _batch()
    ours, metrics = _ours(model, recipe, ids, mask, completion)
    our_grads = _grads(model, ours)
    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.beta = 0.25
    trainer.accelerator = type("A", (), {"device": torch.device("cpu")})()
    labels = ids.masked_fill(completion == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    losses, r_c, r_r, _, _ = trainer.odds_ratio_loss(*logps.chunk(2))
    nll = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, logits.shape[-1]), labels[:2, 1:].reshape(-1))
    theirs = nll - losses.mean()
    torch.testing.assert_close(ours.detach(), theirs.detach(), **TOL)
    assert metrics["rewards/chosen"] == pytest.approx(r_c.mean().item(), rel=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(r_r.mean().item(), rel=1e-4)
    _same_grads(our_grads, _grads(model, theirs))


def test_chunked_logps_equal_unchunked(tiny_llama_dir, tmp_path):
    """A chunk of 3 scored tokens at a time gives the whole batch's log-probs and gradients."""
    from peftchat.train.preference import sequence_logps

    recipe = _recipe(tiny_llama_dir, tmp_path, "dpo")
    model = _model(tiny_llama_dir, recipe)
    ids, mask, completion = _batch()
    batch = pair_tensors({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(completion == 0, -100)})
    whole, counts = sequence_logps(model, batch)
    chunked, _ = sequence_logps(model, batch, chunk_tokens=3)
    torch.testing.assert_close(whole, chunked, **TOL)
    assert counts.tolist() == completion[:, 1:].sum(1).float().tolist()
    _same_grads(_grads(model, whole.sum()), _grads(model, chunked.sum()))

"""training.max_memory_gib: the policy choice as a pure function (8B Llama shape numbers, checked
against the peaks measured on the H200: benchmarks/HISTORY.md), config validation, and the
choice applied to a tiny model on CPU."""

import pytest

from peftchat.config import recipe_from_dict
from peftchat.errors import ConfigError
from peftchat.train import speedups as kernels
from peftchat.train.memory_budget import ModelShape, budgeted_training_config, choose_policy, estimate_gib

LLAMA3_8B = ModelShape(hidden=4096, layers=32, intermediate=14336, vocab=128256, heads=32, kv_heads=8)
TOKENS = 4 * 2048


# lean, ref (eager, every layer checkpointed), fast (skip 8): 8B NF4 4 x 2048 peaks, HISTORY.md round 2
@pytest.mark.parametrize("skip,offload,measured", [(0, True, 8.21), (0, False, 10.3), (8, False, 20.79)])
def test_estimate_is_close_to_and_not_under_the_measured_8b_peak(skip, offload, measured):
    est = estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, skip, offload)
    assert measured <= est <= measured * 1.06
    one_more = estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, skip + 1, offload) - est
    assert abs(one_more - 1.375) <= 0.07  # measured: 1.36-1.39 GiB per un-checkpointed layer (HISTORY.md)


# through the fused LoRA function (CUDA's default): lean, skip 8 / 12 (r21), skip 13 (r22), skip 10
# (round 5), 8B NF4 4 x 2048 at dropout 0.05, HISTORY.md rounds 5-7
@pytest.mark.parametrize(
    "skip,offload,measured",
    [(0, True, 7.64), (8, False, 16.27), (10, False, 18.27), (12, False, 20.28), (13, False, 21.28)],
)
def test_fused_estimate_is_close_to_and_not_under_the_measured_8b_peak(skip, offload, measured):
    est = estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, skip, offload, fused=True)
    assert measured <= est <= measured * 1.06
    assert est < estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, skip, offload)  # peft's layers keep more


# training.fp8 on the fused path: lean, skip 12 (r26), skip 8 (r25), 8B NF4 4 x 2048, HISTORY.md round 9
@pytest.mark.parametrize("skip,offload,measured", [(0, True, 7.99), (8, False, 16.46), (12, False, 20.47)])
def test_fp8_estimate_is_close_to_and_not_under_the_measured_8b_peak(skip, offload, measured):
    est = estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, skip, offload, fused=True, fp8=True)
    assert measured <= est <= measured * 1.06
    assert est >= estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, skip, offload, fused=True)


def test_fused_budgets_leave_out_more_layers_than_peft_budgets():
    for budget in (16, 22, 24):
        fused = choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, budget, fused=True)
        peft = choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, budget)
        assert fused.fits and fused.estimated_gib <= 0.95 * budget
        assert fused.checkpoint_skip_layers > peft.checkpoint_skip_layers
        # the fastest that fits: one more un-checkpointed layer would not
        more = estimate_gib(
            LLAMA3_8B, "4bit", 16, TOKENS, fused.checkpoint_skip_layers + 1, fused.checkpoint_offload, fused=True
        )
        assert more > 0.95 * budget
    # 22 GiB (the tuned peer's 21.67 rounded up): 13 layers left out, r22 measured 21.28 there
    assert choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, 22, fused=True).checkpoint_skip_layers == 13


def test_8b_budgets_pick_the_fastest_policy_that_fits():
    at = {b: choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, b) for b in (8, 9, 16, 24, 64)}
    assert not at[8].fits and at[8].checkpoint_offload and at[8].checkpoint_skip_layers == 0  # smallest, said so
    assert at[9].fits and (at[9].checkpoint_skip_layers, at[9].checkpoint_offload) == (0, True)
    assert at[16].fits and at[16].estimated_gib <= 0.95 * 16
    assert at[24].fits and at[24].checkpoint_skip_layers >= 8 and at[24].estimated_gib <= 0.95 * 24
    assert at[64].fits and at[64].checkpoint_skip_layers == 32 and not at[64].checkpoint_offload
    skips = [at[b].checkpoint_skip_layers for b in (9, 16, 24, 64)]
    assert skips == sorted(skips) and len(set(skips)) == 4  # more memory, fewer recomputed layers
    # one more skipped layer would not fit: the choice is the fastest, not just a fitting one
    p = at[24]
    assert estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, p.checkpoint_skip_layers + 1, p.checkpoint_offload) > 0.95 * 24


def test_no_offload_when_compiling_and_quantization_changes_the_estimate():
    p = choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, 16, allow_offload=False)
    assert not p.checkpoint_offload and p.fits
    assert (
        estimate_gib(LLAMA3_8B, "none", 16, TOKENS, 0, True) > estimate_gib(LLAMA3_8B, "4bit", 16, TOKENS, 0, True) + 8
    )
    with pytest.raises(ValueError):
        choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, 0)


@pytest.mark.parametrize("value", [0, -2])
def test_config_rejects_a_non_positive_budget(value):
    with pytest.raises(ConfigError, match="training.max_memory_gib"):
        recipe_from_dict({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "training": {"max_memory_gib": value}})
    r = recipe_from_dict({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "training": {"max_memory_gib": 16}})
    assert r.training.max_memory_gib == 16


def test_budget_overrides_the_recipe_policy_and_prints_it(tiny_llama_dir, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))

    def recipe(budget):
        return recipe_from_dict(
            {
                "model": {"path": str(tiny_llama_dir), "quantization": "none"},
                "adapter": {"r": 4},
                "data": {"train": "x.jsonl", "max_length": 64},
                "training": {
                    "gradient_checkpointing": True,
                    "checkpoint_skip_layers": 0,
                    "checkpoint_offload": False,
                    "fused_kernels": False,
                    "batch_size": 2,
                    "max_memory_gib": budget,
                },
            }
        )

    def applied(budget):
        return kernels.apply_training_speedups(model, budgeted_training_config(model, recipe(budget))).applied

    assert "max_memory_gib 64 -> checkpointed 0/2 layers" in applied(64)  # a tiny model: nothing needs recomputing
    assert "max_memory_gib 64: checkpoint_skip_layers 2" in capsys.readouterr().out
    # nothing fits: the smallest policy (2 layers: offload saves nothing)
    assert any(a.startswith("max_memory_gib 0.0001 -> checkpointed 2/2 layers") for a in applied(1e-4))
    assert "NOTHING FITS, smallest policy used; a smaller training.batch_size" in capsys.readouterr().out


@pytest.mark.parametrize("fused_lora", [True, False])
def test_budget_estimates_the_lora_path_the_run_will_take(tiny_llama_dir, monkeypatch, fused_lora):
    from transformers import AutoModelForCausalLM

    from peftchat.train import memory_budget

    seen = []
    choose = memory_budget.choose_policy
    monkeypatch.setattr(
        memory_budget, "choose_policy", lambda *a, **k: seen.append((k["fused"], k["fp8"])) or choose(*a, **k)
    )
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    fp8_settings = (False, True) if fused_lora else (False,)  # training.fp8 needs the fused function (config)
    for fp8 in fp8_settings:
        recipe = recipe_from_dict(
            {
                "model": {"path": str(tiny_llama_dir), "quantization": "none"},
                "data": {"train": "x.jsonl", "max_length": 64},
                "training": {"fused_lora": fused_lora, "max_memory_gib": 16, "fp8": fp8},
            }
        )
        budgeted_training_config(model, recipe)
    assert seen == [(fused_lora, fp8) for fp8 in fp8_settings]


def test_preference_pairs_double_the_rows_and_dpo_adds_its_reference_forward():
    """A pair puts two rows in the forward; DPO's adapter-off reference is one more forward."""
    sft = estimate_gib(LLAMA3_8B, "4bit", 16, 4 * 2048, 0, True, fused=True)
    pairs = estimate_gib(LLAMA3_8B, "4bit", 16, 2 * 4 * 2048, 0, True, fused=True)
    dpo = estimate_gib(LLAMA3_8B, "4bit", 16, 2 * 4 * 2048, 8, True, fused=True, reference_pass=True)
    assert pairs > sft + 1.0  # the doubled activations of the recompute and the kept inputs
    assert dpo > estimate_gib(LLAMA3_8B, "4bit", 16, 2 * 4 * 2048, 8, True, fused=True)
    # 16 GiB fits SFT's 4 x 2048 with layers left out of checkpointing; the same micro-batch of pairs
    # gets fewer (or none), and a DPO reference pass never more than ORPO/SimPO's
    sft_policy = choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, 16, fused=True)
    orpo_policy = choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, 16, fused=True, rows_per_sample=2)
    dpo_policy = choose_policy(LLAMA3_8B, "4bit", 16, 4, 2048, 16, fused=True, rows_per_sample=2, reference_pass=True)
    assert sft_policy.checkpoint_skip_layers > orpo_policy.checkpoint_skip_layers >= dpo_policy.checkpoint_skip_layers
    assert orpo_policy.estimated_gib <= 0.95 * 16 and dpo_policy.estimated_gib <= 0.95 * 16


@pytest.mark.parametrize(
    "objective, reference, expected",
    [
        ("sft", "auto", (1, False)),
        ("orpo", "auto", (2, False)),
        ("dpo", "auto", (2, True)),
        ("dpo", "precomputed", (2, False)),
    ],
)
def test_budget_counts_what_a_preference_step_holds(tiny_llama_dir, monkeypatch, objective, reference, expected):
    from transformers import AutoModelForCausalLM

    from peftchat.train import memory_budget

    seen = []
    choose = memory_budget.choose_policy
    monkeypatch.setattr(
        memory_budget,
        "choose_policy",
        lambda *a, **k: seen.append((k["rows_per_sample"], k["reference_pass"])) or choose(*a, **k),
    )
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    data = {"train": "x.jsonl", "max_length": 64, **({"format": "preference"} if objective != "sft" else {})}
    recipe = recipe_from_dict(
        {
            "model": {"path": str(tiny_llama_dir), "quantization": "none"},
            "data": data,
            "training": {"max_memory_gib": 16, "objective": objective, "reference": reference},
        }
    )
    budgeted_training_config(model, recipe)
    assert seen == [expected]


def test_the_run_reports_the_estimate_it_chose_by(tiny_llama_dir, monkeypatch, capsys):
    """The speed-ups line (and a benchmark row's `applied`) carries the chosen policy's estimated
    peak, to stand beside the measured one; the budget is GPU-only, so the test lets it apply here."""
    import torch

    from peftchat.train import build, memory_budget
    from peftchat.train.run import TrainHooks

    monkeypatch.setattr(memory_budget, "budget_applies", lambda recipe, device_type: True)
    recipe = recipe_from_dict(
        {
            "model": {"path": str(tiny_llama_dir), "quantization": "none", "dtype": "fp32"},
            "data": {"train": "x.jsonl", "max_length": 64},
            "training": {"max_memory_gib": 16, "batch_size": 2, "device": "cpu"},
        }
    )
    seen: list[str] = []
    build.setup_model(recipe, torch.device("cpu"), TrainHooks(speedups_applied=seen.extend))
    estimates = [a for a in seen if a.startswith("memory estimate ")]
    said = capsys.readouterr().out
    assert len(estimates) == 1 and f"(estimated peak {float(estimates[0].split()[2]):.1f} GiB" in said
    assert "max_memory_gib 16 -> checkpointed" in ", ".join(seen)


@pytest.mark.parametrize("fused", [False, True])
def test_a_pair_doubles_exactly_the_activation_terms(fused):
    """Weights and LoRA state do not grow with rows; everything else (kept inputs, recompute) is
    twice SFT's for a micro-batch of pairs, and DPO's reference adds one layer's activations at the
    forward's end (fused path, where that moment can be the peak)."""
    fixed = estimate_gib(LLAMA3_8B, "4bit", 16, 0, 0, False, fused=fused)
    sft = estimate_gib(LLAMA3_8B, "4bit", 16, 4 * 2048, 0, False, fused=fused)
    pairs = estimate_gib(LLAMA3_8B, "4bit", 16, 2 * 4 * 2048, 0, False, fused=fused)
    assert pairs - fixed == pytest.approx(2 * (sft - fixed))
    if fused:
        tokens = 2 * 4 * 2048
        layer_acts = tokens * 2 * (7 * LLAMA3_8B.hidden + 3 * LLAMA3_8B.intermediate) / 2**30
        no_ref = estimate_gib(LLAMA3_8B, "4bit", 16, tokens, 8, False, fused=True)
        dpo = estimate_gib(LLAMA3_8B, "4bit", 16, tokens, 8, False, fused=True, reference_pass=True)
        assert dpo - no_ref == pytest.approx(layer_acts)


def test_a_budget_that_fits_sft_but_not_dpo_gives_dpo_a_leaner_policy():
    """The budget is the SFT run's fastest fitting estimate: the DPO run of the same recipe must not
    be handed the same policy (it would not fit)."""
    sft = choose_policy(LLAMA3_8B, "4bit", 16, 2, 1024, 24, fused=True)
    budget = sft.estimated_gib / 0.95 + 0.01
    sft = choose_policy(LLAMA3_8B, "4bit", 16, 2, 1024, budget, fused=True)
    dpo = choose_policy(LLAMA3_8B, "4bit", 16, 2, 1024, budget, fused=True, rows_per_sample=2, reference_pass=True)
    assert sft.fits
    lean = (dpo.checkpoint_skip_layers, not dpo.checkpoint_offload) < (
        sft.checkpoint_skip_layers,
        not sft.checkpoint_offload,
    )
    assert lean and dpo.estimated_gib <= 0.95 * budget

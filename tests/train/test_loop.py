"""The training loop end to end on a tiny Llama: loss falls, outputs, exact resume, QLoRA, errors."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from peftchat.config import load_recipe
from peftchat.errors import UserError
from peftchat.train import loop
from peftchat.train.loop import train

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def _recipe(tiny_llama_dir, out, *overrides):
    base = [
        f"model.path={tiny_llama_dir}",
        f"training.output_dir={out}",
        "training.device=cpu",
        "training.tensorboard=false",
    ]
    return load_recipe(os.path.join(RECIPES, "demo.yaml"), base + list(overrides))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_demo_training_loss_falls_and_writes_the_run(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = _recipe(
        tiny_llama_dir,
        out,
        "training.max_steps=30",
        "training.save_steps=10",
        "training.eval_steps=15",
        "training.log_steps=5",
        "training.save_total_limit=2",
    )
    assert train(r) == out
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
        "recipe.yaml",
        "metrics.jsonl",
        "training_summary.json",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    rows = _rows(out)
    train_rows = [x for x in rows if "loss" in x]
    eval_rows = [x for x in rows if "eval_loss" in x]
    assert [x["step"] for x in train_rows] == [1, 5, 10, 15, 20, 25, 30]
    assert all({"lr", "tokens_per_s", "tokens", "memory_gb"} <= x.keys() for x in train_rows)
    assert [x["step"] for x in eval_rows] == [15, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.2
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_loss"] == train_rows[-1]["loss"]
    assert summary["eval_loss"] == eval_rows[-1]["eval_loss"] and summary["trainable_params"] > 0
    assert load_recipe(out / "recipe.yaml").training.max_steps == 30
    # the saved adapter is a plain peft adapter: it loads and changes the base model's output
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    ids = torch.tensor([[5, 60, 700, 80]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("packing", [False, True])
def test_first_step_loss_equals_transformers_peft_forward(tiny_llama_dir, tmp_path, packing):
    from peftchat.data.batching import Batches
    from peftchat.data.pipeline import build_datasets, sample_limit
    from peftchat.model.adapters import apply_lora
    from peftchat.model.load import load_base_model
    from peftchat.model.tokenizer import load_tokenizer

    out = tmp_path / "run"
    r = _recipe(
        tiny_llama_dir,
        out,
        "training.max_steps=1",
        "training.batch_size=3",
        "adapter.dropout=0.0",
        f"data.packing={str(packing).lower()}",
        "data.max_length=300",
    )
    train(r)
    first = _rows(out)[0]["loss"]

    tok = load_tokenizer(r)
    data = build_datasets(r, tok)
    batches = Batches(
        data.train,
        batch_size=3,
        max_length=sample_limit(r),
        pad_id=tok.pad_token_id,
        packing=packing,
        group_by_length=r.data.group_by_length,
        shuffle=r.data.shuffle,
        seed=r.training.seed,
    )
    rows = batches.plan(0)[0]
    batch = batches.collate(rows)
    assert ("position_ids" in batch) == packing
    if packing:
        assert max(len(row) for row in rows) > 1  # rows really hold several samples
    model = apply_lora(load_base_model(r), r, verbose=False)
    with torch.no_grad():
        ref = model(**batch, use_cache=False).loss.item()  # plain transformers + peft forward
    assert abs(first - ref) < 1e-5


def _interrupt_at(step):
    """Hooks that send ourselves SIGINT (a real Ctrl-C) once the loop is done with `step`."""

    def after_step(run):
        if run.state.step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return loop.TrainHooks(after_step=after_step)


def test_interrupted_and_resumed_run_is_bit_identical(tiny_llama_dir, tmp_path):
    # dropout > 0 so the restored RNG matters; accumulation and an epoch boundary on the way;
    # step 7 is neither a save nor an eval step, so the Ctrl-C path writes checkpoint-7 itself
    # (22 demo samples, batch 5: 5 micro-batches = windows of 2, 2, 1 per epoch)
    args = [
        "adapter.dropout=0.2",
        "training.batch_size=5",
        "training.gradient_accumulation_steps=2",
        "training.max_steps=14",
        "training.save_steps=4",
        "training.eval_steps=5",
        "training.log_steps=1",
        "training.lr=2e-3",
    ]
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    train(_recipe(tiny_llama_dir, ref_out, *args))

    inherited = signal.getsignal(signal.SIGINT)  # default, or SIG_IGN under nohup / `&`
    with pytest.raises(KeyboardInterrupt):
        train(_recipe(tiny_llama_dir, out, *args), hooks=_interrupt_at(7))
    assert (out / "checkpoint-7" / "complete").is_file()
    assert signal.getsignal(signal.SIGINT) == inherited  # the handler found on entry is back
    assert not (out / "adapter_model.safetensors").exists()

    train(_recipe(tiny_llama_dir, out, *args, "training.resume=true"))
    ref, got = _adapter(ref_out), _adapter(out)
    assert ref.keys() == got.keys() and len(ref) > 0
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    # the metrics log reads as one run: same losses at the same steps, no duplicate rows
    strip = lambda rows: [(x["step"], x.get("loss"), x.get("eval_loss")) for x in rows]
    assert strip(_rows(out)) == strip(_rows(ref_out))
    # the steps of the first part show in the totals too
    assert (
        json.loads((out / "training_summary.json").read_text())["tokens"]
        == json.loads((ref_out / "training_summary.json").read_text())["tokens"]
    )


def test_resume_from_explicit_checkpoint_path_ignores_leftover_temp_dir(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    args = ["training.max_steps=4", "training.save_steps=2", "training.save_total_limit=0"]
    train(_recipe(tiny_llama_dir, out, *args))
    ref = _adapter(out)
    # a crashed save of a later step must not be picked up, and is cleaned away
    stale = out / ".tmp-checkpoint-9-0000"
    stale.mkdir()
    (stale / "complete").write_text("9\n")
    (out / "training_summary.json").unlink()
    train(_recipe(tiny_llama_dir, out, *args, f"training.resume={out / 'checkpoint-2'}"))
    assert not stale.exists()
    got = _adapter(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_output_dir_and_resume_errors(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(_recipe(tiny_llama_dir, out, "training.resume=true"))
    with pytest.raises(UserError, match="not found"):
        train(_recipe(tiny_llama_dir, out, f"training.resume={tmp_path / 'nope'}"))
    train(_recipe(tiny_llama_dir, out, "training.max_steps=2"))
    with pytest.raises(UserError, match="already holds a run .*training.resume=true"):
        train(_recipe(tiny_llama_dir, out, "training.max_steps=2"))
    # resuming a finished run is a no-op
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    train(_recipe(tiny_llama_dir, out, "training.max_steps=2", "training.resume=true"))
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_qlora_4bit_nf4_on_cpu_with_8bit_adam(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    r = load_recipe(
        os.path.join(RECIPES, "demo_qlora.yaml"),
        [
            f"model.path={tiny_llama_dir}",
            f"training.output_dir={out}",
            "training.device=cpu",
            "training.max_steps=4",
            "training.log_steps=1",
            "training.optimizer=adamw_8bit",
            "training.gradient_checkpointing=true",
            "training.tensorboard=false",
        ],
    )
    assert r.model.quantization == "4bit"
    train(r)
    rows = [x for x in _rows(out) if "loss" in x]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(x["loss"])) for x in rows)
    weights = _adapter(out)
    assert weights and any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # it trained
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(out))


def test_epochs_decide_the_length_when_max_steps_is_unset(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    # 22 demo samples (2 of 24 sessions held out), batch 8: 3 micro-batches an epoch; accumulation 2:
    # windows of 2 and 1, so 2 steps an epoch and 3 for 1.5 epochs
    train(
        _recipe(
            tiny_llama_dir,
            out,
            "training.max_steps=-1",
            "training.epochs=1.5",
            "training.batch_size=8",
            "training.gradient_accumulation_steps=2",
            "training.save_steps=0",
            "training.eval_steps=0",
        )
    )
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["epochs"] == pytest.approx(1 + 2 / 3, abs=1e-3)
    assert summary["data"]["samples"] == 22 and summary["data"]["eval"]["samples"] == 2
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]  # save_steps 0: at the end only
    assert [x["step"] for x in _rows(out) if "eval_loss" in x] == [3]  # eval_steps 0: at the end only


def test_setup_objects_stay_out_of_full_collections_while_the_steps_run(tiny_llama_dir, tmp_path):
    import gc

    frozen = []
    hooks = loop.TrainHooks(after_step=lambda run: frozen.append(gc.get_freeze_count()))
    train(_recipe(tiny_llama_dir, tmp_path / "run", "training.max_steps=2"), hooks)
    # the model, data and optimizer were frozen during the steps (hundreds of thousands of objects
    # with the libraries), and handed back to the collector when the steps ended
    assert len(frozen) == 2 and min(frozen) > 10_000
    assert gc.get_freeze_count() == 0

"""Kernel choices are data, not globals: a training run (fused LoRA with dropout, offloaded
checkpoints, on the CPU) leaves every module-level value of `peftchat.kernels` and
`peftchat.model` as it found it, and `peftchat train` prints the run's KernelOptions."""

import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import peftchat.kernels
import peftchat.model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# Memo caches of a pure function of a frozen weight, keyed weakly by the weight itself: they hold no
# choice and cannot change a result (the kernels' arguments decoded once per weight, not per call)
MEMO_CACHES = {("peftchat.kernels.nf4", "_DECODE"), ("peftchat.kernels.fp8", "_NF4_ARGS")}


def _modules():
    for package in (peftchat.kernels, peftchat.model):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            yield importlib.import_module(info.name)


def _fingerprint(value):
    """What would show a change: the object itself, and the contents of a container or of a plain
    object's attributes (a flag rewritten, a dict filled, a cache object's fields set)."""
    if isinstance(value, (dict, list, set, tuple, frozenset)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return id(value), tuple((repr(k), id(v)) for k, v in items)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return id(value), tuple((k, id(v)) for k, v in vars(value).items())
    return id(value), None


def _snapshot():
    out = {}
    for module in _modules():
        for name, value in vars(module).items():
            if name.startswith("__") or callable(value) or type(value).__name__ == "module":
                continue
            if (module.__name__, name) in MEMO_CACHES:
                continue
            out[(module.__name__, name)] = _fingerprint(value)
    return out


def test_a_training_run_changes_no_module_level_state(tiny_llama_dir, tmp_path, capsys):
    from peftchat.config import load_recipe
    from peftchat.train import loop

    before = _snapshot()
    assert before, "no module-level values found: the snapshot looks at nothing"
    recipe = load_recipe(
        str(RECIPES / "demo.yaml"),
        [
            f"model.path={tiny_llama_dir}",
            f"training.output_dir={tmp_path / 'run'}",
            "training.device=cpu",
            "training.max_steps=2",
            "training.log_steps=1",
            "training.tensorboard=false",
            "adapter.dropout=0.1",
            "training.batch_size=1",
            "data.max_length=128",
            "training.gradient_checkpointing=true",
            "training.checkpoint_offload=true",
            "training.fused_lora=true",
        ],
    )
    applied = []
    loop.train(recipe, hooks=loop.TrainHooks(speedups_applied=applied.extend))
    assert any(a.startswith("fused_lora:") for a in applied)  # the fused path ran
    after = _snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == []
    out = capsys.readouterr().out
    kernels_line = [line for line in out.splitlines() if line.startswith("kernels: ")]
    assert kernels_line == ["kernels: fused_lora, torch kernels (no CUDA Triton), offloaded checkpoint inputs"]


def test_the_snapshot_sees_a_flag_rewritten_and_a_dict_filled(monkeypatch):
    from peftchat.kernels import lora_dropout

    before = _snapshot()
    monkeypatch.setattr(lora_dropout, "PHILOX_BITS", 8)
    monkeypatch.setitem(lora_dropout.TILES, "extra", lora_dropout.Tiles())
    after = _snapshot()
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == [("peftchat.kernels.lora_dropout", "PHILOX_BITS"), ("peftchat.kernels.lora_dropout", "TILES")]


@pytest.mark.parametrize(
    "cfg,want",
    [
        (dict(), "peft_lora, torch kernels (no CUDA Triton)"),
        (
            dict(fp8=True, gradient_checkpointing=True, checkpoint_offload=True),
            "fused_lora, fp8 recompute+grad_input, grad float8_e4m3fn, torch kernels (no CUDA Triton), offloaded checkpoint inputs",
        ),
    ],
)
def test_kernel_options_are_built_once_from_the_recipe_and_the_device(cfg, want):
    from peftchat.config import TrainingConfig
    from peftchat.kernels.fp8 import Fp8Passes
    from peftchat.kernels.options import KernelOptions

    options = KernelOptions.from_training(TrainingConfig(**cfg), torch.device("cpu"), fused_lora=False)
    assert options.describe() == want
    assert options.fp8 == (Fp8Passes() if cfg.get("fp8") else None)
    with pytest.raises(AttributeError):  # frozen: a variant is another value, never an edit
        options.fused_lora = True

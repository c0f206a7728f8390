"""Checkpoints: atomic write, newest-complete lookup, rotation, RNG round trip, load."""

import json
import random

import numpy as np
import pytest
import torch

from peftchat.config import recipe_from_dict
from peftchat.errors import UserError
from peftchat.model.adapters import apply_lora
from peftchat.model.load import load_base_model
from peftchat.rundir import latest_checkpoint, list_checkpoints, rotate_checkpoints
from peftchat.train.checkpoint import TrainState, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from peftchat.train.optim import build_optimizer, build_scheduler


@pytest.fixture(scope="module")
def parts(tiny_llama_dir):
    r = recipe_from_dict(
        {
            "model": {"path": str(tiny_llama_dir), "dtype": "fp32"},
            "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
            "data": {"train": "x"},
            "training": {"device": "cpu", "lr": 0.01, "warmup_steps": 2},
        }
    )
    model = apply_lora(load_base_model(r), r, verbose=False)
    opt = build_optimizer(model, r.training, torch.device("cpu"))
    sched = build_scheduler(opt, r.training, 10)
    # one real step so the optimizer has state and the scheduler has moved
    model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss.backward()
    opt.step(), sched.step(), opt.zero_grad()
    return r, model, opt, sched


def test_rng_round_trip():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_save_is_complete_and_loadable(parts, tmp_path):
    from peft import PeftModel

    r, model, opt, sched = parts
    path = save_checkpoint(tmp_path, TrainState(step=3, epoch=1, batch_index=4, tokens=99), model, opt, recipe=r)
    assert path.name == "checkpoint-3"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng_state.pt",
        "trainer_state.json",
        "recipe.yaml",
        "complete",
    ):
        assert (path / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert json.loads((path / "trainer_state.json").read_text())["batch_index"] == 4
    # peft reads the adapter back as is
    base = load_base_model(r, for_training=False)
    loaded = PeftModel.from_pretrained(base, str(path))
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        if "lora_" in n:
            assert torch.equal(p, q), n

    # load into fresh objects: weights, optimizer moments, scheduler and data position all return
    fresh = apply_lora(load_base_model(r), r, verbose=False)
    opt2 = build_optimizer(fresh, r.training, torch.device("cpu"))
    state = load_checkpoint(path, fresh, opt2)
    sched2 = build_scheduler(opt2, r.training, 10, start_step=state.step)
    assert (state.step, state.epoch, state.batch_index, state.tokens) == (3, 1, 4, 99)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    m1 = [s["exp_avg"] for s in opt.state.values()]
    m2 = [s["exp_avg"] for s in opt2.state.values()]
    assert len(m1) == len(m2) > 0 and all(torch.equal(a, b) for a, b in zip(m1, m2))
    # the schedule is rebuilt at the step, not loaded: the lr of step 4 of the same 10-step plan
    ref_opt = build_optimizer(apply_lora(load_base_model(r), r, verbose=False), r.training, torch.device("cpu"))
    ref = build_scheduler(ref_opt, r.training, 10)
    for _ in range(3):
        ref_opt.step(), ref.step()
    assert sched2.get_last_lr() == ref.get_last_lr() and opt2.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_leftover_temp_and_unmarked_dirs_are_ignored(parts, tmp_path):
    r, model, opt, sched = parts
    save_checkpoint(tmp_path, TrainState(step=2), model, opt)
    # a save that crashed before its rename, and a dir someone copied without the marker
    crashed = tmp_path / ".tmp-checkpoint-4-deadbeef"
    crashed.mkdir()
    (crashed / "adapter_model.safetensors").write_bytes(b"partial")
    (crashed / "complete").write_text("4\n")
    (tmp_path / "checkpoint-6").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    with pytest.raises(UserError, match="incomplete"):
        load_checkpoint(tmp_path / "checkpoint-6", model, opt)


def test_rotation_keeps_the_newest(parts, tmp_path):
    r, model, opt, sched = parts
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, TrainState(step=step), model, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]  # numeric order
    save_checkpoint(tmp_path, TrainState(step=10), model, opt, keep=2)  # same step: replaced
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]
    assert rotate_checkpoints(tmp_path, 0) == []  # 0 keeps all
    assert [p.name for p in rotate_checkpoints(tmp_path, 1)] == ["checkpoint-3"]

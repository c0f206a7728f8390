"""Out of GPU memory inside a step: one line naming the step and every setting that lowers memory
(the list the CLI's last-resort handler uses too)."""

import os

import pytest
import torch

from peftchat.config import load_recipe
from peftchat.errors import UserError
from peftchat.failures import MEMORY_SETTINGS
from peftchat.train.loop import TrainHooks, train

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def test_out_of_memory_names_the_step_and_the_settings(tiny_llama_dir, tmp_path):
    def oom_from_step_2(run):
        def loss_fn(model, batch, normalizer):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        run.loss_fn = loss_fn

    recipe = load_recipe(
        os.path.join(RECIPES, "demo.yaml"),
        [
            f"model.path={tiny_llama_dir}",
            f"training.output_dir={tmp_path / 'run'}",
            "training.device=cpu",
            "training.tensorboard=false",
            "training.max_steps=3",
            "training.save_steps=0",
            "data.max_length=128",
        ],
    )
    with pytest.raises(UserError) as info:
        train(recipe, TrainHooks(after_step=oom_from_step_2))
    message = str(info.value)
    assert message.startswith("out of GPU memory in step 2 (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert all(setting in message for setting in MEMORY_SETTINGS) and "\n" not in message

"""The `distributed` recipe section and the torchrun pieces that need no second process: one-line
errors for settings that cannot work, the rank shares of a window, the 4-bit storage dtype."""

from pathlib import Path

import pytest
import torch
from test_distributed import _free_port  # tests/train is on the path, as data_helpers' folder is

from peftchat.cli import main
from peftchat.config import load_recipe
from peftchat.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "overrides, env, message",
    [
        (["distributed.strategy=fsdp"], {}, "distributed.strategy=fsdp needs several processes"),
        (
            ["distributed.strategy=fsdp", "model.quantization=8bit"],
            TORCHRUN_ENV,
            "does not support model.quantization=8bit",
        ),
        (
            [
                "distributed.strategy=fsdp",
                "model.quantization=4bit",
                "model.compute_dtype=bf16",
                "distributed.quant_storage=uint8",
            ],
            TORCHRUN_ENV,
            "quant_storage equal to model.compute_dtype (bf16)",
        ),
        (
            ["distributed.strategy=fsdp", "training.optimizer=adamw_8bit"],
            TORCHRUN_ENV,
            "needs training.optimizer=adamw",
        ),
        (["distributed.strategy=zero3"], {}, "'distributed.strategy' is 'zero3'; expected one of ddp, fsdp"),
        (["training.device=cuda:1"], TORCHRUN_ENV, "each rank uses cuda:LOCAL_RANK"),
        (["distributed.strategy=fsdp", "training.eval_generate=2"], TORCHRUN_ENV, "eval_generate is not supported"),
        (["distributed.timeout_s=0"], {}, "'distributed.timeout_s' must be > 0"),
        (["--nproc-per-node", "0"], {}, "--nproc-per-node must be >= 1"),
    ],
)
def test_bad_distributed_settings_are_one_line_exit_2(tmp_path, monkeypatch, capsys, overrides, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    code = main(["train", str(RECIPE), f"model.path={tmp_path}", f"training.output_dir={out}", *overrides])
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("peftchat: error: ") and message in line, line
    assert not out.exists()  # refused before anything was written


def test_rank_shares_step_through_the_one_process_windows(tiny_llama_dir):
    """2 ranks x accumulation 2 take, window by window, the micro-batches of one process with
    accumulation 4 (rank 0 the first two, rank 1 the next two), across the epoch's short end."""
    from peftchat.train.build import setup_data

    recipe = load_recipe(RECIPE, [f"model.path={tiny_llama_dir}", "training.batch_size=5", "data.eval_split=0"])
    _, _, batches, _ = setup_data(recipe)
    plan = batches.plan(0)
    assert len(plan) % 4 != 0  # the epoch ends with a short window
    flat = lambda w: [m.tensors["input_ids"].tolist() for m in w.micro_batches]  # noqa: E731
    one = batches.windows(0, 0, 4)
    ranks = [batches.windows(0, 0, 4, part=(r, 2)) for r in range(2)]
    for _ in range(len(plan) // 4 + 2):  # into the second epoch
        whole = next(one)
        parts = [next(w) for w in ranks]
        assert flat(parts[0]) + flat(parts[1]) == flat(whole)
        assert [p.offset for p in parts] == [0, 2] and all(p.size == len(whole.micro_batches) for p in parts)
        assert all((p.epoch, p.batch_index) == (whole.epoch, whole.batch_index) for p in parts)


@pytest.mark.parametrize(
    "strategy, storage, expected",
    [("fsdp", "auto", torch.bfloat16), ("ddp", "auto", torch.uint8), ("ddp", "fp16", torch.float16)],
)
def test_4bit_storage_dtype_follows_the_strategy(tmp_path, strategy, storage, expected):
    from peftchat.model.load import _quantization_config

    recipe = load_recipe(
        RECIPE,
        [
            f"model.path={tmp_path}",
            "model.quantization=4bit",
            "model.compute_dtype=bf16",
            f"distributed.strategy={strategy}",
            f"distributed.quant_storage={storage}",
        ],
    )
    config = _quantization_config(recipe, sharded=strategy == "fsdp")
    assert config.bnb_4bit_quant_storage == expected


def test_single_process_has_no_process_group(tmp_path):
    from peftchat.train.distributed import SINGLE, launched_by_torchrun, process_group

    assert not launched_by_torchrun()  # the test process itself is a plain one
    recipe = load_recipe(RECIPE, [f"model.path={tmp_path}"])
    with process_group(recipe) as dist:
        assert dist is SINGLE and not dist.active and dist.is_main
    assert not torch.distributed.is_initialized()


def test_distributed_keys_do_not_stop_a_resume():
    from peftchat.train.resume import key_kind

    assert key_kind("distributed.strategy") == "runtime" and key_kind("distributed.quant_storage") == "runtime"


def test_config_rejects_fsdp_with_8bit_at_load(tmp_path):
    with pytest.raises(ConfigError, match="8bit"):
        load_recipe(RECIPE, [f"model.path={tmp_path}", "distributed.strategy=fsdp", "model.quantization=8bit"])


def test_torchrun_with_one_process_equals_no_torchrun(tiny_llama_dir, tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 1` (here: its environment, in this process) trains the same
    adapter, bit for bit, through the DDP and the FSDP2 code paths as a plain run."""
    from safetensors.torch import load_file

    from peftchat.train.loop import train

    settings = [
        f"model.path={tiny_llama_dir}",
        "training.tensorboard=false",
        "training.max_steps=2",
        "training.save_steps=0",
        "training.batch_size=3",
        "training.gradient_accumulation_steps=2",
    ]
    train(load_recipe(RECIPE, [*settings, f"training.output_dir={tmp_path / 'plain'}"]))
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    for strategy in ("ddp", "fsdp"):
        port = _free_port()
        for key, value in {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }.items():
            monkeypatch.setenv(key, value)
        out = tmp_path / strategy
        train(load_recipe(RECIPE, [*settings, f"training.output_dir={out}", f"distributed.strategy={strategy}"]))
        assert not torch.distributed.is_initialized()  # destroyed at the end
        one = load_file(str(out / "adapter_model.safetensors"))
        assert plain.keys() == one.keys() and all(torch.equal(plain[k], one[k]) for k in plain), strategy


@pytest.mark.parametrize(
    "exitcode, expected, line",
    [
        (2, 2, None),  # the process printed its own one-line error
        (-9, 1, "peftchat: error: process 1 was killed by signal 9; the others were stopped"),
    ],
)
def test_nproc_launcher_turns_a_failed_process_into_its_exit_code(monkeypatch, capsys, exitcode, expected, line):
    """`peftchat train --nproc-per-node N`: torchrun's ChildFailedError (which torchrun itself
    prints as a traceback) becomes the failed process's exit code and at most one line."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from peftchat.train.distributed import launch_local

    def fail(args):
        assert args.nproc_per_node == "2" and args.standalone and args.module
        assert args.training_script == "peftchat.cli" and args.training_script_args[:1] == ["train"]
        raise ChildFailedError("peftchat.cli", {1: ProcessFailure(1, 4321, exitcode, "/nonexistent/error.json")})

    monkeypatch.setattr(torchrun, "run", fail)
    assert launch_local(2, ["train", "recipe.yaml"]) == expected
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (err.strip() == "") if line is None else err.strip().startswith(line)

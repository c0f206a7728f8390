"""`peftchat train` under torchrun on the CPU (gloo, 2 processes, tiny Llama): the same adapter as
one process with the same global batch (DDP and FSDP2), only rank 0 writes, a rank killed with
SIGKILL stops the job and the run resumes to the same adapter."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftchat.config import load_recipe
from peftchat.train.loop import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "demo.yaml"
# batch 3: 7 micro-batches an epoch, so step 4 is a short window in which rank 1 has no micro-batch
SETTINGS = [
    "training.tensorboard=false",
    "training.device=cpu",
    "training.batch_size=3",
    "training.max_steps=6",
    "training.save_steps=2",
    "training.eval_steps=3",
    "training.log_steps=1",
    "data.eval_split=4",
    "adapter.dropout=0.0",
]

# Runs `peftchat train` in each rank with an audit hook that records, per rank, every file-system
# write under the output dir (open for writing, mkdir, rename, remove), and lets a test SIGKILL one
# rank right after a given checkpoint (PEFTCHAT_TEST_KILL="RANK:STEP").
LAUNCHER = """
import os, signal, sys
out, rank = os.path.realpath(os.environ["TEST_OUT"]), os.environ["RANK"]
log = open(os.path.join(os.environ["TEST_AUDIT"], f"writes-rank{rank}.txt"), "a")
WRITES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR))
    else:
        writing = event in WRITES and args and isinstance(args[0], (str, bytes, os.PathLike))
    if writing and os.path.realpath(os.fsdecode(args[0])).startswith(out):
        log.write(f"{event} {os.fsdecode(args[0])}\\n"); log.flush()
sys.addaudithook(hook)
kill = os.environ.get("PEFTCHAT_TEST_KILL")
if kill:
    from peftchat.train import loop
    kill_rank, kill_step = map(int, kill.split(":"))
    save = loop.save
    def save_then_die(run):
        save(run)
        if run.dist.rank == kill_rank and run.state.step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    loop.save = save_then_die
nan_rank = os.environ.get("PEFTCHAT_TEST_NAN_RANK")
if nan_rank == rank:  # this rank's first micro-batch loss is NaN
    from peftchat.train import build  # where the run's loss is made (setup_model)
    make_loss = build.make_loss
    def poisoned(*args, **kwargs):
        clean, calls = make_loss(*args, **kwargs), []
        def loss_fn(model, batch, **kw):
            calls.append(1)
            loss = clean(model, batch, **kw)
            return loss * float("nan") if len(calls) == 1 else loss
        return loss_fn
    build.make_loss = poisoned
from peftchat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peftchat_nproc(out: Path, *overrides: str, timeout: int = 240):
    """`peftchat train --nproc-per-node 2` (torchrun's launcher started by the CLI)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "peftchat.cli",
        "train",
        str(RECIPE),
        "--nproc-per-node",
        "2",
        *SETTINGS,
        f"training.output_dir={out}",
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(tmp_path: Path, out: Path, *overrides: str, kill: str = "", nan_rank: str = "", timeout: int = 240):
    launcher = tmp_path / "launch_train.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    audit = tmp_path / f"audit-{out.name}"
    audit.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TEST_OUT": str(out),
        "TEST_AUDIT": str(audit),
        "PEFTCHAT_TEST_KILL": kill,
        "PEFTCHAT_TEST_NAN_RANK": nan_rank,
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        str(launcher),
        "train",
        str(RECIPE),
        *SETTINGS,
        f"training.output_dir={out}",
        *overrides,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return result, audit


def _adapter(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def _max_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir, tmp_path_factory):
    """The reference: one process, accumulation 2 (= 2 ranks x accumulation 1)."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(
        load_recipe(
            RECIPE,
            [
                f"model.path={tiny_llama_dir}",
                f"training.output_dir={out}",
                *SETTINGS,
                "training.gradient_accumulation_steps=2",
            ],
        )
    )
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "run"
    result, audit = _torchrun(tmp, out, f"model.path={tiny_llama_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, audit, result


def test_ddp_two_ranks_equal_one_process_with_double_accumulation(one_process, ddp_run):
    out, _, result = ddp_run
    assert _max_relative(_adapter(one_process), _adapter(out)) < 1e-4
    one, two = _rows(one_process), _rows(out)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):  # the logged loss and the sharded eval are the job's, not rank 0's
        for key in ("loss", "eval_loss", "tokens", "eval_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert "distributed: 2 process(es), strategy ddp, backend gloo" in result.stdout


def test_only_rank_zero_writes(one_process, ddp_run):
    out, audit, result = ddp_run
    assert (audit / "writes-rank0.txt").read_text().count("metrics.jsonl") >= 1  # the audit sees writes
    assert not (audit / "writes-rank1.txt").exists() or (audit / "writes-rank1.txt").read_text() == ""
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert listing(out) == listing(one_process)
    assert result.stdout.count("done: 6 steps") == 1  # rank 1's stdout is muted


def test_fsdp2_two_ranks_equal_one_process(one_process, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    result = _peftchat_nproc(out, f"model.path={tiny_llama_dir}", "distributed.strategy=fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed: 2 process(es), strategy fsdp" in result.stdout and "Traceback" not in result.stderr
    assert _max_relative(_adapter(one_process), _adapter(out)) < 1e-4
    assert _max_relative(_adapter(one_process / "checkpoint-4"), _adapter(out / "checkpoint-4")) < 1e-4  # gathered
    saved = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)["optimizer"]
    reference = torch.load(one_process / "checkpoint-6" / "optimizer.pt", weights_only=True)["optimizer"]
    assert saved["state"].keys() == reference["state"].keys()  # one checkpoint format for every strategy


def test_killed_rank_stops_the_job_and_the_run_resumes_to_the_same_adapter(ddp_run, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    killed, _ = _torchrun(tmp_path, out, f"model.path={tiny_llama_dir}", kill="1:4")
    assert killed.returncode != 0
    assert (out / "checkpoint-4" / "complete").is_file() and not (out / "complete").exists()
    resumed, _ = _torchrun(tmp_path, out, f"model.path={tiny_llama_dir}", "training.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    reference, _, _ = ddp_run
    assert _max_relative(_adapter(reference), _adapter(out)) == 0.0  # same world size: bit-exact
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_nan_on_another_rank_is_named_by_rank_zero(tiny_llama_dir, tmp_path):
    """Rank 1's micro-batch (the second of step 1's window of 2) gives NaN: every rank stops, and
    the message (rank 0's is the one shown) names that micro-batch and its loss, not rank 0's own."""
    result, _ = _torchrun(tmp_path, tmp_path / "run", f"model.path={tiny_llama_dir}", nan_rank="1")
    assert result.returncode != 0
    assert (
        "error: loss is nan at step 1, micro-batch 1 of epoch 0 (micro-batch 2 of the step's 2; train samples "
        in result.stderr
    ), result.stderr[-3000:]
    assert "micro-batch 1 of the step's" not in result.stderr
    # torchrun's report: the first rank to exit had the user-error code (the agent may stop the other first)
    assert "exitcode  : 2" in result.stderr

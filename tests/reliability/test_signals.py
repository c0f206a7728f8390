"""Issue 29 item 3: SIGTERM and SIGHUP (what schedulers send before a kill) save the run.

The run is `peftchat train` in its own process; it signals itself at a chosen point (in the
middle of an optimizer step's backward, or in the middle of writing a checkpoint, after its files
and before its marker), so the signal arrives through the kernel exactly there. Each case checks
exit 128 + signal, one stderr line holding the exact resume command, a complete checkpoint, the
lock released, the user's files unchanged; then runs the printed command and compares the adapter
and the optimizer state, bit for bit, with a run that was never interrupted (as
tests/train/test_loop.py does for Ctrl-C and tests/train/test_lock.py for kill -9)."""

import shlex
import signal

import pytest
import torch
from safetensors.torch import load_file
from untouched import DEMO_RECIPE, digest, one_line_error, peftchat

from peftchat.cli import main
from peftchat.train.lock import HOLDER_FILE, LOCK_FILE
from peftchat.train.signals import GracefulInterrupt

# dropout so that the restored RNG matters, accumulation over an epoch boundary (22 samples, batch 5)
ARGS = [
    "training.device=cpu",
    "training.tensorboard=false",
    "adapter.dropout=0.2",
    "training.batch_size=5",
    "training.gradient_accumulation_steps=2",
    "training.max_steps=8",
    "training.save_steps=4",
    "training.eval_steps=0",
    "training.log_steps=1",
    "training.lr=2e-3",
    "training.save_total_limit=0",
]

# `peftchat ARGS` after patching: signals SIGS_IN_STEP (names, comma-separated) during the backward
# of step STEP, and SIGS_IN_SAVE while checkpoint-SAVE is written (its files are in, its marker not yet).
CHILD = """
import os, signal, sys
from peftchat import cli, rundir
from peftchat.train import loop

step_at, in_step, save_at, in_save = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.argv = ["peftchat", *sys.argv[5:]]

def send(names):
    for name in filter(None, names.split(",")):
        os.kill(os.getpid(), getattr(signal, name))

calls = [0]
backward = loop.backward_window
def backward_window(*a, **k):
    calls[0] += 1
    if calls[0] == step_at:
        send(in_step)
    return backward(*a, **k)
loop.backward_window = backward_window

checksums = rundir.write_checksums
def write_checksums(tmp):
    if tmp.name.startswith(f"{rundir.TMP_PREFIX}checkpoint-{save_at}-"):
        send(in_save)
    return checksums(tmp)
rundir.write_checksums = write_checksums

sys.exit(cli.main(sys.argv[1:]))
"""


def _args(tiny_llama_dir, out):
    return [f"model.path={tiny_llama_dir}", f"training.output_dir={out}", *ARGS]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("signals") / "ref"
    assert main(["train", str(DEMO_RECIPE), *_args(tiny_llama_dir, out)]) == 0
    return out


def _optimizer(path):
    return torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]


def _assert_bit_exact(got, ref):
    a, b = load_file(str(got / "adapter_model.safetensors")), load_file(str(ref / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = _optimizer(got / "checkpoint-8"), _optimizer(ref / "checkpoint-8")
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        assert state.keys() == ob["state"][i].keys()
        assert all(torch.equal(state[k], ob["state"][i][k]) for k in state), i


def _stop_and_resume(tiny_llama_dir, tmp_path, reference, step_at, in_step, save_at, in_save, signum, saved):
    out = tmp_path / "run"
    user = digest(DEMO_RECIPE, tiny_llama_dir)
    argv = ["train", str(DEMO_RECIPE), *_args(tiny_llama_dir, out)]
    proc = peftchat(str(step_at), in_step, str(save_at), in_save, *argv, code=CHILD, cwd=tmp_path)
    line = one_line_error(proc, rc=128 + signum, last=True)  # the handler's notes come before it
    assert line.startswith(
        f"peftchat: stopped by {signal.Signals(signum).name}: saved {out / f'checkpoint-{saved}'} "
        f"(step {saved} of 8); resume with: cd {shlex.quote(str(tmp_path))} && peftchat train "
    )
    assert (out / f"checkpoint-{saved}" / "complete").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(
        {f"checkpoint-{s}" for s in (4, saved) if s <= saved}
    )
    assert not (out / LOCK_FILE).exists() and not (out / HOLDER_FILE).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert not (out / "adapter_model.safetensors").exists()
    assert digest(DEMO_RECIPE, tiny_llama_dir) == user

    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["cd", str(tmp_path), "&&"] and command[3] == "peftchat"
    assert command[4:] == [*argv, "training.resume=true"]
    assert main(command[4:]) == 0
    _assert_bit_exact(out, reference)
    return proc.stderr.decode()


def test_sigterm_mid_step_saves_and_later_signals_wait_for_the_save(tiny_llama_dir, tmp_path, reference):
    # SIGTERM in step 3's backward: step 3 ends, checkpoint-3 is written; a second SIGTERM, a SIGHUP and
    # a Ctrl-C while it is written all wait for it
    err = _stop_and_resume(
        tiny_llama_dir, tmp_path, reference, 3, "SIGTERM", 3, "SIGTERM,SIGHUP,SIGINT", signal.SIGTERM, saved=3
    )
    assert err.count("a checkpoint is being saved; stopping when it is complete") == 3


def test_sighup_mid_save_of_a_periodic_checkpoint_finishes_it(tiny_llama_dir, tmp_path, reference):
    _stop_and_resume(tiny_llama_dir, tmp_path, reference, 0, "", 4, "SIGHUP", signal.SIGHUP, saved=4)


def test_a_signal_before_training_starts_releases_the_lock(tiny_llama_dir, tmp_path):
    # SIGTERM while the data is prepared: nothing trained, nothing to save; no dir or lock left
    code = CHILD.replace(
        "backward = loop.backward_window",
        "loop.setup_data = lambda r: send('SIGTERM')\nbackward = loop.backward_window",
    )
    out = tmp_path / "run"
    proc = peftchat("0", "", "0", "", "train", str(DEMO_RECIPE), *_args(tiny_llama_dir, out), code=code)
    assert one_line_error(proc, rc=143) == "peftchat: stopped by SIGTERM: before training started; nothing to save"
    assert not out.exists()


def test_an_ignored_signal_stays_ignored():
    # `nohup peftchat train ...`: a hangup must not stop the run
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with GracefulInterrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)

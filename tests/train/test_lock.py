"""One writer per output dir: a second train or resume while the first lives is exit 2 naming its
pid; after the first is killed with SIGKILL the kernel has dropped its lock and a resume runs."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from peftchat.cli import main
from peftchat.errors import UserError
from peftchat.train.lock import HOLDER_FILE, LOCK_FILE, sole_writer

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml")

# Trains with a hook that, after step 1 (and its checkpoint), says so and sleeps: a run in progress.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from peftchat.config import load_recipe
    from peftchat.train.loop import TrainHooks, train

    def hold(run):
        Path(sys.argv[1]).write_text("ready")
        time.sleep(600)

    train(load_recipe(sys.argv[2], sys.argv[3:]), TrainHooks(after_step=hold))
""")


def _overrides(tiny_llama_dir, out, *more):
    return [
        f"model.path={tiny_llama_dir}",
        f"training.output_dir={out}",
        "training.device=cpu",
        "training.tensorboard=false",
        "training.max_steps=2",
        "training.save_steps=1",
        "training.eval_steps=0",
        *more,
    ]


def test_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tiny_llama_dir, tmp_path, capsys):
    out, ready = tmp_path / "run", tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ready), RECIPE, *_overrides(tiny_llama_dir, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert holder.poll() is None, holder.stderr.read().decode()
            assert time.monotonic() < deadline, "the holder never reached step 1"
            time.sleep(0.2)
        for extra in ([], ["training.resume=true"]):
            rc = main(["train", RECIPE, *_overrides(tiny_llama_dir, out, *extra)])
            err = capsys.readouterr().err
            assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert f"is in use by another peftchat train (pid {holder.pid} on " in err
        assert (out / "checkpoint-1" / "complete").is_file()  # the refused runs touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_FILE).exists()  # left behind by the kill: the kernel released the lock itself
    assert main(["train", RECIPE, *_overrides(tiny_llama_dir, out, "training.resume=true")]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (out / "complete").is_file()
    assert not (out / LOCK_FILE).exists() and not (out / HOLDER_FILE).exists()


def test_a_refused_run_leaves_no_dir_behind(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(UserError):
        with sole_writer(out):
            assert (out / HOLDER_FILE).is_file()
            with sole_writer(out):  # a second holder in the same process is refused too
                pass
    assert not out.exists()
    with sole_writer(out):
        (out / "kept").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["kept"]

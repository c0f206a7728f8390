"""The run directory: final outputs written as a set, unfinished runs refused by merge and chat."""

import shutil

import pytest

from peftchat import rundir
from peftchat.errors import UserError
from peftchat.merge import merge_adapter


def test_final_outputs_are_moved_in_and_marked_last(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    seen = []

    def fill(tmp):
        (tmp / "adapter_model.safetensors").write_bytes(b"w")
        (tmp / "recipe.yaml").write_text("name: x\n")
        seen.append(rundir.is_complete(out))

    rundir.publish_final_outputs(out, fill, step=3)
    assert seen == [False] and rundir.is_complete(out)
    assert (out / "complete").read_text() == "3\n" and (out / "recipe.yaml").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(rundir.TMP_PREFIX)]

    def crash(tmp):
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        rundir.publish_final_outputs(out, crash, step=4)
    # the old outputs are no longer a finished run, and nothing half-written was moved in
    assert not rundir.is_complete(out) and (out / "adapter_model.safetensors").read_bytes() == b"w"
    assert not [p for p in out.iterdir() if p.name.startswith(rundir.TMP_PREFIX)]


def test_merge_and_chat_refuse_an_unfinished_run_dir(make_adapter, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(make_adapter(), run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # written by a run ...
    with pytest.raises(UserError, match="unfinished run"):  # ... that never marked its outputs
        rundir.resolve_source(run)
    with pytest.raises(UserError, match="unfinished run"):
        merge_adapter(run, tmp_path / "merged", dtype="fp32", verify=False)
    (run / "complete").write_text("1\n")
    assert rundir.resolve_source(run).kind == "adapter"
    # an adapter dir no run wrote (no metrics, no checkpoints, no marker) is taken as it is
    assert rundir.resolve_source(make_adapter()).adapter_dir == make_adapter()

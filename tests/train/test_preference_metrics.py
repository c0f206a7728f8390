"""Reward metrics of a preference run: means over the pairs of every process (torchrun), not rank 0's."""

from __future__ import annotations

import pytest
import torch

from peftchat.config import TrainingConfig
from peftchat.train.preference import PreferenceLoss


def _seen(r_c: list[float], r_r: list[float]) -> PreferenceLoss:
    loss = PreferenceLoss(TrainingConfig(objective="dpo"))
    loss._add("train", torch.tensor(r_c), torch.tensor(r_r))
    return loss


def test_two_processes_report_the_means_of_all_their_pairs():
    rank0, rank1 = _seen([1.0, 0.0], [0.0, 1.0]), _seen([3.0, 2.0, 1.0], [0.0, 0.0, 5.0])
    other = rank1._sums["train"].tolist()
    everything = _seen([1.0, 0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 0.0, 0.0, 5.0]).take_metrics()
    reduced = rank0.take_metrics(reduce=lambda mine: [a + b for a, b in zip(mine, other)])
    assert reduced == pytest.approx(everything)
    assert reduced["rewards/accuracy"] == pytest.approx(3 / 5)  # rank 0 alone would say 1/2


def test_a_process_without_pairs_still_joins_the_sum():
    other = _seen([2.0], [1.0])._sums["train"].tolist()
    calls = []

    def reduce(mine):
        calls.append(mine)
        return [a + b for a, b in zip(mine, other)]

    idle = PreferenceLoss(TrainingConfig(objective="dpo"))
    assert idle.take_metrics(reduce=reduce) == pytest.approx(
        {"rewards/chosen": 2.0, "rewards/rejected": 1.0, "rewards/margin": 1.0, "rewards/accuracy": 1.0}
    )
    assert calls == [[0.0, 0.0, 0.0, 0.0]]  # every process makes the collective call
    assert PreferenceLoss(TrainingConfig(objective="dpo")).take_metrics() == {}


def test_a_spare_forward_is_not_counted():
    loss = _seen([1.0], [0.0])
    with loss.not_counted():
        loss._add("train", torch.tensor([5.0]), torch.tensor([9.0]))
    assert loss.take_metrics() == pytest.approx(
        {"rewards/chosen": 1.0, "rewards/rejected": 0.0, "rewards/margin": 1.0, "rewards/accuracy": 1.0}
    )


_RANK_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from peftchat.config import TrainingConfig
from peftchat.train.distributed import Dist, host_sum
from peftchat.train.preference import PreferenceLoss

dist.init_process_group("gloo")
rank = dist.get_rank()
pairs = json.loads(sys.argv[1])[rank]
loss = PreferenceLoss(TrainingConfig(objective="dpo"))
if pairs[0]:
    loss._add("train", torch.tensor(pairs[0]), torch.tensor(pairs[1]))
metrics = loss.take_metrics(reduce=host_sum(Dist(world_size=2, rank=rank, strategy="ddp")))
print("METRICS " + json.dumps(metrics), flush=True)
dist.destroy_process_group()
"""


def test_two_gloo_processes_reduce_the_reward_metrics(tmp_path):
    """The real collective (gloo, 2 processes, as under torchrun on the CPU): both processes report
    the means over all five pairs (rank 0 alone would say accuracy 1/2)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    per_rank = [[[1.0, 0.0], [0.0, 1.0]], [[3.0, 2.0, 1.0], [0.0, 0.0, 5.0]]]
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        cmd = [sys.executable, "-c", _RANK_SCRIPT, json.dumps(per_rank)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    expected = _seen([1.0, 0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 0.0, 0.0, 5.0]).take_metrics()
    for out, _ in outs:
        line = next(x for x in out.splitlines() if x.startswith("METRICS "))
        assert json.loads(line[len("METRICS ") :]) == pytest.approx(expected)

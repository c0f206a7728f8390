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

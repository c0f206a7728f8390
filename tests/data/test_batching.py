"""plan_batches (deterministic, resumable) and collate (padding; packing labels and positions)."""

import random

import pytest
import torch

from peftchat.data.batching import collate, plan_batches, sample_lengths

PAD = 3


def plan(lengths, **kw):
    args = dict(batch_size=4, max_length=64, packing=False, group_by_length=False, shuffle=True, seed=7, epoch=0)
    return plan_batches(lengths, **{**args, **kw})


def flat(batches):
    return [i for b in batches for row in b for i in row]


_rng = random.Random(0)
LENGTHS = [_rng.randint(1, 60) for _ in range(203)]


def test_same_args_same_plan_and_every_sample_once():
    for kw in ({}, {"group_by_length": True}, {"packing": True}, {"shuffle": False}):
        a, b = plan(LENGTHS, **kw), plan(LENGTHS, **kw)
        assert a == b
        assert sorted(flat(a)) == list(range(len(LENGTHS)))
        assert all(1 <= len(batch) <= 4 for batch in a)
    assert plan(LENGTHS) != plan(LENGTHS, epoch=1) != plan(LENGTHS, seed=8)
    assert flat(plan(LENGTHS, shuffle=False)) == list(range(len(LENGTHS)))  # data-set order


def test_unpacked_rows_hold_one_sample():
    batches = plan(LENGTHS)
    assert all(len(row) == 1 for b in batches for row in b)
    assert len(batches) == (len(LENGTHS) + 3) // 4


def test_group_by_length_sorts_within_megabatches():
    batches = plan(LENGTHS, batch_size=2, group_by_length=True)
    order = flat(batches)
    mega = 50 * 2
    for m in range(0, len(order), mega):
        chunk = [LENGTHS[i] for i in order[m : m + mega]]
        assert chunk == sorted(chunk, reverse=True)
    assert set(order[:mega]) == set(flat(plan(LENGTHS, batch_size=2))[:mega])  # same shuffle, then sorted

    # grouping pads less than no grouping
    def padding(bs):
        return sum(max(LENGTHS[r[0]] for r in b) * len(b) - sum(LENGTHS[r[0]] for r in b) for b in bs)

    assert padding(batches) < padding(plan(LENGTHS, batch_size=2)) / 3


def test_packing_rows_fit_and_fill():
    batches = plan(LENGTHS, packing=True, max_length=64)
    rows = [row for b in batches for row in b]
    assert all(sum(LENGTHS[i] for i in row) <= 64 for row in rows)
    fill = sum(LENGTHS) / (64 * len(rows))
    assert fill > 0.9, fill
    assert all(len(b) == 4 for b in batches[:-1])
    # a sample longer than max_length gets a row of its own
    assert [[0], [1]] in plan([100, 5], packing=True, max_length=64, shuffle=False)


def test_case8_padding_of_unpacked_batch():
    a = {"input_ids": list(range(10, 20)), "labels": [-100] * 3 + list(range(13, 20))}
    b = {"input_ids": list(range(30, 37)), "labels": list(range(30, 37))}
    batch = collate([[a], [b]], PAD, packing=False)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 10)
    assert batch["input_ids"][1, 7:].tolist() == [PAD] * 3
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 3
    assert batch["labels"][1, 7:].tolist() == [-100] * 3
    assert batch["labels"][0].tolist() == a["labels"] and batch["attention_mask"][0].tolist() == [1] * 10
    with pytest.raises(ValueError, match="one sample"):
        collate([[a, b]], PAD, packing=False)


def test_packed_collate_positions_and_boundary_labels():
    s1 = {"input_ids": [11, 12, 13], "labels": [11, 12, 13]}
    s2 = {"input_ids": [21, 22], "labels": [21, 22]}
    s3 = {"input_ids": [31, 32, 33, 34], "labels": [-100, -100, 33, 34]}
    batch = collate([[s1, s2], [s3]], PAD, packing=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # the first label of s2 would make s1's last token predict s2's first token
    assert batch["labels"].tolist() == [[11, 12, 13, -100, 22], [-100, -100, 33, 34, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_sample_lengths():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [[1, 2, 3], [4], [5, 6]]})
    assert sample_lengths(ds) == [3, 1, 2]
    assert sample_lengths(ds.select([2, 0])) == [2, 3]

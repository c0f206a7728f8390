"""Batches for the training loop and evaluation: plan, fetch, collate, loss targets.

`plan_batches` decides which samples go together; it is a pure function of its arguments, so a
resumed run rebuilds the same plan and skips to batch k. `collate` turns one planned batch into
tensors. `Batches` does all of it for one tokenized split: `windows` yields the accumulation
windows of training from a data position on, across epochs; `plan(0)` and `micro_batch` give the eval micro-batches.

Packing (padding-free rows): several samples share a row; ``position_ids`` restart at 0 for each
sample and no ``attention_mask`` is returned. transformers (>= 4.5x; checked with 5.x) then finds
the sample boundaries from the position ids (`masking_utils.find_packed_sequence_indices`) and
builds a block-diagonal causal mask for eager and sdpa attention (flash attention uses the same
position ids for its varlen kernels), so attention never crosses samples. It does so only when the
forward pass has no KV cache: call the model with ``use_cache=False`` (a training forward with
gradient checkpointing does so by itself; without it, Llama-style models build a cache from
``config.use_cache`` and silently drop the packed mask). tests/data/test_packing_equivalence.py
checks both facts on a tiny Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Sequence

from peftchat.formats.samples import IGNORE_INDEX

MEGABATCH_FACTOR = 50  # length grouping sorts within windows of this many batches
PACKING_WINDOW_FACTOR = 64  # packing fills rows from windows of this many batches' worth of samples


def _order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def _pack(order: list[int], lengths: Sequence[int], max_length: int, window: int) -> list[list[int]]:
    """First-fit-decreasing within consecutive windows of `order`: few, full rows, deterministic.

    A sample longer than max_length gets a row of its own (the collators already cap lengths; the
    loop's max_length may be smaller than theirs)."""
    rows: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: -lengths[i])  # stable: ties keep order
        open_rows: list[list[int]] = []
        room: list[int] = []
        for i in chunk:
            n = lengths[i]
            for r, free in enumerate(room):
                if n <= free:
                    open_rows[r].append(i)
                    room[r] -= n
                    break
            else:
                open_rows.append([i])
                room.append(max_length - n)
        rows += open_rows
    return rows


def plan_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    group_by_length: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> list[list[list[int]]]:
    """Batches of rows of sample indices; same arguments, same plan.

    Without packing each row is one sample and a batch holds `batch_size` rows; with
    `group_by_length` the (shuffled) order is cut into mega-batches of 50 × batch_size samples,
    each sorted by length (longest first) before being cut into batches, so a batch pads little.
    With packing a row holds several samples of total length <= max_length (first-fit-decreasing
    in windows of 64 × batch_size samples) and a batch holds `batch_size` rows. The last batch
    may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = _order(len(lengths), shuffle, seed, epoch)
    if packing:
        rows = _pack(order, lengths, max_length, PACKING_WINDOW_FACTOR * batch_size)
    else:
        if group_by_length:
            mega = MEGABATCH_FACTOR * batch_size
            order = [
                i for m in range(0, len(order), mega) for i in sorted(order[m : m + mega], key=lambda i: -lengths[i])
            ]
        rows = [[i] for i in order]
    return [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]


def collate(samples: list[list[dict[str, Any]]], pad_id: int, packing: bool) -> dict[str, Any]:
    """Tensors for one batch; `samples[r]` is row r's list of samples (dicts with `input_ids`
    and `labels`).

    Without packing (one sample a row): right padding with `pad_id`, labels -100 and
    ``attention_mask`` 0 on padding. With packing: each row is its samples concatenated, with
    ``position_ids`` restarting at 0 for every sample and no attention mask (see the module
    docstring); the label at the first position of every sample after the first is set to -100,
    because labels are unshifted: the model scores position t against labels[t + 1], so that label
    would make the last token of the previous sample predict the first token of the next one. (A
    sample's own first label is never a target, so nothing of the sample is lost.) Rows are
    right-padded to the longest; padding forms its own position run, labels -100.
    """
    import torch

    if not samples:
        raise ValueError("collate needs at least one row")
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    rows_pos: list[list[int]] = []
    for row in samples:
        if not row:
            raise ValueError("collate got an empty row")
        if not packing and len(row) != 1:
            raise ValueError(f"without packing each row holds one sample, got {len(row)}")
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for k, sample in enumerate(row):
            s_ids, s_labels = list(sample["input_ids"]), list(sample["labels"])
            if len(s_ids) != len(s_labels):
                raise ValueError(f"input_ids and labels differ in length ({len(s_ids)} vs {len(s_labels)})")
            if k > 0 and s_labels:
                s_labels[0] = IGNORE_INDEX
            ids += s_ids
            labels += s_labels
            pos += list(range(len(s_ids)))
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_pos.append(pos)
    width = max(len(r) for r in rows_ids)
    input_ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(rows_ids), width), IGNORE_INDEX, dtype=torch.long)
    if packing:
        # Padding counts up from 0 like one more sample, so it never extends a real sample's run.
        position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows_ids), 1)
    else:
        attention_mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for r, (ids, labels, pos) in enumerate(zip(rows_ids, rows_labels, rows_pos)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids, dtype=torch.long)
        label_t[r, :n] = torch.tensor(labels, dtype=torch.long)
        if packing:
            position_ids[r, :n] = torch.tensor(pos, dtype=torch.long)
            position_ids[r, n:] = torch.arange(width - n, dtype=torch.long)
        else:
            attention_mask[r, :n] = 1
    if packing:
        return {"input_ids": input_ids, "labels": label_t, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": label_t, "attention_mask": attention_mask}


def sample_lengths(dataset) -> list[int]:
    """Length of every sample of a tokenized dataset (from Arrow, without reading the ids)."""
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["input_ids"]
    return pc.list_value_length(column).to_pylist()


# ------------------------------------------------------------------------------ loss targets


def count_label_tokens(labels) -> int:
    """Tokens that carry loss after the causal shift: `labels[:, 1:] != -100` (call on CPU labels)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_targets(labels):
    """(positions, targets): flat indices into the (batch*seq) hidden states whose next token
    carries loss, and those next tokens. Computed on CPU before the forward, the boolean
    selection costs the GPU no host sync."""
    seq = labels.shape[1]
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * seq + cols, shifted[rows, cols]


def sample_bounds(position_ids) -> tuple[Any, int]:
    """Where the samples of a packed batch lie once its rows are laid end to end: cumulative
    lengths (int32, from 0 to the batch's token count; padding counts as one more sample) and the
    longest sample. Every sample's positions start at 0 (`collate`), so a 0 opens a sample. Made
    here on the CPU so that the varlen attention kernel needs no device-to-host sync per layer."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def with_loss_targets(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with `loss_positions` / `loss_targets` (see `loss_targets`) in place of `labels`,
    which the loss then no longer needs: one tensor fewer to copy to the device each micro-batch.
    A packed batch also gets its `sample_bounds`: `cu_seq_lens` and the int `max_seq_len`."""
    positions, targets = loss_targets(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in batch:
        inputs["cu_seq_lens"], inputs["max_seq_len"] = sample_bounds(batch["position_ids"])
    return {**inputs, "loss_positions": positions, "loss_targets": targets}


# ------------------------------------------------------------------------------ the iterator


@dataclass
class MicroBatch:
    tensors: dict[str, Any]  # model inputs + loss_positions / loss_targets, on the CPU
    label_tokens: int  # loss-bearing tokens
    tokens: int  # input tokens, padding excluded


@dataclass
class Window:
    """One optimizer step's micro-batches and the data position after them."""

    micro_batches: list[MicroBatch]
    epoch: int  # the position after this window: the next micro-batch is `batch_index` of `epoch`
    batch_index: int
    epoch_progress: float  # epochs done at the end of this window, e.g. 1.25
    # Sharded (several processes): this process's micro-batches start at `offset` in the window of
    # `size` micro-batches all processes share; `rows` is that whole window's plan.
    offset: int = 0
    size: int = 0
    rows: tuple = ()

    @property
    def label_tokens(self) -> int:
        return sum(m.label_tokens for m in self.micro_batches)

    @property
    def tokens(self) -> int:
        return sum(m.tokens for m in self.micro_batches)


class Batches:
    """Micro-batches of one tokenized split (a `datasets.Dataset` with `input_ids`, `labels`)."""

    def __init__(
        self,
        dataset,
        *,
        batch_size: int,
        max_length: int,
        pad_id: int,
        packing: bool,
        group_by_length: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset.select_columns(["input_ids", "labels"])
        self.lengths = sample_lengths(self.dataset)
        self.pad_id, self.packing = pad_id, packing
        self._plan_args: dict[str, Any] = dict(
            batch_size=batch_size,
            max_length=max_length,
            packing=packing,
            group_by_length=group_by_length,
            shuffle=shuffle,
            seed=seed,
        )
        self.plan = lru_cache(maxsize=2)(self._plan)

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        return plan_batches(self.lengths, epoch=epoch, **self._plan_args)

    def per_epoch(self) -> int:
        """Micro-batches in an epoch."""
        return len(self.plan(0))

    def fetch(self, rows: list[list[int]]) -> list[list[dict]]:
        """The samples of one planned batch (rows of sample indices), read in one call."""
        flat = [i for row in rows for i in row]
        got = self.dataset[flat]
        samples = [{"input_ids": ids, "labels": lab} for ids, lab in zip(got["input_ids"], got["labels"])]
        out, k = [], 0
        for row in rows:
            out.append(samples[k : k + len(row)])
            k += len(row)
        return out

    def collate(self, rows: list[list[int]]) -> dict[str, Any]:
        """Tensors of one planned batch, with `labels` (as transformers takes them)."""
        return collate(self.fetch(rows), self.pad_id, self.packing)

    def micro_batch(self, rows: list[list[int]]) -> MicroBatch:
        batch = self.collate(rows)
        tokens = sum(self.lengths[i] for row in rows for i in row)
        return MicroBatch(with_loss_targets(batch), count_label_tokens(batch["labels"]), tokens)

    def windows(
        self, epoch: int, batch_index: int, accumulation: int, part: tuple[int, int] = (0, 1)
    ) -> Iterator[Window]:
        """Accumulation windows from position (`epoch`, `batch_index`) on, epoch after epoch; the
        last window of an epoch may be short. A position past an epoch's end (the data changed
        under a resumed run) moves on to the next epoch.

        `part` = (r, n): process r of n takes, of each window of `accumulation` micro-batches (a
        multiple of n), the contiguous share r*g .. r*g+g-1 (g = accumulation / n), so the n
        processes together step through the data in the order one process would."""
        rank, world = part
        share = accumulation // world
        while True:
            plan = self.plan(epoch)
            if batch_index >= len(plan):
                epoch, batch_index = epoch + 1, 0
                continue
            rows = plan[batch_index : batch_index + accumulation]
            batch_index += len(rows)
            progress = epoch + batch_index / len(plan)
            if batch_index >= len(plan):
                epoch, batch_index = epoch + 1, 0
            mine = rows[rank * share : (rank + 1) * share]  # all of them with one process
            yield Window(
                [self.micro_batch(r) for r in mine],
                epoch,
                batch_index,
                progress,
                offset=rank * share,
                size=len(rows),
                rows=tuple(rows) if world > 1 else (),
            )

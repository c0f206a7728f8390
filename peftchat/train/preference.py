"""Preference objectives on chosen/rejected pairs: DPO (sigmoid, with cDPO label smoothing),
ORPO and SimPO — the loss of a micro-batch of `peftchat.data.preference.PairBatches`.

The math follows TRL (tests/train/test_preference_trl.py runs TRL's own code side by side):

* log-probs of a reply = sum over its scored tokens of log p(token); SimPO and ORPO use the mean
  over the reply's tokens (TRL's `average_log_prob`).
* DPO (`DPOTrainer`, loss_type sigmoid): r = beta * (logp - logp_ref) per side,
  loss = -(1 - eps) log sigmoid(r_c - r_r) - eps log sigmoid(r_r - r_c).
* SimPO (`CPOTrainer`, loss_type simpo, cpo_alpha 0): z = (mean logp_c - mean logp_r) - gamma / beta,
  loss = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z); rewards beta * mean logp.
* ORPO (`ORPOTrainer`): log-odds = (c - r) - (log(1 - e^c) - log(1 - e^r)) on mean log-probs,
  loss = NLL(chosen) - beta * log sigmoid(log-odds); rewards beta * mean logp. The NLL is over the
  chosen reply's scored tokens (the ORPO paper, and what SFT trains); TRL's ORPOTrainer also puts
  it on the prompt tokens.

The reference of DPO is the same base with the adapter switched off (peft's `disable_adapter`: no
second copy of the model), or log-probs computed once before training and cached in the run dir
(`training.reference: precomputed`; the default when `adapter.init_from` starts from an SFT
adapter, whose policy is then the reference, as TRL's re-trained-adapter case).

Chosen and rejected go through one forward (rows 0..B-1 and B..2B-1 of the batch). Log-probs are
computed a chunk of scored tokens at a time, each chunk's logits recomputed in backward
(checkpointed), as `peftchat.train.loss` does for SFT: the vocab-sized logits of the whole batch
never exist at once. Hand-written because TRL's trainers compute full logits (and bring their own
loop); the loss plugs into peftchat's loop as its `loss_fn`.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from peftchat.config import Recipe, TrainingConfig
from peftchat.errors import UserError
from peftchat.model.adapters import unwrap_peft
from peftchat.train.loss import over_head_chunks
from peftchat.train.step import to_device

REFERENCE_FILE = "reference_logps.pt"
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def _chunk_logps(head, transform, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = transform(head(hidden).float())
    return -F.cross_entropy(logits, targets, reduction="none")


def sequence_logps(model, batch: dict[str, Tensor], chunk_tokens: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(summed log-prob of each row's scored tokens, their count) for a concatenated pair batch
    (`input_ids`, `attention_mask`, `loss_positions`, `loss_targets`, `loss_rows`)."""
    base = unwrap_peft(model)
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["loss_positions"])
    parts = over_head_chunks(
        _chunk_logps, base.get_output_embeddings(), base.config, selected, batch["loss_targets"], chunk_tokens
    )
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    rows = batch["input_ids"].shape[0]
    sums = torch.zeros(rows, dtype=torch.float32, device=hidden.device).index_add(0, batch["loss_rows"], token_logps)
    counts = torch.zeros(rows, dtype=torch.float32, device=hidden.device).index_add(
        0, batch["loss_rows"], torch.ones_like(token_logps)
    )
    if not parts:  # keeps the graph connected for a batch without scored tokens
        sums = sums + hidden.sum() * 0.0
    return sums, counts


def reference_logps(model, batch: dict[str, Tensor]) -> Tensor:
    """The reference's summed log-probs, [B, 2] (chosen, rejected): cached, or the adapter off."""
    if "reference_logps" in batch:
        return batch["reference_logps"].float()
    with torch.no_grad(), _adapter_off(model):
        sums, _ = sequence_logps(model, batch)
    return torch.stack(sums.chunk(2), dim=1)


def _adapter_off(model):
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else nullcontext()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(
    cfg: TrainingConfig, logps: Tensor, counts: Tensor, ref: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair loss without ORPO's NLL, chosen rewards, rejected rewards) from the policy's
    summed log-probs and token counts of the 2B rows (chosen first) and, for DPO, the reference's [B, 2]."""
    beta, eps = cfg.beta, cfg.label_smoothing
    chosen, rejected = logps.chunk(2)
    if cfg.objective == "dpo":
        assert ref is not None  # DPO's callers pass the reference log-probs
        r_c, r_r = beta * (chosen - ref[:, 0]), beta * (rejected - ref[:, 1])
        z = r_c - r_r
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), r_c.detach(), r_r.detach()
    n_c, n_r = counts.chunk(2)
    mean_c, mean_r = chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1)
    rewards = (beta * mean_c.detach(), beta * mean_r.detach())
    if cfg.objective == "simpo":
        z = beta * ((mean_c - mean_r) - cfg.simpo_gamma / beta)
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), *rewards
    if cfg.objective == "orpo":
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        return -beta * F.logsigmoid(log_odds), *rewards
    raise ValueError(f"not a preference objective: {cfg.objective}")


class PreferenceLoss:
    """The micro-batch loss of a preference run: (summed per-pair loss) / `normalizer` (the
    window's pair count, so the window's loss is a mean per pair). Keeps the reward metrics of the
    pairs it saw, per split (train: gradients on; eval: off), until `take_metrics`."""

    def __init__(self, cfg: TrainingConfig) -> None:
        self.cfg = cfg
        self._sums: dict[str, Optional[Tensor]] = {"train": None, "eval": None}

    def __call__(self, model, batch: dict[str, Tensor], *, normalizer: float | None = None) -> Tensor:
        logps, counts = sequence_logps(model, batch)
        ref = reference_logps(model, batch) if self.cfg.objective == "dpo" else None
        losses, r_c, r_r = pair_losses(self.cfg, logps, counts, ref)
        pairs = losses.shape[0]
        total = losses.sum()
        if self.cfg.objective == "orpo":
            # TRL's NLL: the mean over the micro-batch's chosen tokens, once per micro-batch of `pairs` pairs
            chosen_tokens = counts[:pairs].sum().clamp(min=1)
            total = total + pairs * (-logps[:pairs].sum() / chosen_tokens)
        self._add("train" if torch.is_grad_enabled() else "eval", r_c, r_r)
        return total / (normalizer if normalizer is not None else max(pairs, 1))

    @contextmanager
    def not_counted(self) -> Iterator[None]:
        """A forward whose pairs are not counted (FSDP2 eval's spare pass, made only so every
        process gathers the weights the same number of times)."""
        kept = dict(self._sums)
        try:
            yield
        finally:
            self._sums = kept

    def _add(self, split: str, r_c: Tensor, r_r: Tensor) -> None:
        row = torch.stack(
            [r_c.sum(), r_r.sum(), (r_c > r_r).float().sum(), torch.tensor(float(r_c.shape[0]), device=r_c.device)]
        ).double()
        sums = self._sums[split]
        self._sums[split] = row if sums is None else sums + row

    def take_metrics(
        self, split: str = "train", reduce: Optional[Callable[[list[float]], list[float]]] = None
    ) -> dict[str, float]:
        """Mean rewards/chosen, rewards/rejected, margin and accuracy since the last call (one sync);
        `reduce` sums the four totals over processes (torchrun: every process calls it, with zeros
        when it saw no pair, so the means are over all processes' pairs)."""
        sums, self._sums[split] = self._sums[split], None
        totals = sums.tolist() if sums is not None else [0.0] * 4
        chosen, rejected, right, n = reduce(totals) if reduce is not None else totals
        if not n:
            return {}
        prefix = "eval_" if split == "eval" else ""
        values = (chosen / n, rejected / n, (chosen - rejected) / n, right / n)
        return {prefix + k: round(v, 6) for k, v in zip(METRIC_KEYS, values)}


def make_preference_loss(recipe: Recipe) -> PreferenceLoss:
    return PreferenceLoss(recipe.training)


def uses_precomputed_reference(recipe: Recipe) -> bool:
    ref = recipe.training.reference
    return recipe.training.objective == "dpo" and (
        ref == "precomputed" or (ref == "auto" and bool(recipe.adapter.init_from))
    )


def _data_key(batches) -> str:
    """What the cached log-probs belong to: the pairs' token ids and labels, in order."""
    import pyarrow.compute as pc

    h = hashlib.sha256()
    table = batches.pairs.with_format("arrow")[:]
    for column in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
        h.update(pc.list_value_length(table[column]).to_numpy(zero_copy_only=False).tobytes())
        h.update(pc.list_flatten(table[column]).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def precompute_reference(model, batches, device: torch.device, autocast=nullcontext) -> Tensor:
    """[pairs, 2] summed reference log-probs (chosen, rejected) of every pair, with the model as
    it is now (the starting adapter, enabled: `adapter.init_from`; none: the base)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(batches.lengths), 2, dtype=torch.float32)
    plan = [[[i] for i in range(k, min(k + 8, len(out)))] for k in range(0, len(out), 8)]
    for rows in plan:
        micro = batches.micro_batch(rows)
        micro.tensors.pop("reference_logps", None)
        with autocast():
            sums, _ = sequence_logps(model, to_device(micro.tensors, device))
        out[micro.tensors["pair_index"]] = torch.stack(sums.float().cpu().chunk(2), dim=1)
    model.train(was_training)
    return out


def attach_reference(run: Any) -> None:
    """`training.reference` precomputed: the reference log-probs of the train and eval pairs, from
    `output_dir/reference_logps.pt` when it holds these pairs' (a resumed run: computed before its
    first step, never from a trained adapter), else computed now and saved there."""
    if not uses_precomputed_reference(run.recipe):
        return
    path = Path(run.out) / REFERENCE_FILE
    splits = {"train": run.train, **({"eval": run.eval} if run.eval is not None else {})}
    keys = {name: _data_key(b) for name, b in splits.items()}
    saved = torch.load(path, weights_only=True) if path.is_file() else None
    if saved is not None and saved.get("keys") == keys:
        print(f"reference log-probs: {path} ({len(run.train.lengths)} train pairs)", flush=True)
    elif run.state.step > 0:
        raise UserError(
            f"{path} is missing or belongs to other data: the resumed run's reference log-probs were "
            "computed before its first step; start the run again (or use training.reference=base)"
        )
    else:
        values = {name: precompute_reference(run.model, b, run.device, run.autocast) for name, b in splits.items()}
        saved = {"keys": keys, **values}
        if run.dist.is_main:
            tmp = path.with_name(f".peftchat-tmp-{os.getpid()}-{path.name}")
            torch.save(saved, tmp)
            tmp.replace(path)
        print(f"reference log-probs of {len(run.train.lengths)} train pairs computed once, saved to {path}", flush=True)
    for name, b in splits.items():
        b.reference = saved[name]

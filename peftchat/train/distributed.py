"""Several processes under `torchrun`: the process group, who writes, and the collectives the loop needs.

`torchrun --nproc-per-node N -m peftchat.cli train RECIPE` starts N copies of the command with
`RANK`, `WORLD_SIZE` and `LOCAL_RANK` in their environment (`--nnodes` sets the same variables).
`process_group` sees them and joins the group: NCCL with `cuda:LOCAL_RANK` on GPUs, gloo on the
CPU. Without those variables nothing here does anything: a single process runs exactly as before
(no process group, `SINGLE`).

Data parallelism keeps the global sample order of one process: with N ranks and per-rank
accumulation g an optimizer step takes the N*g micro-batches a one-process run with accumulation
N*g would take, and rank r takes the contiguous share r*g .. r*g+g-1 of them
(`peftchat.data.batching.Batches.windows`). `wrap_for_training` puts the model under PyTorch's own
engines: DistributedDataParallel (`distributed.strategy=ddp`) or FSDP2's `fully_shard` per decoder
layer plus the root (`fsdp`). Both wrap a `LossModule`, because the loss runs the decoder and the
head itself rather than the model's forward, and DDP / FSDP2 hook the forward of the module they wrap.

Only rank 0 writes (checkpoints, metrics, plots, final outputs; other ranks' stdout goes to
/dev/null); every rank reads what it wrote.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch

from peftchat.config import Recipe
from peftchat.data.batching import Batches, MicroBatch, Window
from peftchat.errors import ConfigError, UserError
from peftchat.model.load import resolve_device
from peftchat.train.step import to_device

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; `SINGLE` when not launched by torchrun."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"  # none (one process, no group) | ddp | fsdp
    device: Optional[torch.device] = None  # the rank's device (None: training.device decides)
    side_group: Any = None  # a gloo group for CPU-side counts (None: the default group is gloo already)

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def check_launch(recipe: Recipe, launching: bool = False) -> None:
    """ConfigError for distributed settings that cannot work in this launch (one clear line);
    `launching`: this process is about to start the torchrun processes itself."""
    strategy = recipe.distributed.strategy
    torchrun = launching or launched_by_torchrun()
    if strategy == "fsdp" and not torchrun:
        raise ConfigError(
            "distributed.strategy=fsdp needs several processes: launch with "
            "`peftchat train --nproc-per-node N ...` or `torchrun --nproc-per-node N -m peftchat.cli train ...` "
            "(N may be 1), or set distributed.strategy=ddp"
        )
    if not torchrun:
        return
    device = recipe.training.device
    if device.startswith("cuda:"):
        raise ConfigError(
            f"training.device={device} under torchrun: each rank uses cuda:LOCAL_RANK; "
            "set training.device=cuda or auto (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if strategy == "fsdp" and recipe.training.eval_generate > 0:
        raise ConfigError(
            "training.eval_generate is not supported with distributed.strategy=fsdp; "
            "score the trained adapter with `peftchat eval` instead"
        )


def launch_local(nproc: int, argv: list[str]) -> int:
    """`peftchat train --nproc-per-node N ...`: torchrun's own launcher (`torch.distributed.run`,
    standalone rendezvous on a free port) run from inside the CLI, so that a failed process ends
    in its own one-line error and this exit code instead of torchrun's ChildFailedError traceback.
    Returns 0, or the exit code of the first process that failed (2 for a user error)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the agent logs each stop and failure; the processes' own lines say what went wrong
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)  # its OMP_NUM_THREADS banner
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "peftchat.cli", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        if failure.exitcode < 0:  # killed by a signal: no line of its own
            print(
                f"peftchat: error: process {rank} was killed by signal {-failure.exitcode}; the others were "
                f"stopped; continue from the last checkpoint with training.resume=true",
                file=sys.stderr,
                flush=True,
            )
            return 1
        return failure.exitcode
    return 0


def _rank_device(recipe: Recipe, local_rank: int) -> torch.device:
    """`training.device` as `resolve_device` reads it, on this process's own GPU (LOCAL_RANK)."""
    if resolve_device(recipe).type != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "start at most that many processes per node"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(recipe: Recipe) -> Iterator[Dist]:
    """The job's process group for the duration of the block (SINGLE and no group without
    torchrun). The group is destroyed on the way out, error or not; other ranks' stdout is muted."""
    check_launch(recipe)
    if not launched_by_torchrun():
        yield SINGLE
        return
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in TORCHRUN_VARIABLES)
    device = _rank_device(recipe, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=recipe.distributed.timeout_s)
    device_id: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timeout, **device_id)
    try:
        side = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        state = Dist(world, rank, local, recipe.distributed.strategy, device, side)
        with _muted_unless_main(state):
            if state.is_main:
                print(f"distributed: {world} process(es), strategy {state.strategy}, backend {backend}", flush=True)
            yield state
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _muted_unless_main(state: Dist) -> Iterator[None]:
    if state.is_main:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
        yield


# ------------------------------------------------------------------------------ collectives


def barrier(state: Dist) -> None:
    if state.active:
        import torch.distributed as dist

        dist.barrier(group=state.side_group)


@contextlib.contextmanager
def main_first(state: Dist) -> Iterator[None]:
    """Process 0 runs the block first (it fills the data caches), the others then (they read them)."""
    if not state.is_main:
        barrier(state)
    yield
    if state.is_main:
        barrier(state)


def sum_counts(state: Dist, values: list[float]) -> list[float]:
    """Element-wise sum of small host-side numbers over ranks (on the gloo side group: no GPU sync)."""
    if not state.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=state.side_group)
    return t.tolist()


def host_sum(state: Dist) -> Optional[Callable[[list[float]], list[float]]]:
    """`sum_counts` over the processes as a function of the values; None for one process."""
    return (lambda values: sum_counts(state, values)) if state.world_size > 1 else None


def first_over_ranks(state: Dist, index: int, value: float) -> tuple[int, int, float]:
    """(rank, index, value) of the lowest rank whose `index` is >= 0 (a collective: every rank
    calls it); this process's own three alone or when none has one."""
    if not state.active:
        return state.rank, index, value
    import torch.distributed as dist

    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, (index, value), group=state.side_group)
    return next(((r, i, v) for r, (i, v) in enumerate(gathered) if i >= 0), (state.rank, index, value))


def sum_tensor(state: Dist, t: torch.Tensor) -> torch.Tensor:
    """A device tensor summed over ranks (a new tensor; the input is kept)."""
    if not state.active:
        return t
    import torch.distributed as dist

    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def gather_to_main(state: Dist, obj: Any) -> Optional[list]:
    """Every rank's `obj` on rank 0 (a list by rank); None elsewhere."""
    if not state.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * state.world_size if state.is_main else None
    dist.gather_object(obj, out, dst=0, group=state.side_group)
    return out


# ------------------------------------------------------------------------------ the model under DDP / FSDP2


class LossModule(torch.nn.Module):
    """`loss_fn(model, batch, normalizer=...)` as a module's forward, for DDP / FSDP2 to hook."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, normalizer: float) -> torch.Tensor:
        return self.loss_fn(self.model, batch, normalizer=normalizer)


def wrap_for_training(
    model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], state: Dist, recipe: Recipe
) -> torch.nn.Module:
    """The LossModule under DDP or FSDP2 (`state.strategy`). DDP: only trainable parameters are
    reduced (frozen ones have no gradient); gradient checkpointing is non-reentrant
    (train.speedups), which DDP allows without static_graph; buffers are not broadcast (every rank
    loads the same ones, and a broadcast per forward would tie eval forwards together)."""
    wrapped = LossModule(model, loss_fn)
    if state.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [state.device.index] if state.device is not None and state.device.type == "cuda" else None
        import inspect

        # newer torch renames broadcast_buffers (and warns about the old name)
        no_sync: dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        return DistributedDataParallel(
            wrapped, device_ids=ids, find_unused_parameters=recipe.distributed.find_unused_parameters, **no_sync
        )
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # FSDP2's public name arrived in torch 2.6
        raise UserError(
            f"distributed.strategy=fsdp needs torch >= 2.6 (FSDP2's fully_shard), this is "
            f"{torch.__version__}; use distributed.strategy=ddp"
        ) from None

    from peftchat.train.speedups import decoder_layers

    # the mesh of the rank's own device type (FSDP2's default follows CUDA's presence, not training.device)
    assert state.device is not None  # set for every torchrun process (`start`)
    mesh = init_device_mesh(state.device.type, (state.world_size,))
    reshard = recipe.distributed.reshard_after_forward
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(wrapped, mesh=mesh, reshard_after_forward=reshard)  # the root: embeddings, final norm, head
    return wrapped


@contextlib.contextmanager
def gradient_sync(wrapped: Any, state: Dist, sync: bool) -> Iterator[None]:
    """Reduce gradients in this backward (`sync`) or only accumulate them locally (DDP's
    no_sync, FSDP2's set_requires_gradient_sync)."""
    if state.strategy == "ddp" and not sync:
        with wrapped.no_sync():
            yield
        return
    if state.strategy == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    yield


def full_trainable_state(model: torch.nn.Module, state: Dist) -> Optional[dict]:
    """FSDP2: the trainable parameters (LoRA, modules_to_save) gathered whole to rank 0's CPU
    (a collective: every rank calls it); None on the other ranks and without FSDP2."""
    if state.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=options)
    return full if state.is_main else None


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Dist) -> Optional[dict]:
    """FSDP2: the optimizer state gathered whole to rank 0, in `optimizer.state_dict()`'s own
    index form (so a checkpoint is the same whatever the strategy); None elsewhere / without FSDP2."""
    if state.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # torch types the nested state too loosely to index
    full: Any = get_optimizer_state_dict(model, optimizer, options=options)
    if not state.is_main:
        return None
    names = [name for group in full["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """FSDP2: load an index-form optimizer state (as `full_optimizer_state` writes it) into the
    sharded optimizer; every rank holds the whole of `saved` and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    live_keys = set(optimizer.param_groups[0])  # a saved one may hold more (the lr schedule's initial_lr)
    groups = [
        {**{k: v for k, v in group.items() if k in live_keys}, "params": [names[i] for i in group["params"]]}
        for group in saved["param_groups"]
    ]
    full: dict[str, Any] = {"state": {names[int(i)]: s for i, s in saved["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    for live, group in zip(optimizer.param_groups, saved["param_groups"]):  # as load_state_dict does
        live.update({k: v for k, v in group.items() if k != "params"})


# ------------------------------------------------------------------------------ step windows


def _spare_micro_batch(batches: Batches, window: Window) -> MicroBatch:
    """A loss-bearing micro-batch of `window` (this process's own when it has one): what a process
    runs, its loss times 0, for a pass it has no loss-bearing micro-batch for."""
    for micro in window.micro_batches:
        if micro.label_tokens:
            return micro
    for rows in window.rows:  # rare: this share has no loss-bearing sample
        micro = batches.micro_batch(rows)
        if micro.label_tokens:
            return micro
    raise AssertionError("a window with label tokens has a loss-bearing micro-batch")


def backward_window_sharded(
    wrapped: torch.nn.Module,
    window: Window,
    state: Dist,
    *,
    batches: Batches,
    accumulation: int,
    device: torch.device,
    autocast: Callable[[], Any],
    scaler: Any,
    stop_requested: bool,
    per_micro: list,
) -> tuple[torch.Tensor, int, int, bool]:
    """`step.backward_window` for one process of several: (this process's part of the window loss,
    the window's label tokens, the window's input tokens, whether any process was asked to stop),
    the counts and the stop over all processes, so every process stops after the same step.

    Each micro-batch's summed loss is divided by (the window's label tokens over ALL processes) / N:
    DDP and FSDP2 average gradients over the N processes, so the reduced gradient is that of the
    one-process window. Every process makes the same number of passes, the last one reducing
    gradients (FSDP2 gathers weights in each forward; DDP reduces in one backward per step); a
    pass without a loss-bearing micro-batch of its own runs a spare one with its loss times 0."""
    label_tokens, tokens, stop = sum_counts(state, [window.label_tokens, window.tokens, float(stop_requested)])
    total = torch.zeros((), dtype=torch.float64, device=device)
    if label_tokens == 0:  # nothing to learn anywhere: no pass, as one process skips them
        per_micro.extend(None for _ in window.micro_batches)
        return total, 0, int(tokens), stop > 0
    normalizer = label_tokens / state.world_size
    passes = min(accumulation, window.size)
    spare = None
    for i in range(passes):
        micro = window.micro_batches[i] if i < len(window.micro_batches) else None
        weight = 1.0 if micro is not None and micro.label_tokens else 0.0
        if micro is not None and not weight:
            per_micro.append(None)
        if not weight:
            spare = spare or _spare_micro_batch(batches, window)
        batch = micro if weight else spare
        assert batch is not None  # weight 0: the spare one
        with gradient_sync(wrapped, state, sync=i == passes - 1):
            with autocast():
                loss = wrapped(to_device(batch.tensors, device), normalizer) * weight
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if weight:
            total += loss.detach().double()
            per_micro.append(loss.detach())
    return total, int(label_tokens), int(tokens), stop > 0

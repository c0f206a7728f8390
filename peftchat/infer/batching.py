"""Many requests, one model: a bounded queue and one thread that generates them in batches.

Why not transformers' continuous batching (`model.init_continuous_batching`, the
`ContinuousBatchingManager` in transformers 5.x)? It was the first choice, and it cannot keep what
the server promises:
* a format's forced continuations (`decoding.ForcedContinuation`, a logits processor of ours)
  have no per-request form there and are dropped, so MOSS-style replies would change;
* it samples from one RNG for all requests, so a request's `seed` could not give its reply again;
* it swaps the attention for paged attention, whose sums need not equal `generate`'s, so replies
  at temperature 0 could differ from `peftchat chat`'s (the exact-equality promise);
* merge-on-load is no way out for an adapter on a k-bit (NF4) base: merging into the dequantized
  weights changes the numbers chat computes with the unmerged adapter.
So requests are batched statically: the queue's oldest job and every queued job that may share its
sampling settings (`batch_key`) run as one left-padded `model.generate` (`ChatEngine.run_batch`),
up to `max_batch` rows; jobs that arrive meanwhile make the next batch. A job that finishes or
whose client leaves stops taking tokens at the next step (its row is padded); a batch ends as soon
as none of its jobs is left. `max_batch=1` is the one-at-a-time server of before (benchmarks
compare the two).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Hashable

from peftchat.infer.engine import ChatEngine, Job

log = logging.getLogger("peftchat.serve")


class QueueFull(Exception):
    """More jobs are waiting than the server takes (an HTTP 429)."""


def batch_key(job: Job) -> Hashable:
    """Jobs with equal keys may share a batch. Greedy jobs ignore their seed; a seeded sampled job
    is batched only with the other choices of its own request (the seed seeds the whole batch)."""
    d = job.recipe.decoding
    if d.temperature <= 0:
        return ("greedy", d.repetition_penalty)
    if job.seed is not None:
        return ("seeded", job.group)
    return ("sample", d.temperature, d.top_p, d.top_k, d.repetition_penalty)


class Scheduler:
    """A queue of at most `max_queued` waiting jobs and a thread that runs them in batches of at
    most `max_batch`."""

    def __init__(self, engine: ChatEngine, max_batch: int = 16, max_queued: int = 64) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.largest_batch = 0  # the most jobs generated together so far (tests, benchmarks)
        self.thread = threading.Thread(target=self._loop, name="peftchat-batches", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (one request's choices) together, or raise QueueFull."""
        with self.cond:
            if self.stopping or len(self.pending) + len(jobs) > self.max_queued:
                raise QueueFull()
            self.pending.extend(jobs)
            self.cond.notify()

    def busy(self) -> int:
        """Jobs queued or generating."""
        with self.cond:
            return len(self.pending) + len(self.running)

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job and the waiting jobs that may share its batch (called locked)."""
        key = batch_key(self.pending[0])
        batch: list[Job] = []
        rest: deque[Job] = deque()
        while self.pending:
            job = self.pending.popleft()
            if len(batch) < self.max_batch and batch_key(job) == key:
                batch.append(job)
            else:
                rest.append(job)
        self.pending = rest
        return batch

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.pending:
                    return
                self.running = self._next_batch()
                self.largest_batch = max(self.largest_batch, len(self.running))
            try:
                self.engine.run_batch(self.running)
            except Exception:  # a bug or an out-of-memory: its requests get a 500, the server lives on
                log.exception("generation failed for a batch of %d", len(self.running))
            with self.cond:
                self.running = []

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, queued or generating, and wait up to `timeout` s for the thread."""
        with self.cond:
            self.stopping = True
            for job in list(self.pending) + self.running:
                job.cancel.set()
            self.cond.notify()
        self.thread.join(timeout)

"""Is a training step host-bound, and where? The real loop (a peftchat setting, default `fast`
on the 8B NF4 shape, 4 x 2048) with timestamps taken at fixed points of each step, no profiler:

  S       step start (the previous step ended with a device sync, so the GPU is idle here)
  F<i>    decoder layer i's forward begins
  R<i>    decoder layer i's recompute begins (checkpointed layers, in backward)
  O       the optimizer step begins (backward and gradient clipping enqueued)
  P       the optimizer step is enqueued

At each point the host's clock is read and a CUDA event is recorded on the current stream. After
the step, `slack` = (when the GPU reached the point) - (when the host enqueued it), both from S.
A slack near zero means the GPU had run out of work and was waiting for the host there; a
growing slack means the host is ahead and the GPU is the limit. The profiler (profile_step.py)
cannot answer this: its own host cost (wall 954 against 718 ms/step, round 5) is the question.

`--sample`: where the host's time goes, by a thread that samples every Python thread's stack
(`sys._current_frames`) about every millisecond during the steps after the first; the frames
seen most often (inclusive) per thread go to host_lag_stacks.md. Time in C++ with no Python
frame on a thread (the autograd engine between Python functions) is not seen.

    python3 -m benchmarks.host_lag --out $OUT/lag --setting fast [--sample]
    python -m benchmarks.host_lag --device cpu --shape tiny --seq 64 --out /tmp/lag   # plumbing only
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch

STARVED_MS = 0.2  # slack below this: the GPU reached the point about as soon as it was enqueued


class Clock:
    """Host time and a device marker at named points of one step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.points: list[tuple[str, float, Any]] = []
        self.seen: set[int] = set()  # decoder layers whose forward ran this step (a second run is the recompute)
        self.step = 0
        # Python's garbage collections while steps run (gc.callbacks): a full one stops the host for
        # as long as it scans every tracked object (313 ms after a tiny CPU run here, 580k objects),
        # which the GPU feels where its queue is short (early in the forward)
        self.collections: list[dict[str, Any]] = []
        self._gc_start: Optional[float] = None

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.collections.append({"step": self.step, "generation": info["generation"],
                                     "ms": (time.perf_counter() - self._gc_start) * 1e3,
                                     "after": self.points[-1][0] if self.points else "-"})

    def mark(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.points.append((name, time.perf_counter(), event))

    def take(self) -> list[dict[str, Any]]:
        """The step's points as rows (host_ms, gpu_ms, slack_ms from S), then start afresh."""
        if self.cuda:
            torch.cuda.synchronize()
        rows = []
        if self.points:
            _, host0, event0 = self.points[0]
            for name, host, event in self.points:
                gpu = event0.elapsed_time(event) if self.cuda else (host - host0) * 1e3
                rows.append({"point": name, "host_ms": (host - host0) * 1e3, "gpu_ms": gpu,
                             "slack_ms": gpu - (host - host0) * 1e3})
        self.points = []
        self.seen.clear()
        self.step += 1
        return rows


class StackSampler(threading.Thread):
    """Counts, per thread, the Python frames on its stack at each sample (see the module doc)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.active, self.samples = interval_s, False, 0
        self.frames: dict[int, Counter] = {}  # inclusive: the frame anywhere on the stack
        self.leaves: dict[int, Counter] = {}  # the innermost frame (a C++ call shows as its Python line)
        self.done = threading.Event()

    def run(self) -> None:
        me = threading.get_ident()
        while not self.done.is_set():
            if self.active:
                self.samples += 1
                for tid, frame in sys._current_frames().items():
                    if tid != me:
                        stack = _stack(frame)
                        self.frames.setdefault(tid, Counter()).update(set(stack))
                        self.leaves.setdefault(tid, Counter())[stack[0]] += 1
            time.sleep(self.interval_s)

    def markdown(self, top: int = 30) -> str:
        names = {t.ident: t.name for t in threading.enumerate()}
        lines = [f"# host stacks: {self.samples} samples", "",
                 "share of samples with the frame on the thread's stack (inclusive)", ""]
        for tid, counts in sorted(self.frames.items(), key=lambda kv: -sum(kv[1].values())):
            lines += [f"## thread {names.get(tid, tid)}", "", "| share | frame |", "|---:|---|"]
            lines += [f"| {100 * n / max(1, self.samples):.1f} % | `{f}` |" for f, n in counts.most_common(top)]
            lines += ["", "| share | innermost frame |", "|---:|---|"]
            lines += [f"| {100 * n / max(1, self.samples):.1f} % | `{f}` |" for f, n in self.leaves[tid].most_common(top)]
            lines.append("")
        return "\n".join(lines)


def _stack(frame) -> list[str]:
    out = []
    while frame is not None and len(out) < 60:
        path = frame.f_code.co_filename
        for root in ("site-packages/", "peftchat/", "benchmarks/"):
            if root in path:
                path = path[path.index(root) + (len(root) if root == "site-packages/" else 0):]
                break
        out.append(f"{path}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return out


def attach(model: torch.nn.Module, clock: Clock, handles: list) -> None:
    """A forward pre-hook on each decoder layer's first norm: F<i> in forward, R<i> when the layer
    runs again in backward (on the norm, not the layer: transformers' checkpointing recomputes
    the layer's `forward` directly, without the module call that runs hooks)."""
    from peftchat.model.kernels import decoder_layers

    layers = decoder_layers(model)

    def pre_hook(i: int):
        def hook(module, args) -> None:
            if i in clock.seen:  # a layer's second forward in a step is its recompute
                clock.mark(f"R{i}")
            else:
                clock.seen.add(i)
                clock.mark(f"F{i}")
        return hook

    for i, layer in enumerate(layers):
        first = getattr(layer, "input_layernorm", None) or next(layer.children())
        handles.append(first.register_forward_pre_hook(pre_hook(i)))
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    # global hooks (every optimizer): removed by the caller through `handles` after the run
    handles.append(register_optimizer_step_pre_hook(lambda opt, args, kwargs: clock.mark("O")))
    handles.append(register_optimizer_step_post_hook(lambda opt, args, kwargs: clock.mark("P")))


def summarize(steps: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The last step's points, and per phase (forward; backward with the optimizer step) the share
    of points where the GPU was starved and the range of the slack."""
    last = steps[-1]
    by_phase: dict[str, list[dict]] = {"forward": [], "backward": []}
    for row in last:
        if row["point"].startswith("F"):
            by_phase["forward"].append(row)
        elif row["point"].startswith("R") or row["point"] in ("O", "P"):
            by_phase["backward"].append(row)
    out: dict[str, Any] = {"points": last}
    for phase, rows in by_phase.items():
        if rows:
            out[phase] = {"starved_share": sum(r["slack_ms"] < STARVED_MS for r in rows) / len(rows),
                          "slack_ms_min": min(r["slack_ms"] for r in rows),
                          "slack_ms_max": max(r["slack_ms"] for r in rows)}
    return out


def markdown(summary: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", "slack = when the GPU reached the point - when the host enqueued it "
             f"(ms from step start); below {STARVED_MS} ms the GPU was waiting for the host", ""]
    for phase in ("forward", "backward"):
        if phase in summary:
            s = summary[phase]
            lines.append(f"- {phase}: {100 * s['starved_share']:.0f} % of points starved, slack "
                         f"{s['slack_ms_min']:.2f} .. {s['slack_ms_max']:.2f} ms")
    collections = summary.get("collections", [])
    full = [c for c in collections if c["generation"] == 2]
    lines.append(f"- Python garbage collections during the steps after the first: {len(collections)}, "
                 f"{sum(c['ms'] for c in collections):.1f} ms in all; full (generation 2): "
                 + (", ".join(f"{c['ms']:.0f} ms in step {c['step'] + 1} after {c['after']}" for c in full) or "none"))
    lines += ["", "| point | host ms | GPU ms | slack ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r['point']} | {r['host_ms']:.2f} | {r['gpu_ms']:.2f} | {r['slack_ms']:.2f} |"
              for r in summary["points"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks.profile_step import add_run_args

    p = argparse.ArgumentParser()
    add_run_args(p, setting="fast", steps=4)
    p.add_argument("--sample", action="store_true", help="sample the host threads' stacks (host_lag_stacks.md)")
    args = p.parse_args(argv)
    from benchmarks import peftchat_variants
    from benchmarks.shapes import bench_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(args.device).type == "cuda"
    clock = Clock(cuda)
    steps: list[list[dict[str, Any]]] = []

    sampler = StackSampler() if args.sample else None
    if sampler is not None:
        sys.setswitchinterval(0.0005)  # let the sampler in between other threads' bytecodes
        sampler.start()

    def after_step(run) -> None:
        if sampler is not None:
            sampler.active = False  # the sync and bookkeeping between steps stay out
        steps.append(clock.take())
        clock.mark("S")
        if sampler is not None:
            sampler.active = run.state.step < run.total_steps  # not the run's wrap-up after the last

    spec = {"shape": args.shape, "mode": args.mode, "variant": f"peftchat:{args.setting}", "batch": args.batch,
            "seq": args.seq, "warmup": 0, "steps": args.steps, "device": args.device, "dropout": args.dropout,
            "model_dir": str(bench_model(args.shape, args.models_dir, args.device)),
            "work_dir": str(Path(tempfile.gettempdir()) / "peftchat_host_lag")}
    handles: list = []
    gc.callbacks.append(clock.on_gc)
    try:
        row = peftchat_variants.run(spec, after_step=after_step, after_model_load=lambda m: attach(m, clock, handles))
    finally:
        gc.callbacks.remove(clock.on_gc)
        for handle in handles:
            handle.remove()
        if sampler is not None:
            sampler.done.set()
            sampler.join()
            (out / "host_lag_stacks.md").write_text(sampler.markdown())
    timed = [s for s in steps[1:] if s and s[0]["point"] == "S"]  # step 1 has no S (and compiles)
    summary = summarize(timed or steps)
    # step 0 is the first (compiling) one; collections after the last step are the run's wrap-up
    summary["collections"] = [c for c in clock.collections if 1 <= c["step"] < len(steps)]
    summary.update(setting=args.setting, shape=args.shape, mode=args.mode, tokens_per_s=row.get("tokens_per_s"),
                   applied=row.get("applied"))
    (out / "host_lag.json").write_text(json.dumps(summary, indent=1))
    title = f"host lag, peftchat {args.setting}, {args.shape} {args.mode}, {args.batch} x {args.seq} ({args.device})"
    (out / "host_lag.md").write_text(markdown(summary, title))
    print(markdown(summary, title).split("| point")[0], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

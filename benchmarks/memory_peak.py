"""What is alive at a training run's peak of allocated CUDA memory, by the code that allocated it.

Bench option `+memsnap` (peftchat_variants.py) records the allocator's history from the moment the
model is loaded (`torch.cuda.memory._record_memory_history`, Python stacks) and writes this
module's report beside the results: the allocations made during the run that are still alive at
the peak, summed by the first frame in peftchat / transformers / peft / bitsandbytes / liger /
torch.optim / torch.utils.checkpoint. Written for round 4: peftchat's lean row peaked 0.24 GiB
higher with the fused LoRA function than with peft's layers, and packed rows 0.45 GiB over
unsloth's, for reasons a profile could not show.

    python -m benchmarks.memory_peak SNAPSHOT.pickle     # a snapshot dumped by torch
"""

from __future__ import annotations

import pickle
import sys
from collections import defaultdict
from typing import Any

MIB = 1024 ** 2
OWN_CODE = ("peftchat/", "benchmarks/", "transformers/", "/peft/", "bitsandbytes/", "liger_kernel/",
            "torch/optim/", "torch/utils/checkpoint", "torch/autograd/")


def live_at_peak(events: list[dict[str, Any]]) -> tuple[int, int, dict[int, dict[str, Any]]]:
    """Replay alloc / free events: (peak bytes above the start, index of the event that reached it,
    {address: alloc event} alive then)."""
    live: dict[int, dict[str, Any]] = {}
    total = peak = 0
    peak_index, peak_live = -1, {}
    for i, e in enumerate(events):
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, peak_index, peak_live = total, i, dict(live)
        elif action in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return peak, peak_index, peak_live


def site(frames: list[dict[str, Any]]) -> str:
    """The first frame of code worth naming (innermost first, as torch records them)."""
    for f in frames:
        name = f.get("filename", "")
        if any(part in name for part in OWN_CODE):
            return f"{name.split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
    return "(torch internals)" if frames else "(no stack)"


def report(snapshot: dict[str, Any], top: int = 25) -> str:
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    peak, index, live = live_at_peak(events)
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in live.values():
        entry = by_site[site(e.get("frames", []))]
        entry[0] += e["size"]
        entry[1] += 1
    lines = [f"peak above the recording start: {peak / MIB:,.1f} MiB at event {index} of {len(events)}",
             f"{'MiB':>10} {'count':>6}  allocated at"]
    for name, (size, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / MIB:10,.1f} {count:6d}  {name}")
    if 0 <= index < len(events):
        lines.append("stack of the allocation that reached the peak:")
        lines += [f"    {f.get('filename', '').split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
                  for f in events[index].get("frames", [])[:14]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], "rb") as f:
        print(report(pickle.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

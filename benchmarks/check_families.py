"""GPU check of every supported model family: which fused kernels each one gets on CUDA, and whether
they compute the same loss as the plain path.

For each family: `peftchat tiny-model --arch A`, then `peftchat train` of the demo recipe twice on
the device, once with `training.fused_kernels=auto` and once with `false` (same seed, same data,
`adapter.modules_to_save=[]` so the head is a plain Linear the fused cross-entropy can take). Each
run is its own process, because liger patches transformers' modules in place. Recorded per
family: the loop's `speed-ups:` line (the kernels it applied; `liger:fused_linear_cross_entropy`
or `loss:chunked`), the losses of both runs and their largest step-by-step difference.

    python -m benchmarks.check_families --out OUT_DIR                  # on the GPU machine
    python -m benchmarks.check_families --out OUT_DIR --device cpu --steps 2   # dry run: no kernels

Writes OUT_DIR/families.json and OUT_DIR/families.md, plus one log per run under OUT_DIR/logs/.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEFTCHAT = [sys.executable, "-c", "import sys; from peftchat.cli import main; sys.exit(main())"]


def run(cmd: list[str], log: Path, timeout: float) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ peftchat " + " ".join(cmd[len(PEFTCHAT):]) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[timed out after {timeout:.0f} s]\n")
            return 124


def train_once(model: Path, out: Path, log: Path, args: argparse.Namespace, fused: str) -> dict:
    """One `peftchat train` run; its speed-ups line and per-step losses."""
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"model.path={model}", f"model.dtype={args.dtype}", f"model.compute_dtype={args.dtype}",
                 "adapter.modules_to_save=[]", f"training.device={args.device}", f"training.output_dir={out}",
                 f"training.max_steps={args.steps}", "training.warmup_steps=1", "training.batch_size=4",
                 "training.log_steps=1", "training.save_steps=0", "training.eval_steps=0", "data.eval_split=0",
                 "data.max_length=256", "training.tensorboard=false", f"training.fused_kernels={fused}"]
    rc = run(PEFTCHAT + ["train", "recipes/demo.yaml", *overrides], log, args.timeout)
    text = log.read_text(encoding="utf-8", errors="replace")
    speedups = re.findall(r"^speed-ups: (.*)$", text, flags=re.M)
    losses = []
    if rc == 0 and (out / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in rows if "loss" in r]
    tail = [line for line in text.splitlines() if line.strip()][-3:] if rc else []
    return {"rc": rc, "speedups": speedups[-1].split(", ") if speedups else [], "losses": losses, "error_tail": tail}


def check_family(arch: str, args: argparse.Namespace, work: Path, logs: Path) -> dict:
    model = work / f"tiny-{arch}"
    rc = run(PEFTCHAT + ["tiny-model", str(model), "--arch", arch], logs / f"{arch}-tiny-model.log", 300)
    if rc != 0:
        return {"arch": arch, "tiny_model_rc": rc}
    config = json.loads((model / "config.json").read_text())
    fused = train_once(model, work / f"run-{arch}-fused", logs / f"{arch}-train-fused.log", args, "auto")
    plain = train_once(model, work / f"run-{arch}-plain", logs / f"{arch}-train-plain.log", args, "false")
    pairs = list(zip(fused["losses"], plain["losses"]))
    return {"arch": arch, "class": config["architectures"][0], "model_type": config["model_type"],
            "fused": fused, "plain": plain,
            "max_loss_diff": max((abs(a - b) for a, b in pairs), default=None),
            "first_loss_diff": abs(pairs[0][0] - pairs[0][1]) if pairs else None}


def markdown(result: dict) -> str:
    lines = [f"# Model families on {result['device']} ({result['date']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             f"`peftchat train recipes/demo.yaml` on each tiny model, {result['steps']} steps, {result['dtype']}, "
             "adapter.modules_to_save=[]; fused = training.fused_kernels=auto, plain = false.", "",
             "| arch | class | kernels applied (fused run) | step-1 loss fused / plain | max step loss diff | rc |",
             "|---|---|---|---|---|---|"]
    for r in result["families"]:
        if "fused" not in r:
            lines.append(f"| {r['arch']} | - | tiny-model failed | - | - | {r.get('tiny_model_rc')} |")
            continue
        f, p = r["fused"], r["plain"]
        first = (f"{f['losses'][0]:.4f} / {p['losses'][0]:.4f}" if f["losses"] and p["losses"] else "-")
        diff = "-" if r["max_loss_diff"] is None else f"{r['max_loss_diff']:.2e}"
        lines.append(f"| {r['arch']} | {r['class']} | {', '.join(f['speedups']) or 'none'} | {first} | {diff} | "
                     f"{f['rc']}/{p['rc']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", help="cpu for a dry run (no fused kernels there)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="fp32", help="fp32 keeps the fused/plain comparison tight")
    p.add_argument("--families", nargs="*", default=None, help="default: every arch of `peftchat tiny-model`")
    p.add_argument("--timeout", type=float, default=300, help="seconds per training run")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "peftchat_check_families"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from benchmarks.bench import versions
    from peftchat.demo_assets import TINY_ARCHS

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    families = args.families or list(TINY_ARCHS)
    results = []
    for arch in families:
        results.append(check_family(arch, args, work, out / "logs"))
        r = results[-1]
        print(json.dumps({"arch": arch, "speedups": r.get("fused", {}).get("speedups"),
                          "rc": [r.get("fused", {}).get("rc"), r.get("plain", {}).get("rc")],
                          "max_loss_diff": r.get("max_loss_diff")}), flush=True)
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": args.device,
              "versions": versions(), "steps": args.steps, "dtype": args.dtype, "families": results}
    (out / "families.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "families.md").write_text(markdown(result), encoding="utf-8")
    ok = all(r.get("fused", {}).get("rc") == 0 and r.get("plain", {}).get("rc") == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

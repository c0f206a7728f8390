"""GPU checks through the CLI, each a subcommand (`python -m benchmarks checks NAME --help`):

train-merge  `peftchat train` of a 4-bit NF4 QLoRA adapter on a random-init Llama of the 1b shape
             (Llama-3.2-1B sizes), ~30 steps of the shipped demo recipe; peak memory and tokens/s
             from its training_summary.json; then `peftchat merge --verify` of that adapter and its
             parity figures (the record: benchmarks/results/gpu_checks.md).
families     every supported model family: `peftchat tiny-model --arch A`, then `peftchat train`
             of the demo recipe twice, `training.fused_kernels=auto` and `false` (same seed and
             data, `adapter.modules_to_save=[]` so the head is a plain Linear the fused
             cross-entropy takes), each its own process (liger patches transformers in place): the
             speed-ups line of each, the losses and their largest step-by-step difference.
             Writes families.json and families.md, logs under logs/.
distributed  the torchrun paths against a plain run of the demo QLoRA recipe: (plain) one process;
             (ddp) `torchrun --nproc-per-node N` (NCCL on a GPU, gloo on the CPU), DDP; (fsdp)
             `distributed.strategy=fsdp`: FSDP2 per decoder layer + root over a 4-bit base. Per
             run: exit code, tokens/s, peak memory, and the largest relative difference of the
             per-step losses and of the adapter against the plain run.

    python -m benchmarks checks train-merge --out OUT_DIR [--steps 30]
    python -m benchmarks checks families --out OUT_DIR [--device cpu --steps 2]
    python -m benchmarks checks distributed --out OUT_DIR [--smoke]   # --smoke: tiny shape on CPU / gloo
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEFTCHAT = [sys.executable, "-m", "peftchat.cli"]


def run(cmd: list[str], log: Path, timeout: float) -> int:
    """`cmd` from the repository root, its output into `log`; 124 when it timed out."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ntimed out after {timeout:.0f} s\n")
            return 124


def train_merge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks checks train-merge")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--shape", default="1b", help="tiny for a CPU dry run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "peftchat_bench_models"))
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "peftchat_gpu_checks"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from benchmarks.bench import versions
    from benchmarks.shapes import bench_model
    from peftchat.demo_assets import demo_tokenizer_dir

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = bench_model(args.shape, args.models_dir, args.device)
    adapter, merged = work / f"qlora-{args.shape}", work / f"merged-{args.shape}"
    overrides = [
        f"model.path={model}",
        f"model.tokenizer={demo_tokenizer_dir()}",
        "model.dtype=bf16",
        "model.compute_dtype=bf16",
        f"training.device={args.device}",
        f"training.max_steps={args.steps}",
        f"training.output_dir={adapter}",
        "training.lr=2e-4",
        "training.save_steps=0",
        "training.log_steps=5",
        "training.gradient_checkpointing=true",
        "training.tensorboard=false",
    ]
    shutil.rmtree(adapter, ignore_errors=True)  # the loop refuses to train over a finished run
    train_cmd = PEFTCHAT + ["train", "recipes/demo_qlora.yaml", *overrides]
    rc_train = run(train_cmd, out / "train.log", 600)
    summary = json.loads((adapter / "training_summary.json").read_text()) if rc_train == 0 else {}
    merge_cmd = PEFTCHAT + ["merge", "--adapter", str(adapter), "--out", str(merged), "--verify", "--force"]
    rc_merge = run(merge_cmd, out / "merge.log", 600) if rc_train == 0 else None
    verify = re.findall(r"verify: .*", (out / "merge.log").read_text()) if rc_merge is not None else []
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "train_rc": rc_train,
        "merge_rc": rc_merge,
        "summary": summary,
        "verify": verify,
        "train_command": "peftchat train recipes/demo_qlora.yaml " + " ".join(overrides),
        "merge_command": f"peftchat merge --adapter {adapter} --out {merged} --verify --force",
    }
    (out / "gpu_checks.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("train_rc", "merge_rc", "verify")}))
    print(
        json.dumps(
            {
                k: summary.get(k)
                for k in (
                    "steps",
                    "tokens_per_s",
                    "peak_memory_gb",
                    "memory_kind",
                    "first_loss",
                    "final_loss",
                    "eval_loss",
                )
            }
        )
    )
    return 0 if rc_train == 0 and rc_merge == 0 else 1


def train_once(model: Path, out: Path, log: Path, args: argparse.Namespace, fused: str) -> dict:
    """One `peftchat train` run; its speed-ups line and per-step losses."""
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"model.path={model}",
        f"model.dtype={args.dtype}",
        f"model.compute_dtype={args.dtype}",
        "adapter.modules_to_save=[]",
        f"training.device={args.device}",
        f"training.output_dir={out}",
        f"training.max_steps={args.steps}",
        "training.warmup_steps=1",
        "training.batch_size=4",
        "training.log_steps=1",
        "training.save_steps=0",
        "training.eval_steps=0",
        "data.eval_split=0",
        "data.max_length=256",
        "training.tensorboard=false",
        f"training.fused_kernels={fused}",
    ]
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
    return {
        "arch": arch,
        "class": config["architectures"][0],
        "model_type": config["model_type"],
        "fused": fused,
        "plain": plain,
        "max_loss_diff": max((abs(a - b) for a, b in pairs), default=None),
        "first_loss_diff": abs(pairs[0][0] - pairs[0][1]) if pairs else None,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Model families on {result['device']} ({result['date']})",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        f"`peftchat train recipes/demo.yaml` on each tiny model, {result['steps']} steps, {result['dtype']}, "
        "adapter.modules_to_save=[]; fused = training.fused_kernels=auto, plain = false.",
        "",
        "| arch | class | kernels applied (fused run) | step-1 loss fused / plain | max step loss diff | rc |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["families"]:
        if "fused" not in r:
            lines.append(f"| {r['arch']} | - | tiny-model failed | - | - | {r.get('tiny_model_rc')} |")
            continue
        f, p = r["fused"], r["plain"]
        first = f"{f['losses'][0]:.4f} / {p['losses'][0]:.4f}" if f["losses"] and p["losses"] else "-"
        diff = "-" if r["max_loss_diff"] is None else f"{r['max_loss_diff']:.2e}"
        lines.append(
            f"| {r['arch']} | {r['class']} | {', '.join(f['speedups']) or 'none'} | {first} | {diff} | "
            f"{f['rc']}/{p['rc']} |"
        )
    return "\n".join(lines) + "\n"


def families(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks checks families")
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
        print(
            json.dumps(
                {
                    "arch": arch,
                    "speedups": r.get("fused", {}).get("speedups"),
                    "rc": [r.get("fused", {}).get("rc"), r.get("plain", {}).get("rc")],
                    "max_loss_diff": r.get("max_loss_diff"),
                }
            ),
            flush=True,
        )
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "versions": versions(),
        "steps": args.steps,
        "dtype": args.dtype,
        "families": results,
    }
    (out / "families.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "families.md").write_text(markdown(result), encoding="utf-8")
    ok = all(r.get("fused", {}).get("rc") == 0 and r.get("plain", {}).get("rc") == 0 for r in results)
    return 0 if ok else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, nproc: int) -> list[str]:
    if kind == "plain":
        return list(PEFTCHAT)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        "-m",
        "peftchat.cli",
    ]


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def max_relative(a: dict, b: dict) -> float | None:
    keys = sorted(a.keys() & b.keys())
    if not keys:
        return None
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in keys)


def adapter_difference(a: Path, b: Path) -> float | None:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if x.keys() != y.keys():
        return None
    return max(float((x[k].float() - y[k].float()).norm() / x[k].float().norm().clamp_min(1e-12)) for k in x)


def overrides_for(args: argparse.Namespace, model: Path, tokenizer: str) -> list[str]:
    device = "cpu" if args.smoke else args.device
    dtype = "fp32" if args.smoke else "bf16"
    return [
        f"model.path={model}",
        f"model.tokenizer={tokenizer}",
        f"model.dtype={dtype}",
        f"model.compute_dtype={dtype}",
        f"model.quantization={args.quantization}",
        f"training.device={device}",
        f"training.max_steps={args.steps}",
        "training.lr=2e-4",
        "training.save_steps=0",
        "training.eval_steps=0",
        "data.eval_split=0",
        "training.log_steps=1",
        "adapter.dropout=0.0",
        f"training.batch_size={args.batch_size}",
        f"training.gradient_checkpointing={'false' if args.smoke else 'true'}",
        "training.tensorboard=false",
    ]


def check(kind: str, args: argparse.Namespace, overrides: list[str], work: Path, out: Path) -> dict:
    adapter = work / kind
    shutil.rmtree(adapter, ignore_errors=True)  # the loop refuses to train over a finished run
    extra = ["distributed.strategy=fsdp"] if kind == "fsdp" else []
    if kind == "plain":  # the same global batch as N processes with accumulation 1
        extra = [f"training.gradient_accumulation_steps={args.nproc}"]
    cmd = launch(kind, args.nproc) + [
        "train",
        "recipes/demo_qlora.yaml",
        *overrides,
        f"training.output_dir={adapter}",
        *extra,
    ]
    rc = run(cmd, out / f"{kind}.log", args.timeout)
    result: dict = {"rc": rc, "command": " ".join(cmd)}
    if rc == 0:
        summary = json.loads((adapter / "training_summary.json").read_text())
        result.update(
            {
                k: summary.get(k)
                for k in ("steps", "tokens_per_s", "peak_memory_gb", "memory_kind", "first_loss", "final_loss")
            }
        )
        result["losses"] = step_losses(adapter)
    else:
        result["log_tail"] = (out / f"{kind}.log").read_text(encoding="utf-8", errors="replace")[-2000:]
    return result


def distributed(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks checks distributed")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shape", default="1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    p.add_argument("--quantization", default="4bit", choices=["4bit", "none"])
    p.add_argument("--smoke", action="store_true", help="tiny shape, CPU, gloo, fp32: a dry run of the script")
    p.add_argument("--runs", default="plain,ddp,fsdp")
    p.add_argument("--nproc", type=int, default=1, help="processes per torchrun (GPUs); plain gets that accumulation")
    p.add_argument("--timeout", type=float, default=540)
    p.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "peftchat_bench_models"))
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "peftchat_check_distributed"))
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.batch_size = "tiny", 2
    sys.path.insert(0, str(REPO))
    from benchmarks.shapes import bench_model
    from peftchat.demo_assets import demo_tokenizer_dir

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = str(demo_tokenizer_dir())
    model = bench_model(args.shape, args.models_dir, "cpu" if args.smoke else args.device)
    overrides = overrides_for(args, model, tokenizer)
    runs = {kind: check(kind, args, overrides, work, out) for kind in args.runs.split(",")}
    plain = runs.get("plain", {})
    for kind, result in runs.items():
        if kind != "plain" and result["rc"] == 0 and plain.get("rc") == 0:
            result["loss_max_rel_diff_vs_plain"] = max_relative(plain["losses"], result["losses"])
            result["adapter_max_rel_diff_vs_plain"] = adapter_difference(work / "plain", work / kind)
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": args.shape,
        "nproc": args.nproc,
        "smoke": args.smoke,
        "quantization": args.quantization,
        "steps": args.steps,
        "runs": runs,
    }
    (out / "check_distributed.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    for kind, r in runs.items():
        print(
            json.dumps(
                {
                    "run": kind,
                    **{
                        k: r.get(k)
                        for k in (
                            "rc",
                            "tokens_per_s",
                            "peak_memory_gb",
                            "loss_max_rel_diff_vs_plain",
                            "adapter_max_rel_diff_vs_plain",
                        )
                    },
                }
            )
        )
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


CHECKS = {"train-merge": train_merge, "families": families, "distributed": distributed}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in CHECKS:
        print(__doc__, file=sys.stderr)
        return 2
    return CHECKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

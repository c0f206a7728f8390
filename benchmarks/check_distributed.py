"""The torchrun code paths on one machine, against a plain single-process run of the same recipe:

(plain) `peftchat train` in one process (no process group);
(ddp)   `torchrun --nproc-per-node 1 -m peftchat.cli train` (`--nproc N`: N, and plain gets accumulation N) (NCCL on a GPU, gloo on the CPU), DDP;
(fsdp)  the same with `distributed.strategy=fsdp`: FSDP2 `fully_shard` per decoder layer + root over
        a 4-bit QLoRA base (bitsandbytes quant_storage = compute dtype).

Each trains `--steps` steps of the shipped demo QLoRA recipe on a random-init Llama of `--shape`
(benchmarks/shapes.py; built once into --models-dir); reported per run: exit code, tokens/s, peak
memory (from training_summary.json), and the max relative difference of the logged per-step losses
and of the adapter against the plain run. JSON to --out/check_distributed.json, logs beside it.

    python -m benchmarks.check_distributed --out OUT_DIR                # on the GPU machine: 1b, cuda
    python -m benchmarks.check_distributed --out OUT_DIR --smoke        # tiny shape on CPU / gloo
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEFTCHAT = [sys.executable, "-m", "peftchat.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, nproc: int) -> list[str]:
    if kind == "plain":
        return list(PEFTCHAT)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(_free_port()), "-m", "peftchat.cli"]


def run(cmd: list[str], log: Path, timeout: float) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ntimed out after {timeout} s\n")
            return 124


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
    return [f"model.path={model}", f"model.tokenizer={tokenizer}", f"model.dtype={dtype}",
            f"model.compute_dtype={dtype}", f"model.quantization={args.quantization}", f"training.device={device}",
            f"training.max_steps={args.steps}", "training.lr=2e-4", "training.save_steps=0", "training.eval_steps=0",
            "data.eval_split=0", "training.log_steps=1", "adapter.dropout=0.0", f"training.batch_size={args.batch_size}",
            f"training.gradient_checkpointing={'false' if args.smoke else 'true'}", "training.tensorboard=false"]


def check(kind: str, args: argparse.Namespace, overrides: list[str], work: Path, out: Path) -> dict:
    adapter = work / kind
    shutil.rmtree(adapter, ignore_errors=True)  # the loop refuses to train over a finished run
    extra = ["distributed.strategy=fsdp"] if kind == "fsdp" else []
    if kind == "plain":  # the same global batch as N processes with accumulation 1
        extra = [f"training.gradient_accumulation_steps={args.nproc}"]
    cmd = launch(kind, args.nproc) + ["train", "recipes/demo_qlora.yaml", *overrides, f"training.output_dir={adapter}", *extra]
    rc = run(cmd, out / f"{kind}.log", args.timeout)
    result: dict = {"rc": rc, "command": " ".join(cmd)}
    if rc == 0:
        summary = json.loads((adapter / "training_summary.json").read_text())
        result.update({k: summary.get(k) for k in ("steps", "tokens_per_s", "peak_memory_gb", "memory_kind",
                                                   "first_loss", "final_loss")})
        result["losses"] = step_losses(adapter)
    else:
        result["log_tail"] = (out / f"{kind}.log").read_text(encoding="utf-8", errors="replace")[-2000:]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
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
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
              "nproc": args.nproc,
              "smoke": args.smoke, "quantization": args.quantization, "steps": args.steps, "runs": runs}
    (out / "check_distributed.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    for kind, r in runs.items():
        print(json.dumps({"run": kind, **{k: r.get(k) for k in ("rc", "tokens_per_s", "peak_memory_gb",
                                                                 "loss_max_rel_diff_vs_plain",
                                                                 "adapter_max_rel_diff_vs_plain")}}))
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end GPU checks through the CLI, for the record in benchmarks/results/gpu_checks.md:

(a) `peftchat train` of a 4-bit NF4 QLoRA adapter on a random-init Llama of the 1b shape
    (Llama-3.2-1B sizes, saved locally), ~30 steps of the shipped demo recipe on CUDA; peak memory
    and tokens/s from its training_summary.json;
(b) `peftchat merge --verify` of that adapter; its parity figures (max |logit diff|).

    python -m benchmarks.gpu_checks --out OUT_DIR [--steps 30]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEFTCHAT = [sys.executable, "-c", "import sys; from peftchat.cli import main; sys.exit(main())"]


def run(cmd: list[str], log: Path, timeout: float) -> int:
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd[3:] if cmd[:3] == PEFTCHAT else cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
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
    overrides = [f"model.path={model}", f"model.tokenizer={demo_tokenizer_dir()}", "model.dtype=bf16",
                 "model.compute_dtype=bf16", f"training.device={args.device}", f"training.max_steps={args.steps}",
                 f"training.output_dir={adapter}", "training.lr=2e-4", "training.save_steps=0",
                 "training.log_steps=5", "training.gradient_checkpointing=true", "training.tensorboard=false"]
    if adapter.exists():  # the loop refuses to train over a finished run
        import shutil

        shutil.rmtree(adapter)
    train_cmd = PEFTCHAT + ["train", "recipes/demo_qlora.yaml", *overrides]
    rc_train = run(train_cmd, out / "train.log", 600)
    summary = json.loads((adapter / "training_summary.json").read_text()) if rc_train == 0 else {}
    merge_cmd = PEFTCHAT + ["merge", "--adapter", str(adapter), "--out", str(merged), "--verify", "--force"]
    rc_merge = run(merge_cmd, out / "merge.log", 600) if rc_train == 0 else None
    verify = re.findall(r"verify: .*", (out / "merge.log").read_text()) if rc_merge is not None else []
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
              "train_rc": rc_train, "merge_rc": rc_merge, "summary": summary, "verify": verify,
              "train_command": "peftchat train recipes/demo_qlora.yaml " + " ".join(overrides),
              "merge_command": f"peftchat merge --adapter {adapter} --out {merged} --verify --force"}
    (out / "gpu_checks.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("train_rc", "merge_rc", "verify")}))
    print(json.dumps({k: summary.get(k) for k in ("steps", "tokens_per_s", "peak_memory_gb", "memory_kind",
                                                   "first_loss", "final_loss", "eval_loss")}))
    return 0 if rc_train == 0 and rc_merge == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

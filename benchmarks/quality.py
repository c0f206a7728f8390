"""FP8 (`training.fp8`) against bf16 training quality through the real recipe path, and the
runs of several reports pooled by kind.

`run`: `peftchat.train.loop` via benchmarks.peftchat_variants, same initialisation and data, one
process per run, `--runs` (default "bf16,fp8": `training.fp8` off, then on; "peft" trains peft's
own LoRA layers in bf16, whose distance from "bf16" is the rounding noise floor; "fp8+fp8rec" adds
a run's own options): final train loss (mean of the last 3 logged rows, 10 steps each) and
held-out eval loss, each against the first run's. The loop evaluates in eval mode, where LoRA
layers run peft's own bf16 forward, so the fp8 run's eval loss *is* the fp8-trained adapter in the
bf16 inference path. `--shapes 1b:300,8b:100` (shape:steps). Writes `quality.json` after each run.

`pool`: each kind's mean final train and eval loss, its run-to-run spread, and its mean against
the reference kind's. Why pooled: six bf16 runs of the 1B shape from the same initialisation and
data, 300 steps each, ended 4.0 % apart in final train loss (0.603 to 0.628: GPU kernels sum in a
different order from run to run, and training carries the difference on); one bf16 run against
one FP8 run measures that spread as much as FP8. A run's kind is its label up to any '#'
(`--repeats` names the repeats "fp8#2", ...).

    python3 -m benchmarks quality run --out $OUT/q --shapes 1b:300 --runs bf16,fp8 --repeats 3 --parallel 3
    python -m benchmarks quality run --out /tmp/q --work-dir /tmp/q/work --shapes tiny:4 --device cpu \
        --runs peft,fused --batch 2 --seq 128      # CPU smoke of the quality path
    python -m benchmarks quality pool benchmarks/results/checks/quality_r10/*.json --out /tmp/stats.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

# The quality runs' bases: their recipe overrides. A run is a base with optional `+options` of
# benchmarks/peftchat_variants.py on top of `--setting`'s (e.g. "fp8+fp8rec"); the base's
# overrides come last, so "bf16" trains without FP8 whatever an option says.
QUALITY_BASES = {
    "bf16": {"training.fp8": False},
    "fp8": {"training.fp8": True},
    "peft": {"training.fp8": False, "training.fused_lora": False},  # peft's own LoRA layers: the noise floor
    "fused": {"training.fp8": False, "training.fused_lora": True},
}


def quality_run(recipe_spec: dict[str, Any], setting: str, run: str, files: tuple[Path, Path]) -> dict[str, Any]:
    """One training run through the recipe path (`run`'s base overrides and options on top of
    `recipe_spec`'s); its losses and the final held-out eval loss."""
    from benchmarks import peftchat_variants
    from peftchat.train import loop

    base, _, options = run.partition("+")
    recipe_spec = peftchat_variants.apply_options(recipe_spec, options)
    train_file, eval_file = files
    out_dir = Path(recipe_spec["work_dir"]) / "run"
    shutil.rmtree(out_dir, ignore_errors=True)  # a rerun starts fresh (the loop refuses a used run dir)
    spec = {
        **recipe_spec,
        "overrides": {
            "data.eval": str(eval_file),
            "data.packing": True,
            "training.eval_steps": 0,
            "training.log_steps": 10,
            **recipe_spec.get("overrides", {}),
            **QUALITY_BASES[base],
        },
    }
    recipe = peftchat_variants.build_recipe(spec, setting, train_file, out_dir)
    applied: list[str] = []
    t0 = time.perf_counter()
    loop.train(
        recipe,
        hooks=loop.TrainHooks(
            speedups_applied=applied.extend, kernel_options=peftchat_variants.kernel_variant(recipe_spec)
        ),
    )
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {
        "applied": applied,
        "wall_s": round(time.perf_counter() - t0, 1),
        "losses_logged": losses,
        "final_train_loss": statistics.fmean(losses[-3:]),
        "eval_loss_bf16_path": evals[-1] if evals else None,
    }


def run_quality_jobs(jobs: dict[str, tuple], parallel: int, on_done: Callable[[str, dict[str, Any]], None]) -> None:
    """`quality_run(*args)` for each labelled job; with `parallel` > 1 each in a fresh process (its
    own CUDA context and allocator), `parallel` at a time on one GPU (a 1B run uses about 2 GiB
    and leaves the H200 partly idle: two at once took 123-155 s each against 118 s alone, three
    at once 152-170 s)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    if parallel == 1:  # one at a time: in this process (kernel choices are arguments, nothing leaks)
        for label, job in jobs.items():
            on_done(label, quality_run(*job))
        return
    with ThreadPoolExecutor(max_workers=parallel) as threads:  # each thread waits on its run's process
        futures = {threads.submit(_in_fresh_process, quality_run, job): label for label, job in jobs.items()}
        for future in as_completed(futures):
            on_done(futures[future], future.result())


def _in_fresh_process(fn: Callable[..., Any], args: tuple) -> Any:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def rel_diff(a: float | None, ref: float | None) -> float | None:
    return abs(a - ref) / ref if a is not None and ref else None


def quality_runs(
    shape: str, steps: int, args: argparse.Namespace, results: dict[str, Any], after_run: Callable[[], None]
) -> None:
    """`--runs` (each `--repeats` times) through the recipe path, same seed, data and
    held-out sessions, into `results` (`after_run` saves it after each run): each run's final train
    and eval loss against the first run's, and with repeats each kind's statistics."""
    from benchmarks import peftchat_variants
    from benchmarks.chat_sessions import write_sessions
    from benchmarks.shapes import bench_model
    from peftchat.model.tokenizer import load_tokenizer

    model_dir = bench_model(shape, args.model_root, args.device)
    work = Path(args.work_dir) / f"quality_{shape}"  # runs and adapters stay out of --out (only the JSON comes back)
    work.mkdir(parents=True, exist_ok=True)
    setting, _, options = args.setting.partition("+")  # e.g. lean+skip4: options every run shares
    spec = {
        "shape": shape,
        "mode": "nf4",
        "model_dir": str(model_dir),
        "device": args.device,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": 0,
        "steps": steps,
        "dropout": args.dropout,
    }
    files = (work / "train.jsonl", work / "eval.jsonl")
    tokenizer = load_tokenizer(
        peftchat_variants.build_recipe({**spec, "work_dir": str(work)}, setting, files[0], work / "tmp")
    )
    write_sessions(files[0], tokenizer, n=args.batch * steps * 2, seed=1234)
    write_sessions(files[1], tokenizer, n=args.eval_sessions, seed=4321)  # other sessions: held out
    kinds = args.runs.split(",")
    labels = [kind if i == 0 else f"{kind}#{i + 1}" for i in range(args.repeats) for kind in kinds]
    results.update(
        {
            "shape": shape,
            "steps": steps,
            "setting": args.setting,
            "runs": labels,
            "reference": labels[0],
            "dropout": args.dropout,
        }
    )
    jobs = {}
    for label in labels:
        base, _, kind_options = kind_of(label).partition("+")
        run = f"{base}+{'+'.join(filter(None, (options, kind_options)))}"
        jobs[label] = ({**spec, "work_dir": str(work / label.replace("+", "_").replace("#", "_"))}, setting, run, files)

    def done(label: str, result: dict[str, Any]) -> None:
        results[label] = result
        print(json.dumps({"run": label, **{k: v for k, v in result.items() if k != "losses_logged"}}), flush=True)
        after_run()

    run_quality_jobs(jobs, args.parallel, done)
    ref = results[labels[0]]
    for label in labels:
        results[label]["train_loss_rel_diff"] = rel_diff(results[label]["final_train_loss"], ref["final_train_loss"])
        results[label]["eval_loss_rel_diff"] = rel_diff(
            results[label]["eval_loss_bf16_path"], ref["eval_loss_bf16_path"]
        )
    if args.repeats > 1:
        results["summary"] = summarize(runs_by_kind(results), kinds[0])
    after_run()


def kind_of(label: str) -> str:
    return label.partition("#")[0]


def runs_by_kind(entry: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{kind: [run results]} of one quality entry, in its run order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for label in entry.get("runs", []):
        if label in entry:  # a run cut short by a timeout has no entry
            out.setdefault(kind_of(label), []).append(entry[label])
    return out


def pooled_runs(reports: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{"SHAPE:STEPS:SETTING@dropout D": {kind: [run results]}} over reports' quality entries."""
    pooled: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for report in reports:
        for entry in report.get("quality", []):
            key = f"{entry['shape']}:{entry['steps']}:{entry['setting']}@dropout {entry.get('dropout')}"
            for kind, runs in runs_by_kind(entry).items():
                pooled.setdefault(key, {}).setdefault(kind, []).extend(runs)
    return pooled


def _describe(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {
        "mean": mean,
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "spread_rel": (max(values) - min(values)) / mean,
    }


def _mean_diff(stats: dict[str, float], n: int, ref: dict[str, float], ref_n: int) -> dict[str, float | None]:
    """Signed relative distance of the means and its standard error (Welch's, both relative to the
    reference mean; None unless both kinds have 2+ runs): how far apart, and how sure."""
    se = (stats["stdev"] ** 2 / n + ref["stdev"] ** 2 / ref_n) ** 0.5 / ref["mean"] if n > 1 and ref_n > 1 else None
    return {"rel_diff": stats["mean"] / ref["mean"] - 1, "rel_diff_se": se}


def summarize(runs_by_kind: dict[str, list[dict[str, Any]]], reference: str) -> dict[str, Any]:
    """Per kind: n, train and eval loss statistics, and its means' signed relative distance from
    the reference kind's means, with its standard error."""
    out: dict[str, Any] = {}
    for kind, runs in runs_by_kind.items():
        train = [r["final_train_loss"] for r in runs]
        evals = [r["eval_loss_bf16_path"] for r in runs if r.get("eval_loss_bf16_path") is not None]
        out[kind] = {"n": len(runs), "train_loss": _describe(train), "eval_loss": _describe(evals) if evals else None}
    ref = out.get(reference)
    for stats in out.values():
        if ref is None:
            break
        diff = _mean_diff(stats["train_loss"], stats["n"], ref["train_loss"], ref["n"])
        stats["train_mean_rel_diff"], stats["train_mean_rel_diff_se"] = diff["rel_diff"], diff["rel_diff_se"]
        if stats["eval_loss"] and ref["eval_loss"]:  # eval runs count as the train runs do (one per run)
            diff = _mean_diff(stats["eval_loss"], stats["n"], ref["eval_loss"], ref["n"])
            stats["eval_mean_rel_diff"], stats["eval_mean_rel_diff_se"] = diff["rel_diff"], diff["rel_diff_se"]
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the runs, write quality.json")
    r.add_argument("--out", required=True)
    r.add_argument("--shapes", default="1b:300,8b:100", help="shape:steps,...")
    r.add_argument(
        "--setting", default="lean", help="peftchat setting of benchmarks/peftchat_variants.py, with its +options"
    )
    r.add_argument(
        "--runs", default="bf16,fp8", help=f"comma list of {'|'.join(QUALITY_BASES)}[+options], the first the reference"
    )
    r.add_argument("--repeats", type=int, default=1, help="train each run this many times (labels KIND#2, ...)")
    r.add_argument("--parallel", type=int, default=1, help="runs at once on the one device")
    r.add_argument("--device", default="cuda", help="cpu: a smoke run of the tiny shape")
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--dropout", type=float, default=0.05)
    r.add_argument("--eval-sessions", type=int, default=64, help="held-out sessions of the eval loss")
    r.add_argument("--model-root", default="/tmp/quality_models")
    r.add_argument("--work-dir", default="/tmp/quality_work", help="data, run dirs, adapters")
    q = sub.add_parser("pool", help="pool the runs of several quality.json (or older check_fp8.json) by kind")
    q.add_argument("reports", nargs="+")
    q.add_argument("--reference", default="bf16", help="the kind the others are measured against")
    q.add_argument("--out", default="", help="also write the summary (JSON) here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "pool":
        reports = [json.loads(Path(f).read_text()) for f in args.reports]
        summary = {key: summarize(kinds, args.reference) for key, kinds in pooled_runs(reports).items()}
        text = json.dumps({"reports": args.reports, "reference": args.reference, "summary": summary}, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"torch": torch.__version__, "quality": []}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()

    def save() -> None:
        (out / "quality.json").write_text(json.dumps(report, indent=1))

    for item in args.shapes.split(","):
        shape, steps = item.split(":")
        report["quality"].append({})
        quality_runs(shape, int(steps), args, report["quality"][-1], save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side LoRA/QLoRA training benchmark: peftchat vs hand-written transformers+peft+bitsandbytes.

Each job (model build, matmul ceiling, one training variant, one long-sequence trial) runs in its
own process (``benchmarks.worker``); this orchestrator plans the jobs, enforces a time budget,
and writes ``results.json`` and ``results.md`` to --out after every job, so a run cut short still
leaves what it measured.

    python -m benchmarks bench --shapes 1b,8b --modes nf4,int8,bf16 --out benchmarks/results
    python -m benchmarks bench --smoke          # CPU, tiny shapes, every path, no speed asserts

Variants are named KIND:NAME[@dropoutX]: ``peer:tutorial|tuned|tuned_liger|tuned_liger_nockpt``
(plain libraries, benchmarks/peer_variants.py), ``peer:unsloth`` (unsloth's documented QLoRA path,
benchmarks/unsloth_variant.py; dropout 0 unless named), ``peftchat:fast|lean|ref`` (peftchat's
recipe path, benchmarks/peftchat_variants.py). ``@dropoutX`` sets the LoRA dropout (default 0.05).

Scenarios (``--scenarios``): ``dense`` (every row full, seq tokens) and ``chat`` (the seeded
long-tailed sessions of benchmarks/chat_sessions.py; tokens/s counts real, non-pad tokens).

Loss gate: every peftchat row gets ``loss_max_rel_diff``, the largest relative difference of its
per-step losses from those of the ``peftchat:ref`` row (eager bf16: no compile, no fused kernels,
no offload) of the same shape, mode, scenario, packing and dropout in the same run; a row over
``LOSS_GATE`` is marked ``gated_out`` and is no result.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import real_data  # noqa: E402
from benchmarks.shapes import flops_per_token, shape_dict  # noqa: E402
from benchmarks.worker import RESULT_TAG, VARIANT_KINDS  # noqa: E402

DEFAULT_VARIANTS = {
    "nf4": ["peer:tutorial", "peer:tuned", "peer:tuned_liger", "peftchat:fast", "peftchat:lean"],
    "int8": ["peer:tutorial", "peer:tuned", "peftchat:fast", "peftchat:lean"],
    "bf16": ["peer:tutorial", "peer:tuned", "peftchat:fast", "peftchat:lean"],
}
REFERENCE = "peer:tuned"
LOSS_GATE = 0.01  # largest relative per-step loss difference from the eager reference
DEFAULT_DROPOUT = {"peer:unsloth": 0.0, "peer:unsloth_sft": 0.0}  # a variant's dropout when it names none; else 0.05


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger_kernel", "triton", "accelerate"):
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


class Runner:
    """Runs jobs (isolated or in-process) under a wall-clock budget and records every result."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "bench_log.txt", "a", encoding="utf-8")
        self.doc: dict[str, Any] = {
            "meta": {
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", "bench", *sys.argv[1:]]),
                "versions": versions(),
                "batch": args.batch,
                "seq": args.seq,
                "warmup": args.warmup,
                "steps": args.steps,
                "device": args.device,
            },
            "builds": {},
            "rows": [],
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def job(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        timeout = min(timeout, self.left() - 5)
        if timeout < 15:
            return {"skipped": "time budget spent"}
        t0 = time.monotonic()
        if not self.args.isolate:
            import contextlib
            import io

            from benchmarks import worker

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                worker.main([json.dumps(spec)])
            text = buf.getvalue()
        else:
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
                text = proc.stdout + "\n" + proc.stderr
            except subprocess.TimeoutExpired as e:
                text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                text += f"\n[timed out after {timeout:.0f} s]"
        self.log.write(f"\n===== {json.dumps(spec)} ({time.monotonic() - t0:.1f} s)\n{text[-20000:]}\n")
        self.log.flush()
        for line in reversed(text.splitlines()):
            if line.startswith(RESULT_TAG):
                res = json.loads(line[len(RESULT_TAG) :])
                break
        else:
            tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
            res = {"error": "no result: " + tail[0][:300]}
        res["wall_s"] = round(time.monotonic() - t0, 1)
        return res

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.doc, indent=1), encoding="utf-8")
        (self.out / "results.md").write_text(markdown(self.doc), encoding="utf-8")


def model_dir(args: argparse.Namespace, shape: str) -> str:
    return str(Path(args.models_dir) / shape)


def enrich(row: dict[str, Any], doc: dict[str, Any]) -> None:
    """Add tokens/s, model TFLOP/s and the share of the measured matmul ceiling to a row."""
    if row.get("step_s_median"):
        if row.get("tokens_per_s") is None:
            row["tokens_per_s"] = row["batch"] * row["seq"] / row["step_s_median"]
        if row.get("scenario", "dense") != "dense":  # rows of varying length: no single FLOPs-per-token figure
            return
        cfg = shape_dict(row["shape"], row.get("vocab_size"))
        row["model_tflops"] = flops_per_token(cfg, row["seq"]) * row["tokens_per_s"] / 1e12
        ceiling = doc["meta"].get("ceiling_tflops")
        if ceiling:
            row["pct_ceiling"] = 100 * row["model_tflops"] / ceiling


def variant_parts(variant: str) -> tuple[str, set[str], float]:
    """(`kind:setting`, options, dropout) of `kind:setting+opt+...@dropoutX`."""
    base, _, suffix = variant.partition("@")
    head, *opts = base.split("+")
    dropout = float(suffix[len("dropout") :]) if suffix.startswith("dropout") else DEFAULT_DROPOUT.get(head, 0.05)
    return head, set(opts), dropout


def _same_setup(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("shape", "mode", "seq", "batch", "scenario"))


def ratios(doc: dict[str, Any]) -> None:
    """Speed and peak against the tuned peer and against unsloth at the row's own dropout (same run)."""
    for row in doc["rows"]:
        _, _, dropout = variant_parts(row["variant"])
        for tag, pick in (
            (
                "tuned",
                lambda r, d=dropout: (
                    variant_parts(r["variant"])[0] == REFERENCE and variant_parts(r["variant"])[2] == d
                ),
            ),
            (
                "unsloth",
                lambda r, d=dropout: (
                    variant_parts(r["variant"])[0] in ("peer:unsloth", "peer:unsloth_sft")
                    and variant_parts(r["variant"])[2] == d
                ),
            ),
        ):
            # unsloth: its fastest row of this setup (plain loop or, on chat data, SFTTrainer packing)
            ref = max(
                (r for r in doc["rows"] if _same_setup(r, row) and pick(r)),
                key=lambda r: r.get("tokens_per_s") or 0,
                default=None,
            )
            if ref and ref.get("tokens_per_s") and row.get("tokens_per_s"):
                row[f"speed_vs_{tag}"] = row["tokens_per_s"] / ref["tokens_per_s"]
                if ref.get("peak_alloc_gib") and row.get("peak_alloc_gib"):
                    row[f"peak_vs_{tag}"] = row["peak_alloc_gib"] / ref["peak_alloc_gib"]


def loss_gate(doc: dict[str, Any]) -> None:
    """`loss_max_rel_diff` of every peftchat row against its eager `peftchat:ref` row (see module doc)."""
    for row in doc["rows"]:
        head, opts, dropout = variant_parts(row["variant"])
        if not head.startswith("peftchat:") or not row.get("losses"):
            continue
        ref = next(
            (
                r
                for r in doc["rows"]
                if _same_setup(r, row)
                and r.get("losses")
                and variant_parts(r["variant"])[0] == "peftchat:ref"
                and ("packing" in variant_parts(r["variant"])[1]) == ("packing" in opts)
                and variant_parts(r["variant"])[2] == dropout
            ),
            None,
        )
        if ref is None:
            continue
        pairs = list(zip(row["losses"], ref["losses"]))
        row["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in pairs) if pairs else None
        row["loss_ref"] = ref["variant"]
        row["gated_out"] = bool(row["loss_max_rel_diff"] is not None and row["loss_max_rel_diff"] > LOSS_GATE)


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"Date: {meta['date']}  ",
        f"Command: `{meta['command']}`  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
        f"GPU: {meta.get('gpu', '-')}; bf16 8192^3 matmul ceiling: {_fmt(meta.get('ceiling_tflops'))} TFLOP/s  ",
        f"Batch {meta['batch']} x seq {meta['seq']}, {meta['warmup']} warm-up + {meta['steps']} timed steps "
        "(median step time).",
        "",
        "Rows marked *gated out* missed the loss gate (loss differs from the eager reference by > 1 %): "
        "shown, not results. Chat rows count real (non-pad) tokens.",
        "",
        "| shape | mode | scenario | variant | tok/s | label tok/s | step s | peak alloc GiB | peak reserved GiB "
        "| model TFLOP/s | % ceiling | speed / peak vs tuned | speed / peak vs unsloth | loss max rel diff | notes |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for r in doc["rows"]:
        note = r.get("error") or r.get("skipped") or ", ".join(r.get("applied") or [])
        if r.get("gated_out"):
            note = "*gated out* " + note
        lines.append(
            "| "
            + " | ".join(
                [
                    r["shape"],
                    r["mode"],
                    r.get("scenario", "dense"),
                    r["variant"],
                    _fmt(r.get("tokens_per_s"), 0),
                    _fmt(r.get("label_tokens_per_s"), 0),
                    _fmt(r.get("step_s_median"), 3),
                    _fmt(r.get("peak_alloc_gib")),
                    _fmt(r.get("peak_reserved_gib")),
                    _fmt(r.get("model_tflops"), 0),
                    _fmt(r.get("pct_ceiling")),
                    f"{_fmt(r.get('speed_vs_tuned'), 2)} / {_fmt(r.get('peak_vs_tuned'), 2)}",
                    f"{_fmt(r.get('speed_vs_unsloth'), 2)} / {_fmt(r.get('peak_vs_unsloth'), 2)}",
                    _fmt(r.get("loss_max_rel_diff"), 4),
                    str(note).replace("|", "/")[:160],
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def parse_plan(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(scenario, shape, mode, variant) jobs: `--plan` items are `shape/mode/variant` or
    `scenario/shape/mode/variant`; otherwise every scenario x shape x mode x variant."""
    if args.plan:
        out = []
        for item in filter(None, args.plan.split(",")):
            parts = item.split("/")
            job = tuple(parts) if len(parts) == 4 else ("dense", *parts)
            # checked before any job runs: round 10's "dense/8b/nf4/ref" (for peftchat:ref) failed only
            # once its turn came, and the run had no loss gate
            kind, colon, _ = job[-1].partition(":")
            if len(job) != 4 or not colon or kind not in VARIANT_KINDS:
                raise ValueError(
                    f"--plan item {item!r}: expected [scenario/]shape/mode/KIND:VARIANT, "
                    f"KIND one of {', '.join(VARIANT_KINDS)}"
                )
            out.append(job)
        return out  # type: ignore[return-value]
    plan = []
    for scenario in args.scenarios.split(","):
        for shape in args.shapes.split(","):
            for mode in args.modes.split(","):
                variants = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[mode]
                plan += [(scenario, shape, mode, v) for v in variants]
    return plan


def train_spec(
    args: argparse.Namespace,
    shape: str,
    mode: str,
    variant: str,
    batch: int,
    seq: int,
    warmup: int,
    steps: int,
    scenario: str = "dense",
) -> dict[str, Any]:
    safe = variant.replace(":", "_").replace("+", "_").replace("@", "_")
    spec = {
        "job": "train",
        "shape": shape,
        "mode": mode,
        "variant": variant,
        "batch": batch,
        "seq": seq,
        "warmup": warmup,
        "steps": steps,
        "device": args.device,
        "model_dir": model_dir(args, shape),
        "vocab_size": shape_dict(shape, args.vocab_size).get("vocab_size"),
        "scenario": scenario,
        "work_dir": str(Path(args.work_dir) / f"{scenario}_{shape}_{mode}_{safe}_{seq}"),
    }
    if scenario == "chat":
        spec["sessions_file"] = str(sessions_file(args))
    elif scenario in real_data.SCENARIOS:
        spec.update(real_data.scenario_data(scenario, args.real_data))
    elif scenario != "dense":
        raise ValueError(f"unknown scenario {scenario!r} (dense, chat, {', '.join(real_data.SCENARIOS)})")
    return spec


def sessions_file(args: argparse.Namespace) -> Path:
    """The chat scenario's sessions, written once per run (same seed: same file for every variant)."""
    path = Path(args.work_dir) / "chat_sessions.jsonl"
    if not path.is_file():
        from transformers import AutoTokenizer

        from benchmarks.chat_sessions import write_sessions
        from peftchat.demo_assets import demo_tokenizer_dir

        path.parent.mkdir(parents=True, exist_ok=True)
        write_sessions(path, AutoTokenizer.from_pretrained(str(demo_tokenizer_dir())), n=args.chat_sessions)
    return path


def ensure_model(runner: Runner, shape: str) -> bool:
    args = runner.args
    if shape in runner.doc["builds"]:
        return "error" not in runner.doc["builds"][shape]
    res = runner.job(
        {
            "job": "build",
            "shape": shape,
            "model_dir": model_dir(args, shape),
            "device": args.device,
            "vocab_size": args.vocab_size,
        },
        args.build_timeout,
    )
    runner.doc["builds"][shape] = res
    runner.save()
    return "error" not in res and "skipped" not in res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, every variant path, 2 steps")
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--modes", default="nf4,int8,bf16")
    p.add_argument("--variants", default="", help="comma list of KIND:NAME applied to every mode")
    p.add_argument("--scenarios", default="dense", help="comma list of dense, chat, real-moss, real-sharegpt")
    p.add_argument("--real-data", default="", help="the real-data command's --out (real-moss, real-sharegpt)")
    p.add_argument(
        "--plan", default="", help="explicit comma list of [scenario/]shape/mode/variant (overrides the above)"
    )
    p.add_argument("--chat-sessions", type=int, default=600, help="sessions written for the chat scenario")
    p.add_argument("--run-label", default="", help="the `run` field of every row (default: the date)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab-size", type=int, default=None, help="override the shapes' vocabulary")
    p.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "peftchat_bench_models"))
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "peftchat_bench_work"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock budget for the whole run")
    p.add_argument("--job-timeout", type=float, default=300.0)
    p.add_argument("--build-timeout", type=float, default=300.0)
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one process per job (default: on, off for --smoke)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        smoke_defaults(args)
    if args.isolate is None:
        args.isolate = True
    args.run_label = args.run_label or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    try:
        plan = parse_plan(args)
    except ValueError as e:
        p.error(str(e))
    runner = Runner(args)
    if args.device.startswith("cuda") and not args.no_ceiling:
        res = runner.job({"job": "ceiling", "device": args.device}, 120)
        runner.doc["meta"].update({k: v for k, v in res.items() if k != "wall_s"})
        runner.save()
    for scenario, shape, mode, variant in plan:
        if not ensure_model(runner, shape):
            continue
        spec = train_spec(args, shape, mode, variant, args.batch, args.seq, args.warmup, args.steps, scenario)
        res = runner.job(spec, args.job_timeout)
        row = {k: spec[k] for k in ("shape", "mode", "scenario", "variant", "batch", "seq")}
        row["run"] = args.run_label
        row.update(res)
        if args.vocab_size:
            row["vocab_size"] = args.vocab_size
        enrich(row, runner.doc)
        runner.doc["rows"].append(row)
        ratios(runner.doc)
        loss_gate(runner.doc)
        runner.save()
        print(
            f"{scenario}/{shape}/{mode}/{variant}: "
            + json.dumps(
                {
                    k: row.get(k)
                    for k in ("tokens_per_s", "peak_alloc_gib", "loss_max_rel_diff", "error", "skipped", "wall_s")
                }
            ),
            flush=True,
        )
    runner.save()
    print(markdown(runner.doc))
    return 0


def smoke_defaults(args: argparse.Namespace) -> None:
    """Tiny CPU run of every variant path: shapes hidden 64 / 2 layers, seq 64, 2 steps."""
    from transformers import AutoTokenizer

    from peftchat.demo_assets import demo_tokenizer_dir

    args.device = "cpu"
    args.shapes = "tiny"
    args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 1
    args.chat_sessions = 48
    args.no_ceiling = True
    if args.vocab_size is None:  # the shipped tokenizer's ids must fit the model for peftchat's data path
        args.vocab_size = max(512, len(AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))))
    if not args.variants and not args.plan:
        # each mode through the peer and peftchat's loop; the other paths once, on nf4
        plan = [f"dense/tiny/{m}/{v}" for m in ("nf4", "int8", "bf16") for v in ("peer:tuned", "peftchat:lean")]
        # the tutorial peer, fast, the loss gate's reference, the named-dropout path, unsloth (skipped on CPU), the chat scenario
        plan += [
            "dense/tiny/nf4/peer:tutorial",
            "dense/tiny/nf4/peftchat:fast+nocompile",
            "dense/tiny/nf4/peftchat:ref",
            "dense/tiny/nf4/peer:unsloth@dropout0.05",
            "dense/tiny/nf4/peftchat:lean+mem64",
            "chat/tiny/nf4/peer:tuned",
            "chat/tiny/nf4/peer:unsloth",
            "chat/tiny/nf4/peer:unsloth_sft",
            "chat/tiny/nf4/peftchat:ref+packing",
            "chat/tiny/nf4/peftchat:lean+packing",
        ]
        args.plan = ",".join(plan)
    if args.isolate is None:
        args.isolate = False
    if args.out == str(REPO / "benchmarks" / "results"):
        args.out = os.path.join(tempfile.mkdtemp(prefix="peftchat_bench_smoke_"), "out")
    args.models_dir = os.path.join(args.out, "models")
    args.work_dir = os.path.join(args.out, "work")


if __name__ == "__main__":
    sys.exit(main())

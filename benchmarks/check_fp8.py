"""FP8 frozen base matmuls (`training.fp8`) and the fused LoRA function on the GPU: per-kernel
timings, numerics against peft, the memory of an FP8 weight cache, and a training-quality check.

Sections (`--sections`, comma-separated):

  kernels  the 8B Llama linear shapes (in x out: 4096x4096 q/o, 4096x1024 k/v, 4096x14336 gate/up,
           14336x4096 down) at M = `--tokens` rows: bf16 matmul, NF4 dequant, bf16 -> e4m3
           quantization of x and W (eager and compiled), `_scaled_mm` rowwise (forward and input
           gradient), and the whole LoRA layer forward + backward (r 16, NF4 base) through peft,
           the fused function in bf16 and the fused function in FP8; which fp8 dtypes rowwise
           `_scaled_mm` accepts for the gradient, and whether M need be a multiple of 16.
  numerics the same layers: relative error of peft's bf16 path, the fused bf16 and the fused FP8
           path against an fp32 computation from the same NF4 codes (output and input gradient).
  memory   bytes of the frozen linears of the 1B and 8B shapes stored NF4 vs an FP8 copy per layer
           (one orientation for forward, a second per-input-channel copy for the input gradient).
  quality  the real recipe path (peftchat.train.loop via benchmarks.peftchat_variants), same
           initialisation and data, one process per run, `--quality-runs` (default "bf16,fp8":
           `training.fp8` off, then on; "peft" trains peft's own LoRA layers in bf16, whose
           distance from "bf16" is the rounding noise floor; "fp8+fp8rec" adds a run's own
           options): final train loss (mean of the last 3 logged rows, 10 steps each) and held-out
           eval loss, each against the first run's. The loop evaluates in eval mode, where LoRA layers
           run peft's own bf16 forward, so the fp8 run's eval loss *is* the fp8-trained adapter in
           the bf16 inference path. `--quality-shapes 1b:300,8b:100` (shape:steps).

    python3 -m benchmarks.check_fp8 --out $OUT/fp8 --sections kernels,numerics,memory
    python3 -m benchmarks.check_fp8 --out $OUT/fp8q --sections quality --quality-shapes 1b:300 --model-root /tmp/models
    python -m benchmarks.check_fp8 --out /tmp/q --work-dir /tmp/q/work --sections quality --quality-shapes tiny:4 --device cpu \
        --quality-runs peft,fused --batch 2 --seq 128      # CPU smoke of the quality path

Writes `check_fp8.json` under --out after every section (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

SHAPES_8B = {"q_o": (4096, 4096), "k_v": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
RANK = 16
GIB = 1024 ** 3


def cuda_time(fn: Callable[[], Any], warmup: int = 3, iters: int = 15) -> float:
    """Median seconds of `fn` over `iters` CUDA-event-timed calls (wall clock without CUDA: smoke runs)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def nf4_lora_layer(k: int, n: int, dropout: float, device: str, seed: int = 0):
    """A peft LoRA Linear (r 16, random non-zero B, fp32 adapter as peftchat keeps it) over an NF4
    bitsandbytes base of shape k -> n, on `device`."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora import bnb as lora_bnb

    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                             compress_statistics=True)
    base.load_state_dict(dense.state_dict())
    base = base.to(device)
    kw = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, init_lora_weights=False)
    layer = lora_bnb.Linear4bit(base, "default", config=LoraConfig(**kw), **kw).to(device)
    return layer.train()


def _fwd_bwd(layer, x, g) -> Callable[[], None]:
    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = layer(x)
        y.backward(g)
    return run


def kernel_rows(name: str, k: int, n: int, m: int, device: str) -> dict[str, Any]:
    """Timings (ms) of the pieces and the whole LoRA layer for one k -> n linear at m rows."""
    import bitsandbytes.functional as bf

    from peftchat.model import fp8
    from peftchat.kernels.fp8 import Fp8Passes
    from peftchat.kernels.frozen_linear import fuse_lora_layers, unfuse_lora_layers

    layer = nf4_lora_layer(k, n, 0.0, device)
    w_nf4 = layer.get_base_layer().weight
    w = bf.dequantize_4bit(w_nf4.data, w_nf4.quant_state).to(torch.bfloat16)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    g = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    quantize = torch.compile(fp8.quantize)
    xq, xs = fp8.quantize(x, 1)
    wq, ws = fp8.quantize(w, 1)
    gq, gs = fp8.quantize(g, 1)
    wq_in, ws_in = fp8.quantize(w, 0)
    wq_in_col = wq_in.t().contiguous().t()
    bf16 = torch.bfloat16
    ms = lambda fn: round(cuda_time(fn) * 1e3, 4)  # noqa: E731
    row: dict[str, Any] = {"linear": name, "k": k, "n": n, "m": m, "ms": {
        "bf16_matmul_fwd": ms(lambda: x @ w.t()),
        "bf16_matmul_grad_input": ms(lambda: g @ w),
        "nf4_dequant": ms(lambda: bf.dequantize_4bit(w_nf4.data, w_nf4.quant_state)),
        "quantize_x_eager": ms(lambda: fp8.quantize(x, 1)),
        "quantize_x_compiled": ms(lambda: quantize(x, 1)),
        "quantize_w_out_channel_compiled": ms(lambda: quantize(w, 1)),
        "quantize_grad_compiled": ms(lambda: quantize(g, 1)),
        "transpose_fp8_w_eager": ms(lambda: wq_in.t().contiguous()),
        "scaled_mm_fwd": ms(lambda: fp8.scaled_matmul(xq, xs, wq.t(), ws.t())),
        "scaled_mm_grad_input": ms(lambda: fp8.scaled_matmul(gq, gs, wq_in_col, ws_in)),
        "fp8_linear_with_quant": ms(lambda: fp8.fp8_linear(x, w, bf16)),
        "fp8_grad_input_with_quant": ms(lambda: fp8.fp8_grad_input(g, w, fp8.E4M3, bf16)),
        "fp8_grad_input_with_quant_e5m2": ms(lambda: fp8.fp8_grad_input(g, w, fp8.E5M2, bf16)),
    }}
    row["ms"].update(triton_pass_times(w_nf4, x, g, ms))
    row["kernel_mismatch"] = triton_pass_mismatch(w_nf4, x, g)
    xr = x.view(1, m, k).detach().requires_grad_(True)
    for dropout in (0.0, 0.05):
        layer.lora_dropout["default"] = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        row["ms"][f"layer_peft_d{dropout}"] = ms(_fwd_bwd(layer, xr, g.view(1, m, n)))
        fuse_lora_layers(layer)
        row["ms"][f"layer_fused_bf16_d{dropout}"] = ms(_fwd_bwd(layer, xr, g.view(1, m, n)))
        unfuse_lora_layers(layer)
        for label, passes in (("fp8", None), ("fp8all", Fp8Passes(forward=True))):  # recipe's passes; all three
            fuse_lora_layers(layer, fp8=True, passes=passes)
            row["ms"][f"layer_fused_{label}_d{dropout}"] = ms(_fwd_bwd(layer, xr, g.view(1, m, n)))
            unfuse_lora_layers(layer)
    flops = 2.0 * m * k * n
    row["tflops"] = {key: round(flops / (v / 1e3) / 1e12, 1) for key, v in row["ms"].items()
                     if key.startswith(("bf16_matmul", "scaled_mm"))}
    return row


def triton_pass_times(w_nf4, x: torch.Tensor, g: torch.Tensor, ms: Callable) -> dict[str, float]:
    """ms of the Triton passes (round 7) and of the FP8 base matmuls built on them, against the
    bf16 path's dequant + matmul, for one NF4 weight."""
    import bitsandbytes.functional as bf

    from peftchat.model import fp8, nf4

    data, state = w_nf4.data, w_nf4.quant_state
    _, w_t, row_scale = fp8.nf4_to_fp8(data, state, rows=False, transposed=True)
    w_rows = fp8.nf4_to_fp8(data, state)[0]
    xq, xs = fp8.quantize_rows(x)
    gq, gs = fp8.quantize_rows(g, fp8.E4M3, row_scale)
    ones = fp8.ones_row(w_t.shape[0], x.device)
    bf16 = torch.bfloat16

    def fwd():
        w8, _, _ = fp8.nf4_to_fp8(data, state)
        a, a_scale = fp8.quantize_rows(x)
        return fp8.scaled_matmul(a, a_scale, w8.t(), row_scale.view(1, -1), bf16)

    def grad_input():
        _, wt, _ = fp8.nf4_to_fp8(data, state, rows=False, transposed=True)
        a, a_scale = fp8.quantize_rows(g, fp8.E4M3, row_scale)
        return fp8.scaled_matmul(a, a_scale, wt.t(), ones, bf16)

    return {
        "quantize_x_triton": ms(lambda: fp8.quantize_rows(x)),
        "quantize_grad_triton_colscale": ms(lambda: fp8.quantize_rows(g, fp8.E4M3, row_scale)),
        "nf4_to_fp8_rows": ms(lambda: _with_weight_tiles(lambda: fp8.nf4_to_fp8(data, state), False)),
        "nf4_to_fp8_rows_tiled": ms(lambda: _with_weight_tiles(lambda: fp8.nf4_to_fp8(data, state))),
        "nf4_to_fp8_transposed_tiled": ms(lambda: _with_weight_tiles(
            lambda: fp8.nf4_to_fp8(data, state, rows=False, transposed=True))),
        "nf4_to_fp8_transposed": ms(lambda: _with_weight_tiles(
            lambda: fp8.nf4_to_fp8(data, state, rows=False, transposed=True), False)),
        "nf4_to_fp8_both": ms(lambda: _with_weight_tiles(
            lambda: fp8.nf4_to_fp8(data, state, rows=True, transposed=True), False)),
        "scaled_mm_fwd_rows": ms(lambda: fp8.scaled_matmul(xq, xs, w_rows.t(), row_scale.view(1, -1), bf16)),
        "scaled_mm_grad_folded": ms(lambda: fp8.scaled_matmul(gq, gs, w_t.t(), ones, bf16)),
        "fp8_fwd_triton_total": ms(fwd),  # the tree's default kernels (per element before round 9)
        "fp8_grad_input_triton_total": ms(grad_input),
        "nf4_dequant_triton": ms(lambda: nf4.dequantize(w_nf4, state, bf16)),  # frozen_linear.TRITON_DEQUANT
        "bf16_fwd_with_dequant": ms(lambda: x @ bf.dequantize_4bit(data, state).to(bf16).t()),
        "bf16_grad_input_with_dequant": ms(lambda: g @ bf.dequantize_4bit(data, state).to(bf16)),
    }


def _with_weight_tiles(fn: Callable[[], Any], tiles: bool = True) -> Any:
    """`fn()` with the weight kernels reading a tile at a time (fp8.WEIGHT_TILES) and their
    transposed copy from its own kernel (fp8.TRANSPOSE_KERNEL), or (`tiles` False) r24's
    per-element kernels with torch's transpose."""
    from peftchat.model import fp8

    saved = fp8.WEIGHT_TILES, fp8.TRANSPOSE_KERNEL
    fp8.WEIGHT_TILES = fp8.TRANSPOSE_KERNEL = tiles
    try:
        return fn()
    finally:
        fp8.WEIGHT_TILES, fp8.TRANSPOSE_KERNEL = saved


def triton_pass_mismatch(w_nf4, x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Share of fp8 values the Triton passes write differently from the torch reference on this
    device (the GPU's fp32 division may differ from torch's by an ulp, moving a rounding)."""
    from peftchat.model import fp8

    data, state = w_nf4.data, w_nf4.quant_state
    rows, _, row_scale = fp8.nf4_to_fp8(data, state)
    out = {}
    for name, t, col in (("x", x, None), ("grad_colscale", g, row_scale)):
        q, s = fp8.quantize_rows(t, fp8.E4M3, col)
        rq, rs = fp8.quantize(t.float() * col if col is not None else t, 1)
        out[name] = (q.view(torch.uint8) != rq.view(torch.uint8)).float().mean().item()
        out[name + "_scale_max_rel"] = ((s - rs).abs() / rs).max().item()
    out["weight_rows"], out["weight_transposed"] = nf4_kernel_mismatch(data, state)
    return out


def nf4_kernel_mismatch(data: torch.Tensor, state) -> tuple[float, float]:
    """Share of e4m3 weight values `nf4_to_fp8` writes (rows, transposed) unlike quantizing the fp32
    dequantized weight, which is rebuilt here from the codes as bitsandbytes defines them."""
    import bitsandbytes.functional as bf

    from peftchat.model import fp8

    n, k = state.shape
    packed = data.flatten()
    nibbles = torch.stack([packed >> 4, packed & 15], 1).flatten().long()
    absmax = (bf.dequantize_blockwise(state.absmax, state.state2) + state.offset) if state.nested else state.absmax
    exact = (state.code[nibbles] * absmax.float().repeat_interleave(state.blocksize)).view(n, k)
    ref = fp8.quantize(exact, 1)[0].view(torch.uint8)
    rows, transposed, _ = fp8.nf4_to_fp8(data, state, rows=True, transposed=True)
    return ((rows.view(torch.uint8) != ref).float().mean().item(),
            (transposed.view(torch.uint8).t() != ref).float().mean().item())


def accepted_formats(device: str) -> dict[str, str]:
    """Which (a, b) fp8 dtype pairs and row counts rowwise `_scaled_mm` takes here."""
    from peftchat.model import fp8

    out = {}
    for a_name, b_name, m in (("e4m3", "e4m3", 64), ("e5m2", "e4m3", 64), ("e4m3", "e5m2", 64), ("e4m3", "e4m3", 61)):
        a = torch.randn(m, 128, device=device).to(fp8.FP8_DTYPES[a_name])
        b = torch.randn(256, 128, device=device).to(fp8.FP8_DTYPES[b_name]).t()
        try:
            fp8.scaled_matmul(a, torch.ones(m, 1, device=device), b, torch.ones(1, 256, device=device))
            out[f"{a_name}x{b_name}_m{m}"] = "ok"
        except Exception as e:  # report what the backend says, e.g. an unsupported dtype pair
            out[f"{a_name}x{b_name}_m{m}"] = f"error: {str(e).splitlines()[0][:200]}"
    return out


def numerics_row(name: str, k: int, n: int, m: int, device: str) -> dict[str, Any]:
    """Relative error of output, input gradient and LoRA gradients of each path against fp32 on the
    same codes: peft's bf16 layer, the fused one in bf16, and the fused one in FP8 with the recipe's
    passes (alone: input gradient only; checkpointed: recompute and input gradient) and all passes."""
    from torch.utils.checkpoint import checkpoint

    from peftchat.kernels.fp8 import Fp8Passes
    from peftchat.kernels.frozen_linear import fuse_lora_layers, unfuse_lora_layers

    layer = nf4_lora_layer(k, n, 0.0, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, m, k, device=device, generator=gen, dtype=torch.bfloat16)
    g = torch.randn(1, m, n, device=device, generator=gen, dtype=torch.bfloat16)
    lora = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def run(fp32: bool = False, ckpt: bool = False):
        xr = x.float().requires_grad_(True) if fp32 else x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=not fp32):
            y = checkpoint(layer, xr, use_reentrant=False) if ckpt else layer(xr)
        y.backward(g.float() if fp32 else g)
        grads = [p.grad.double() for p in lora]
        for p in lora:
            p.grad = None
        return (y.detach().double(), xr.grad.double(), *grads)

    base = layer.get_base_layer()
    base.compute_dtype = torch.float32
    ref = run(fp32=True)
    base.compute_dtype = torch.bfloat16
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    out: dict[str, Any] = {"linear": name}
    paths = {"peft_bf16": None, "fused_bf16": (False, None, False), "fused_fp8": (True, None, False),
             "fused_fp8_ckpt": (True, None, True), "fused_fp8all": (True, Fp8Passes(forward=True), False)}
    for path, how in paths.items():
        if how is not None:
            fuse_lora_layers(layer, fp8=how[0], passes=how[1])
        got = run(ckpt=how is not None and how[2])
        unfuse_lora_layers(layer)
        out[path] = {key: rel(a, b) for key, a, b in zip(("out", "grad_x", "grad_a", "grad_b"), got, ref)}
    return out


def memory_rows() -> dict[str, Any]:
    """NF4 storage vs an FP8 weight cache, from the model shapes (no GPU needed)."""
    from benchmarks.shapes import shape_dict

    rows = {}
    for shape in ("1b", "8b"):
        cfg = shape_dict(shape)
        d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
        per_layer = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]
        elems = layers * sum(k * n for k, n in per_layer)
        scales = layers * sum(n + k for k, n in per_layer) * 4
        largest = max(k * n for k, n in per_layer)
        rows[shape] = {
            "frozen_linear_params": elems,
            "nf4_gib": round((elems * 0.5 + elems / 64 * 1.0) / GIB, 2),  # 4-bit codes + double-quant absmax
            "fp8_cache_fwd_only_gib": round((elems + scales / 2) / GIB, 2),
            "fp8_cache_fwd_and_bwd_gib": round((2 * elems + scales) / GIB, 2),
            "per_pass_transient_mib": round(largest * (2 + 1) / 2 ** 20, 1),  # bf16 dequant + its fp8 copy
        }
    return rows


# The quality runs' bases: their recipe overrides. A run is a base with optional `+options` of
# benchmarks/peftchat_variants.py on top of `--quality-setting`'s (e.g. "fp8+fp8rec"); the base's
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
    recipe_spec = peftchat_variants.apply_options(recipe_spec, options)  # module flags: hence one process per run
    train_file, eval_file = files
    out_dir = Path(recipe_spec["work_dir"]) / "run"
    shutil.rmtree(out_dir, ignore_errors=True)  # a rerun starts fresh (the loop refuses a used run dir)
    spec = {**recipe_spec, "overrides": {"data.eval": str(eval_file), "data.packing": True, "training.eval_steps": 0,
                                         "training.log_steps": 10, **recipe_spec.get("overrides", {}),
                                         **QUALITY_BASES[base]}}
    recipe = peftchat_variants.build_recipe(spec, setting, train_file, out_dir)
    applied: list[str] = []
    t0 = time.perf_counter()
    loop.train(recipe, hooks=loop.TrainHooks(speedups_applied=applied.extend))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"applied": applied, "wall_s": round(time.perf_counter() - t0, 1), "losses_logged": losses,
            "final_train_loss": statistics.fmean(losses[-3:]), "eval_loss_bf16_path": evals[-1] if evals else None}


def run_quality_jobs(jobs: dict[str, tuple], parallel: int, on_done: Callable[[str, dict[str, Any]], None]) -> None:
    """`quality_run(*args)` for each labelled job, each in a fresh process (options set module flags:
    FP8 passes, kernels, which must not leak into the next run), `parallel` at a time on one GPU
    (a 1B run uses about 2 GiB and leaves the H200 partly idle: two at once took 123-155 s each
    against 118 s alone, three at once 152-170 s: round 10)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

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


def quality_runs(shape: str, steps: int, args: argparse.Namespace, results: dict[str, Any],
                 after_run: Callable[[], None]) -> None:
    """`--quality-runs` (each `--quality-repeats` times) through the recipe path, same seed, data and
    held-out sessions, into `results` (`after_run` saves it after each run): each run's final train
    and eval loss against the first run's, and with repeats each kind's statistics (quality_stats)."""
    from benchmarks import peftchat_variants, quality_stats
    from benchmarks.chat_sessions import write_sessions
    from benchmarks.shapes import bench_model
    from peftchat.model.tokenizer import load_tokenizer

    model_dir = bench_model(shape, args.model_root, args.device)
    work = Path(args.work_dir) / f"quality_{shape}"  # runs and adapters stay out of --out (only the JSON comes back)
    work.mkdir(parents=True, exist_ok=True)
    setting, _, options = args.quality_setting.partition("+")  # e.g. lean+skip4: options every run shares
    spec = {"shape": shape, "mode": "nf4", "model_dir": str(model_dir), "device": args.device, "batch": args.batch,
            "seq": args.seq, "warmup": 0, "steps": steps, "dropout": args.dropout}
    files = (work / "train.jsonl", work / "eval.jsonl")
    tokenizer = load_tokenizer(peftchat_variants.build_recipe({**spec, "work_dir": str(work)}, setting,
                                                              files[0], work / "tmp"))
    write_sessions(files[0], tokenizer, n=args.batch * steps * 2, seed=1234)
    write_sessions(files[1], tokenizer, n=64, seed=4321)  # other sessions: held out
    kinds = args.quality_runs.split(",")
    labels = [kind if i == 0 else f"{kind}#{i + 1}" for i in range(args.quality_repeats) for kind in kinds]
    results.update({"shape": shape, "steps": steps, "setting": args.quality_setting, "runs": labels,
                    "reference": labels[0], "dropout": args.dropout})
    jobs = {}
    for label in labels:
        base, _, kind_options = quality_stats.kind_of(label).partition("+")
        run = f"{base}+{'+'.join(filter(None, (options, kind_options)))}"
        jobs[label] = ({**spec, "work_dir": str(work / label.replace("+", "_").replace("#", "_"))}, setting, run, files)

    def done(label: str, result: dict[str, Any]) -> None:
        results[label] = result
        print(json.dumps({"run": label, **{k: v for k, v in result.items() if k != "losses_logged"}}), flush=True)
        after_run()

    run_quality_jobs(jobs, args.quality_parallel, done)
    ref = results[labels[0]]
    for label in labels:
        results[label]["train_loss_rel_diff"] = rel_diff(results[label]["final_train_loss"], ref["final_train_loss"])
        results[label]["eval_loss_rel_diff"] = rel_diff(results[label]["eval_loss_bf16_path"], ref["eval_loss_bf16_path"])
    if args.quality_repeats > 1:
        results["summary"] = quality_stats.summarize(quality_stats.runs_by_kind(results), kinds[0])
    after_run()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sections", default="kernels,numerics,memory")
    p.add_argument("--tokens", type=int, default=8192, help="rows M of the kernel timings (batch x seq)")
    p.add_argument("--linears", default=",".join(SHAPES_8B), help=f"subset of {','.join(SHAPES_8B)}")
    p.add_argument("--quality-shapes", default="1b:300,8b:100", help="shape:steps,...")
    p.add_argument("--quality-setting", default="lean", help="peftchat setting of benchmarks/peftchat_variants.py, with its +options")
    p.add_argument("--quality-runs", default="bf16,fp8",
                   help=f"comma list of {'|'.join(QUALITY_BASES)}[+options], the first the reference")
    p.add_argument("--quality-repeats", type=int, default=1,
                   help="train each run this many times (labels KIND#2, ...) and summarize each kind's spread")
    p.add_argument("--quality-parallel", type=int, default=1, help="runs at once on the one device")
    p.add_argument("--device", default="cuda", help="quality section only (cpu: a smoke run of the tiny shape)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--model-root", default="/tmp/check_fp8_models")
    p.add_argument("--work-dir", default="/tmp/check_fp8_work", help="quality runs (data, run dirs, adapters)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"torch": torch.__version__}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    sections = args.sections.split(",")
    linears = {k: SHAPES_8B[k] for k in args.linears.split(",")}

    def save() -> None:
        (out / "check_fp8.json").write_text(json.dumps(report, indent=1))

    if "memory" in sections:
        report["memory"] = memory_rows()
        save()
    if "kernels" in sections:
        report["formats"] = accepted_formats("cuda")
        save()
        report["kernels"] = []
        for name, (k, n) in linears.items():
            report["kernels"].append(kernel_rows(name, k, n, args.tokens, "cuda"))
            print(json.dumps(report["kernels"][-1]), flush=True)
            save()
    if "numerics" in sections:
        report["numerics"] = [numerics_row(name, k, n, args.tokens, "cuda") for name, (k, n) in linears.items()]
        print(json.dumps(report["numerics"]), flush=True)
        save()
    if "quality" in sections:
        report["quality"] = []
        for item in args.quality_shapes.split(","):
            shape, steps = item.split(":")
            report["quality"].append({})
            quality_runs(shape, int(steps), args, report["quality"][-1], save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

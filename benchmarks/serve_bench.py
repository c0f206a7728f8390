"""Serving benchmark: `peftchat serve` under 1, 4, 16, 64 concurrent streaming clients.

For each model mode — `nf4_adapter` (an NF4 base with an unmerged LoRA adapter, as QLoRA training
leaves it) and `bf16_merged` (the adapter merged into the bf16 base) — one in-process server (the
real app: `create_app` under uvicorn) is driven with chat-length prompts (lengths drawn as
`chat_sessions` draws sessions: log-normal, median 500 tokens, cut at --max-prompt-tokens; text
from the demo corpus) at each concurrency level, first one request at a time (`max_batch 1`, the
server's old design) and then batched. Per row: aggregate output tokens/s, p50/p99 time to first
token and inter-token latency (per request: (last chunk - first chunk) / (completion tokens - 1)),
peak GPU memory. The model is random-init (`shapes.bench_model`, e.g. the 8B Llama shape), so
replies run to max_tokens. Results: --out JSON, written after every row.

    python -m benchmarks serve --tiny --out /tmp/serve.json            # CPU smoke, seconds
    python -m benchmarks serve --shape 8b --out $OUT/serve_bench.json  # the GPU run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.chat_sessions import session_lengths

NAME = "bench"


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def _recipe(base_dir: str, out_dir: str, dtype: str, max_length: int, max_tokens: int, device: str) -> dict:
    from peftchat.demo_assets import asset_path

    return {
        "model": {"path": base_dir, "dtype": dtype, "quantization": "none"},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {
            "train": str(asset_path("demo/messages_demo.jsonl")),
            "format": "messages",
            "collator": "chat_template",
            "max_length": max_length,
            "max_source_length": max_length // 2,
            "max_target_length": max_length // 2,
        },
        "training": {"device": device, "output_dir": out_dir, "gradient_checkpointing": False},
        "decoding": {"max_new_tokens": max_tokens, "temperature": 0},
    }


def make_adapter(base_dir: str, out_dir: Path, args) -> Path:
    """An adapter dir as training leaves it, with random non-zero LoRA B (so merging changes the model)."""
    import torch
    from transformers import AutoTokenizer

    from peftchat.config import recipe_from_dict, save_recipe
    from peftchat.model.adapters import apply_lora
    from peftchat.model.load import load_base_model

    if (out_dir / "recipe.yaml").is_file():
        return out_dir
    dtype = "fp32" if args.tiny else "bf16"
    recipe = recipe_from_dict(_recipe(base_dir, str(out_dir), dtype, args.max_length, args.max_tokens, args.device))
    model = apply_lora(load_base_model(recipe), recipe, verbose=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(str(out_dir))
    save_recipe(recipe, out_dir / "recipe.yaml")
    del model
    return out_dir


def load_mode(adapter_dir: Path, mode: str):
    """(model, tokenizer, recipe) of a mode: `nf4_adapter` / `fp32_adapter` unmerged, `*_merged` merged."""
    from peftchat.infer.loading import load_chat_model

    overrides = ["model.quantization=4bit"] if mode.startswith("nf4") else []
    model, tokenizer, recipe = load_chat_model(adapter_dir, overrides)
    if mode.endswith("_merged"):
        model = model.merge_and_unload()
    return model, tokenizer, recipe


def chat_prompts(tokenizer, n: int, max_prompt_tokens: int) -> list[str]:
    """n prompts of chat length: log-normal token counts (median 500) cut at max_prompt_tokens,
    text from the demo corpus at seeded offsets."""
    from peftchat.demo_assets import asset_path

    corpus = Path(asset_path("demo/moss_demo.jsonl")).read_text(encoding="utf-8")
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    lengths = [min(L, max_prompt_tokens) for L in session_lengths(n)]
    return [tokenizer.decode(ids[(i * 7919) % (len(ids) - L) :][:L]) for i, L in enumerate(lengths)]


async def _one(client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return {
        "ttft": (first - t0) if first else None,
        "tokens": tokens,
        "itl": (last - first) / (tokens - 1) if first and tokens > 1 else None,
    }


async def drive(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` concurrent streaming clients, each sending its share of `prompts` in turn."""
    import httpx

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(k: int) -> list[dict]:
            return [await _one(client, url, p, max_tokens) for p in prompts[k::clients]]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(k) for k in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [r["itl"] for r in results if r["itl"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "agg_tok_s": round(tokens / wall, 2),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "itl_p50_s": _percentile(itl, 50),
        "itl_p99_s": _percentile(itl, 99),
    }


def _serve(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, server.servers[0].sockets[0].getsockname()[1]


def bench_mode(mode: str, adapter_dir: Path, args, rows: list[dict], out: Path) -> None:
    import torch

    from peftchat.infer.engine import ChatEngine
    from peftchat.infer.serve import ServeOptions, create_app

    model, tokenizer, recipe = load_mode(adapter_dir, mode)
    engine = ChatEngine(model, tokenizer, recipe)
    app = create_app(engine, NAME, ServeOptions(max_queued=4096, max_batch=args.max_batch, max_tokens=args.max_tokens))
    server, port = _serve(app)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    scheduler = app.state.scheduler
    try:
        for clients in args.clients:
            prompts = chat_prompts(tokenizer, max(clients * args.rounds, args.min_requests), args.max_prompt_tokens)
            for scheduling, max_batch in (("sequential", 1), ("batched", args.max_batch)):
                if scheduling == "sequential" and clients > args.sequential_max_clients:
                    continue  # one at a time: more clients only lengthen the queue (its tok/s is the same)
                if args.budget_s is not None and time.monotonic() - args.t0 > args.budget_s:
                    print(f"budget spent: skipped {mode} {scheduling} at {clients} clients", flush=True)
                    continue
                scheduler.max_batch = max_batch
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                row = {
                    "mode": mode,
                    "scheduling": scheduling,
                    "clients": clients,
                    **asyncio.run(drive(url, prompts, clients, args.max_tokens)),
                }
                row["peak_gpu_mib"] = (
                    round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
                _write(out, args, rows)
    finally:
        server.should_exit = True
        del engine, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _write(out: Path, args, rows: list[dict]) -> None:
    speedups = {}
    for r in rows:
        if r["scheduling"] == "batched":
            seq = next(
                (
                    s
                    for s in rows
                    if s["scheduling"] == "sequential" and s["mode"] == r["mode"] and s["clients"] == r["clients"]
                ),
                None,
            )
            if seq and seq["agg_tok_s"]:
                speedups[f"{r['mode']}@{r['clients']}"] = round(r["agg_tok_s"] / seq["agg_tok_s"], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "t0")}
    out.write_text(json.dumps({"config": config, "rows": rows, "batched_over_sequential_tok_s": speedups}, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: the tiny model, fp32 modes, few tokens")
    p.add_argument("--shape", default="8b", help="benchmarks.shapes shape of the random-init base (GPU)")
    p.add_argument(
        "--models-dir",
        default=os.path.join(tempfile.gettempdir(), "peftchat_bench_models"),
        help="where the random-init base (shared with benchmarks bench) and the adapter are built once",
    )
    p.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    p.add_argument("--modes", default=None, help="default nf4_adapter,bf16_merged (tiny: fp32_adapter,fp32_merged)")
    p.add_argument("--clients", default=None, help="concurrency levels (default 1,4,16,64; tiny: 1,4)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per reply (default 128; tiny 8)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default 1024 (tiny 64)")
    p.add_argument("--max-batch", type=int, default=64, help="the batched server's --max-batch-size")
    p.add_argument(
        "--sequential-max-clients",
        type=int,
        default=1 << 30,
        help="run the sequential server only up to this many clients (a GPU call's 10 minutes)",
    )
    args = p.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    args.modes = (args.modes or ("fp32_adapter,fp32_merged" if args.tiny else "nf4_adapter,bf16_merged")).split(",")
    args.clients = [int(c) for c in (args.clients or ("1,4" if args.tiny else "1,4,16,64")).split(",")]
    args.max_tokens = args.max_tokens or (8 if args.tiny else 128)
    args.max_prompt_tokens = args.max_prompt_tokens or (64 if args.tiny else 1024)
    args.max_length = args.max_prompt_tokens + args.max_tokens + 64
    if args.tiny:
        args.rounds, args.min_requests = 1, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.t0 = time.monotonic()
    models = Path(args.models_dir)
    if args.tiny:
        from peftchat.demo_assets import build_tiny_model

        base = str(build_tiny_model(models / "tiny", arch="llama", seed=0))
    else:
        from benchmarks.shapes import bench_model

        base = str(bench_model(args.shape, models, "cuda"))
    adapter = make_adapter(base, models / f"adapter-{'tiny' if args.tiny else args.shape}", args)
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        bench_mode(mode, adapter, args, rows, Path(args.out))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

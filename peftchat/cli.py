"""The `peftchat` command. Parses arguments, loads the recipe, hands off to one module per command.

Heavy imports (torch, transformers) happen inside each command so that `--help` and recipe errors
answer at once. A UserError becomes one line on stderr and exit code 2; so does a failure the user
fixes by a setting or by freeing space (out of memory, disk full, a read-only path: see
`peftchat.failures`). Anything else is a bug: one line naming a log file that holds the
traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Sequence

from peftchat import __version__
from peftchat.errors import UserError


def _split_overrides(extras: list[str], where: str) -> list[str]:
    """Arguments argparse did not know: `key=value` overrides are fine anywhere, the rest is an error."""
    from peftchat.config import is_override

    bad = [e for e in extras if not is_override(e)]
    if bad:
        raise UserError(f"{where}: unrecognized argument(s): {' '.join(bad)}")
    return extras


def _recipe(args: argparse.Namespace):
    from peftchat.config import load_recipe
    from peftchat.formats.registry import format_class

    recipe = load_recipe(args.recipe, args.overrides)
    format_class(recipe.data.collator)  # an unknown data.collator answers before anything loads
    _offline_when_local(recipe)
    return recipe


def _offline_when_local(recipe) -> None:
    """A run whose model, tokenizer and data are all local paths never waits on the hub."""
    from peftchat.quiet import offline_when_local

    def paths(spec) -> list:
        if isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig":
            return [p for item in spec for p in paths(item)]
        if isinstance(spec, dict) or hasattr(spec, "path"):
            return [spec["path"] if isinstance(spec, dict) else spec.path]
        return [spec] if spec else []

    named = [recipe.model.path, *paths(recipe.model.tokenizer), *paths(recipe.data.train), *paths(recipe.data.eval)]
    offline_when_local([str(p) for p in named])


def cmd_config(args: argparse.Namespace) -> int:
    from peftchat.config import explain_text, markdown_table, recipe_to_yaml, select_keys

    if args.explain is None:
        if args.recipe is None:
            raise UserError("config: give a recipe to print, or --explain [KEY] to describe the recipe keys")
        sys.stdout.write(recipe_to_yaml(_recipe(args), resolve_env=True))
    elif args.markdown:
        if args.explain or args.recipe is not None:
            raise UserError("config --explain --markdown: the table has every key; give no KEY and no recipe")
        sys.stdout.write(markdown_table())
    else:
        select_keys(args.explain)  # an unknown KEY answers before a recipe loads
        recipe = _recipe(args) if args.recipe is not None else None
        sys.stdout.write(explain_text(args.explain, recipe))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe(args)  # recipe errors answer before the heavy imports
    from peftchat.paths import check_writable_dir

    if os.environ.get("RANK", "0") == "0":  # under torchrun only process 0 writes (peftchat.train.distributed)
        check_writable_dir(recipe.training.output_dir, "training.output_dir")
        from peftchat.train.outputs import check_train_outputs

        check_train_outputs(recipe, args.recipe, args.into_nonempty)
        _build_missing_tiny_model(recipe)
    if args.nproc_per_node is not None:  # start the torchrun processes here; each runs this command
        _check_count("--nproc-per-node", args.nproc_per_node, 1)
        from peftchat.train.distributed import check_launch, launch_local

        check_launch(recipe, launching=True)
        flags = ["--into-nonempty-dir"] * args.into_nonempty + ["--no-integrity-check"] * args.no_integrity_check
        return launch_local(args.nproc_per_node, ["train", args.recipe, *args.overrides, *flags])
    from peftchat.train.loop import TrainHooks, train

    hooks = TrainHooks()
    if recipe.training.eval_generate > 0:  # read the samples and check the extras before training
        from peftchat.infer.evaluate import eval_generate_hook

        hooks.eval_scores = eval_generate_hook(recipe)
    train(recipe, hooks)
    return 0


def _build_missing_tiny_model(recipe) -> None:
    """A demo recipe's base is a tiny model it can build (model.tiny_if_missing): build it where
    model.path points when nothing is there yet; an existing path is never touched."""
    from pathlib import Path

    arch, path = recipe.model.tiny_if_missing, Path(recipe.model.path).expanduser()
    # `org/name` is a hub id (a copied demo pointed at a real model): load it, never build over it
    if arch is None or path.exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", recipe.model.path):
        return
    from peftchat.demo_assets import build_tiny_model

    print(
        f"peftchat: {path} does not exist; building a random-init tiny {arch} model there (model.tiny_if_missing)",
        file=sys.stderr,
        flush=True,
    )
    # built beside it and renamed into place, so an interrupted build never leaves a half model
    # at model.path that the next run would take as built
    building = path.parent / f".{path.name}.building-{os.getpid()}"
    build_tiny_model(building, arch=arch)
    os.replace(building, path)


def cmd_data_dump(args: argparse.Namespace) -> int:
    _check_count("--limit", args.limit, 0)
    recipe = _recipe(args)
    from peftchat.train.outputs import recipe_inputs

    _check_out_file(args.out, recipe_inputs(recipe, args.recipe), args.force)
    from peftchat.data.inspect import dump_samples
    from peftchat.model.tokenizer import load_tokenizer

    dump_samples(recipe, load_tokenizer(recipe), args.out, limit=args.limit, split=args.split, force=args.force)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    _check_count("--count", args.count, 1)
    recipe = _recipe(args)
    from peftchat.data.inspect import inspect_samples
    from peftchat.model.tokenizer import load_tokenizer

    inspect_samples(recipe, load_tokenizer(recipe), index=args.index, count=args.count, split=args.split)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from peftchat.merge import merge_adapter

    merge_adapter(
        args.adapter,
        args.out,
        base=args.base,
        dtype=args.dtype,
        verify=args.verify,
        force=args.force,
        onto_original=args.onto_original,
    )
    return 0


def _decoding_flags(args: argparse.Namespace) -> list[str]:
    """Sampling flags as recipe overrides, so flags and `decoding.*=` mean the same thing."""
    from peftchat.config import range_error

    names = ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty"]
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    for name, value in given.items():  # checked here too, so the error names the flag
        problem = range_error(f"decoding.{name}", value)
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {problem}")
    return [f"decoding.{n}={v}" for n, v in given.items()]


def _check_count(flag: str, value: int | None, least: int) -> None:
    if value is not None and value < least:
        raise UserError(f"{flag} must be >= {least}, got {value}")


def cmd_chat(args: argparse.Namespace) -> int:
    if args.message is not None and not args.message.strip():
        raise UserError("--message is empty; give the text to send, or leave --message out to chat turn by turn")
    if args.message is not None and args.messages is not None:
        raise UserError("--message and --messages: give one (the last user message goes into the --messages file)")
    overrides = args.overrides + _decoding_flags(args)
    from peftchat.infer.chat import run_chat

    return run_chat(
        args.source,
        overrides,
        message=args.message,
        stream=not args.no_stream,
        system=args.system,
        tools=args.tools,
        messages=args.messages,
    )


def _check_out_file(path: str, inputs: Sequence = (), force: bool = False) -> None:
    """Before any slow work: --out is none of the command's inputs, and it can be written (its
    dir writable; an existing file only with --force)."""
    from peftchat.paths import check_new_file, check_outputs

    check_outputs([("--out", path)], inputs)
    check_new_file(path, "--out", force)


def _source_inputs(args: argparse.Namespace) -> list:
    from peftchat.rundir import source_paths

    return source_paths(args.source, args.overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    overrides = args.overrides + _decoding_flags(args)
    _check_out_file(args.out, [("--in", args.inp)] + _source_inputs(args), args.force)
    from peftchat.infer.generate import run_generate

    run_generate(args.source, args.inp, args.out, overrides, batch_size=args.batch_size, force=args.force)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from peftchat.infer.serve import ServeOptions, run_serve

    options = ServeOptions(
        api_key=args.api_key,
        allowed_hosts=args.allowed_hosts,
        cors_origins=args.cors_origins,
        docs=args.docs,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_tokens=args.max_tokens_cap,
        max_n=args.max_n,
        max_queued=args.max_queued,
        max_batch=args.max_batch_size,
        request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout,
    )
    return run_serve(
        args.source,
        args.overrides,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        options=options,
        insecure_no_api_key=args.insecure_no_api_key,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from peftchat.export.command import export_gguf

    export_gguf(
        args.source, args.gguf, outtype=args.outtype, overrides=args.overrides, force=args.force, parity=args.parity
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.out is not None:
        _check_out_file(args.out, [("--data", args.data)] + _source_inputs(args), args.force)
    from peftchat.infer.evaluate import run_eval

    return run_eval(args.source, args.data, args.overrides, limit=args.limit, out=args.out, force=args.force)


def cmd_plot(args: argparse.Namespace) -> int:
    from peftchat.train.curves import plot_runs

    plot_runs(args.run_dirs, args.out, force=args.force)
    print(f"training curves written to {args.out}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    if not 0 <= args.seed <= 2**64 - 1:  # torch.manual_seed's range (beyond it: an OverflowError)
        raise UserError(f"--seed must be in [0, 2**64 - 1], got {args.seed}")
    from peftchat.demo_assets import build_tiny_model

    path = build_tiny_model(args.out, arch=args.arch, seed=args.seed)
    print(f"tiny {args.arch} model written to {path}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from peftchat.shipped_recipes import RECIPES_DIR, copy_recipe, require, shipped_names, summary

    if args.recipes_command == "show":
        sys.stdout.write(require(args.name).read_text(encoding="utf-8"))
    elif args.recipes_command == "copy":
        target = copy_recipe(args.name, args.dest)
        print(f"wrote {target}; edit it, then: peftchat train {target}")
    else:
        names = shipped_names()
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:<{width}}  {summary(require(name))}")
        print(f"(in {RECIPES_DIR.resolve()}; peftchat recipes show NAME | copy NAME [DEST])", file=sys.stderr)
    return 0


def _add_recipes_command(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes; show or copy one")
    p.set_defaults(func=cmd_recipes, recipes_command=None)
    recipes_sub = p.add_subparsers(dest="recipes_command")
    s = recipes_sub.add_parser("show", help="print a shipped recipe")
    s.add_argument("name", help="a name from `peftchat recipes`")
    s = recipes_sub.add_parser("copy", help="write an editable copy of a shipped recipe (never overwrites)")
    s.add_argument("name", help="a name from `peftchat recipes`")
    s.add_argument("dest", nargs="?", default=None, help="file or existing dir (default: ./NAME.yaml)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (`peftchat recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")


def _add_split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--split",
        default="train",
        choices=["train", "eval"],
        help="train: every record of data.train (default); eval: what evaluation uses",
    )


def _add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force", action="store_true", help="replace an existing output file (written beside it, then renamed over it)"
    )


def _add_integrity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-integrity-check",
        dest="no_integrity_check",
        action="store_true",
        help="load a run dir or checkpoint even when unfinished or changed since it was written",
    )


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_chat_command(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with a trained or merged model")
    p.add_argument("source", help="a recipe, an adapter dir or a merged model dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--message", default=None, help="send one message, print the reply, exit")
    p.add_argument("--no-stream", action="store_true", help="print replies whole")
    p.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="system message for the session (default: data.meta_instruction, as in training)",
    )
    p.add_argument(
        "--tools",
        default=None,
        metavar="FILE.json",
        help="a JSON list of tools the chat template renders, as training rendered a record's tools",
    )
    p.add_argument(
        "--messages",
        default=None,
        metavar="FILE.json",
        help="answer this conversation (OpenAI messages, optionally with tools, tool calls and tool "
        'results: a JSON list, or {"messages": [...], "tools": [...]}) and exit',
    )
    _add_decoding_args(p)
    _add_integrity_arg(p)
    p.set_defaults(func=cmd_chat)


def _add_generate_command(sub) -> None:
    p = sub.add_parser("generate", help="batched generation over a JSONL file of prompts")
    p.add_argument("source", help="a recipe, an adapter dir or a merged model dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--in", dest="inp", required=True, help="input .jsonl")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    _add_decoding_args(p)
    _add_force_arg(p)
    _add_integrity_arg(p)
    p.set_defaults(func=cmd_generate)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API for a trained or merged model")
    p.add_argument("source", help="a recipe, an adapter dir or a merged model dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model-name", dest="model_name", default=None, help="model id in the API (default: the source's name)"
    )
    _add_integrity_arg(p)
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)


def _add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file for llama.cpp")
    p.add_argument("source", help="an adapter dir (merged on the fly) or a merged model dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gguf", required=True, help="output .gguf file")
    p.add_argument("--outtype", default="f16", choices=["f16", "q8_0"])
    p.add_argument(
        "--parity",
        action="store_true",
        help="also run the file in llama.cpp (extra gguf-check) and "
        "print its top-1 agreement and largest logit difference against transformers",
    )
    _add_force_arg(p)
    _add_integrity_arg(p)
    p.set_defaults(func=cmd_export)


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="greedy generations on held-out conversations, scored with BLEU-4 and ROUGE")
    p.add_argument("source", help="a recipe, an adapter dir or a merged model dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument(
        "--data",
        default=None,
        help="conversations in a format the recipe reads (data.format); "
        "default: the run's held-out eval data (data.eval, else the data.eval_split sessions)",
    )
    p.add_argument("--limit", type=int, default=None, help="score the first N answers only")
    p.add_argument("--out", default=None, help="write the scores and per-sample predictions to this JSON file")
    _add_force_arg(p)
    _add_integrity_arg(p)
    p.set_defaults(func=cmd_eval)


def _add_plot_command(sub) -> None:
    p = sub.add_parser("plot", help="loss, eval loss and lr curves of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training output dirs (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="output .png")
    _add_force_arg(p)
    p.set_defaults(func=cmd_plot)


def _add_model_use_commands(sub) -> None:
    """chat, generate, serve, export, eval, plot: the commands that use a trained model."""
    for add in (
        _add_chat_command,
        _add_generate_command,
        _add_serve_command,
        _add_export_command,
        _add_eval_command,
        _add_plot_command,
    ):
        add(sub)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    """serve's key, exposure and limits (README "Serve it for a team")."""
    p.add_argument(
        "--api-key",
        dest="api_key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (better: the PEFTCHAT_API_KEY environment variable)",
    )
    p.add_argument(
        "--insecure-no-api-key",
        dest="insecure_no_api_key",
        action="store_true",
        help="allow a non-loopback --host without an API key",
    )
    p.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name to answer besides IP addresses and localhost (repeatable; * for any)",
    )
    p.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from ORIGIN (repeatable; CORS is off by default)",
    )
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--max-body-mb", dest="max_body_mb", type=_positive(float), default=8.0)
    p.add_argument(
        "--max-tokens-cap",
        dest="max_tokens_cap",
        type=_positive(int),
        default=4096,
        help="the largest max_tokens a request may ask (default 4096)",
    )
    p.add_argument("--max-n", dest="max_n", type=_positive(int), default=8)
    p.add_argument(
        "--max-queued",
        dest="max_queued",
        type=_positive(int),
        default=64,
        help="choices waiting for a batch before requests get 429 (default 64)",
    )
    p.add_argument(
        "--max-batch-size",
        dest="max_batch_size",
        type=_positive(int),
        default=16,
        help="choices generated together (default 16; 1 serves one at a time)",
    )
    p.add_argument(
        "--request-timeout",
        dest="request_timeout",
        type=_positive(float),
        default=600.0,
        help="seconds from a request's arrival to its last token (default 600)",
    )
    p.add_argument(
        "--drain-timeout",
        dest="drain_timeout",
        type=_positive(float),
        default=30.0,
        help="seconds SIGTERM waits for requests in flight (default 30)",
    )


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train an adapter from a recipe")
    _add_recipe_args(p)
    p.add_argument(
        "--nproc-per-node",
        dest="nproc_per_node",
        type=int,
        default=None,
        metavar="N",
        help="train with N processes on this machine, one per GPU (torchrun; README 'Several GPUs')",
    )
    p.add_argument(
        "--into-nonempty-dir",
        dest="into_nonempty",
        action="store_true",
        help="let a new run add its files to a non-empty training.output_dir that holds no run "
        "(a file there with a name the run writes is still refused)",
    )
    _add_integrity_arg(p)
    p.set_defaults(func=cmd_train)


def _add_config_command(sub) -> None:
    p = sub.add_parser("config", help="print the fully resolved recipe as YAML, or describe the recipe keys")
    p.add_argument("recipe", nargs="?", help="recipe YAML file, or the name of a shipped recipe (`peftchat recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument(
        "--explain",
        nargs="?",
        const="",
        default=None,
        metavar="KEY",
        help="each recipe key (or KEY, or a section such as `training`): doc, type, default, allowed "
        "values, what a resume may change; with a recipe, its value there too",
    )
    p.add_argument("--markdown", action="store_true", help="with --explain: every key as a Markdown table (README's)")
    p.set_defaults(func=cmd_config)


def _add_data_command(sub) -> None:
    p = sub.add_parser("data", help="look at the training samples a recipe makes")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    d = data_sub.add_parser("dump", help="write one JSON object per training sample")
    _add_recipe_args(d)
    d.add_argument("--out", required=True, help="output .jsonl file")
    d.add_argument("--limit", type=int, default=None, help="at most N samples")
    _add_force_arg(d)
    _add_split_arg(d)
    d.set_defaults(func=cmd_data_dump)
    d = data_sub.add_parser("inspect", help="show decoded samples with loss-bearing tokens marked")
    _add_recipe_args(d)
    d.add_argument("--index", type=int, default=None, help="show this sample only")
    d.add_argument("--count", type=int, default=3, help="samples to show when --index is not given")
    _add_split_arg(d)
    d.set_defaults(func=cmd_data_inspect)


def _add_merge_command(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base model for export")
    p.add_argument("--adapter", required=True, help="adapter dir (a training output dir or checkpoint)")
    p.add_argument("--out", required=True, help="output model dir")
    p.add_argument("--base", default=None, help="base model dir or hub id (default: from the adapter's recipe)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument(
        "--verify",
        dest="verify",
        action="store_true",
        default=None,
        help="compare merged and adapter logits (default: on for small models)",
    )
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output dir")
    p.add_argument(
        "--onto-original",
        action="store_true",
        help="merge a k-bit-trained adapter onto the original 16-bit weights (drifts)",
    )
    _add_integrity_arg(p)
    p.set_defaults(func=cmd_merge)


def _add_tiny_model_command(sub) -> None:
    p = sub.add_parser("tiny-model", help="build a random-init tiny model of a supported family for demos and tests")
    p.add_argument("out", help="output dir")
    # the names of peftchat.demo_assets.TINY_ARCHS (not imported here: --help stays light)
    p.add_argument(
        "--arch",
        default="llama",
        choices=["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "glm", "glm4", "phi3"],
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peftchat", description="Fine-tune chat LLMs with LoRA/QLoRA adapters on one GPU, driven by YAML recipes."
    )
    parser.add_argument("--version", action="version", version=f"peftchat {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' progress bars and notes (quiet by default); may come anywhere",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train_command,
        _add_config_command,
        _add_data_command,
        _add_merge_command,
        _add_model_use_commands,
        _add_recipes_command,
        _add_tiny_model_command,
    ):
        add(sub)
    return parser


def _newest_checkpoint(args: argparse.Namespace):
    """For a failed `train`: the newest complete checkpoint of its output dir, or None."""
    if getattr(args, "command", None) != "train":
        return None
    try:
        from peftchat.config import load_recipe
        from peftchat.rundir import latest_checkpoint

        return latest_checkpoint(load_recipe(args.recipe, args.overrides).training.output_dir)
    except Exception:  # noqa: BLE001 - only a hint for the message: none is "none saved"
        return None


def _unexpected(exc: Exception, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """The last resort: one line on stderr, never a traceback (that goes to the crash log)."""
    from peftchat.failures import crash_line, explain, write_crash_log

    reason = explain(exc, getattr(args, "command", None), _newest_checkpoint(args))
    if reason is not None:
        print(f"peftchat: error: {reason}", file=sys.stderr)
        return 2
    print(f"peftchat: {crash_line(exc, write_crash_log(exc, argv))}", file=sys.stderr)
    return 1


# argparse destinations that are paths, as the user wrote them (a --message or --system may hold lines)
PATH_ARGS = {
    "recipe": "recipe",
    "source": "source",
    "out": "--out",
    "inp": "--in",
    "adapter": "--adapter",
    "base": "--base",
    "data": "--data",
    "gguf": "--gguf",
    "run_dirs": "RUN_DIR",
}


def _check_text_args(args: argparse.Namespace) -> None:
    """Every argument must be text: a path of bytes that are not UTF-8 reaches libraries that
    cannot take it (tokenizers' save_pretrained, YAML) and the recipe.yaml a run saves. A path
    holds no line break (`config.check_path_text`)."""
    from peftchat.config import check_path_text

    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or name == "overrides":  # overrides: config.parse_overrides names the key
                continue
            if name in PATH_ARGS:
                check_path_text(PATH_ARGS[name], item)
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(item).decode("utf-8", "backslashreplace")
                raise UserError(
                    f"argument '{shown}' is not UTF-8 text; peftchat reads and writes UTF-8 names only: rename it"
                ) from None


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues a stopped `train`, runnable from any directory: this one
    with `training.resume=true` in place of any `training.resume=...` it had."""
    import shlex

    kept = [a for a in argv if not a.startswith("training.resume=")]
    return f"cd {shlex.quote(os.getcwd())} && " + shlex.join(["peftchat", *kept, "training.resume=true"])


def _stopped(exc: KeyboardInterrupt, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """A signal stopped the command: one line, exit 128 + the signal (130 for a plain Ctrl-C)."""
    import signal

    signum = getattr(exc, "signum", signal.SIGINT)
    line = f"peftchat: stopped by {signal.Signals(signum).name}"
    detail = getattr(exc, "detail", "")
    if detail:
        line += f": {detail}"
    if getattr(exc, "checkpoint", None) is not None and getattr(args, "command", None) == "train":
        line += f"; resume with: {_resume_command(argv)}"
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # SIGHUP: the terminal is gone
        pass
    return 128 + signum


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a message naming a non-UTF-8 path prints, escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    from peftchat.quiet import quiet_by_default

    # --verbose may follow the subcommand too (argparse takes it only before)
    quiet_by_default("--verbose" in argv)
    args, extras = parser.parse_known_args(
        ["--verbose"] * ("--verbose" in argv) + [a for a in argv if a != "--verbose"]
    )
    try:
        _check_text_args(args)
        if extras:
            if not hasattr(args, "overrides"):
                raise UserError(f"unrecognized argument(s): {' '.join(extras)}")
            args.overrides = list(args.overrides) + _split_overrides(extras, f"peftchat {args.command}")
        func: Callable[[argparse.Namespace], int] = args.func
        if getattr(args, "no_integrity_check", False):
            from peftchat.rundir import integrity_unchecked

            with integrity_unchecked():
                return func(args)
        return func(args)
    except UserError as e:
        print(f"peftchat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _stopped(e, args, argv)
    except BrokenPipeError:  # `peftchat data dump ... | head` closed stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - the last resort: see _unexpected
        return _unexpected(e, args, argv)


if __name__ == "__main__":
    sys.exit(main())

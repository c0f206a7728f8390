"""The catalogue of bad inputs: one row per class of mistake a user can make.

Each row runs the CLI in-process and asserts the exit code, that stderr is one line (the error;
rows that load a model first may print progress notes before it), that no traceback is shown,
and that nothing in the test's directory changed: recipes, data, adapters, an existing run's
checkpoints, output locations. Most rows fail before any model is loaded.

docs/reliability.md lists what each group of rows guarantees.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from peftchat.cli import main
from peftchat.demo_assets import asset_path

DEEP = "[" * 100_000 + "]" * 100_000

# ------------------------------------------------------------------------------ fixtures


def _recipe_text(model: Path, t: Path) -> str:
    return (
        f"model: {{path: {model}, dtype: fp32, compute_dtype: fp32}}\n"
        f"adapter: {{r: 4, alpha: 8, dropout: 0.0}}\n"
        f"data: {{train: {t / 'data.jsonl'}, format: messages, collator: chat_template, max_length: 128}}\n"
        f"training: {{device: cpu, output_dir: {t / 'run'}, max_steps: 2, tensorboard: false,"
        f" gradient_checkpointing: false}}\n"
        f"decoding: {{max_new_tokens: 4, temperature: 0}}\n"
    )


@pytest.fixture
def world(tmp_path, tiny_llama_dir):
    """tmp_path with r.yaml (a valid recipe), data.jsonl (the messages demo), an existing run
    `old/` holding a complete checkpoint, a read-only-for-everyone `/sys` path and a plain file."""
    t = tmp_path
    (t / "r.yaml").write_text(_recipe_text(Path(tiny_llama_dir), t), encoding="utf-8")
    shutil.copy(asset_path("demo/messages_demo.jsonl"), t / "data.jsonl")
    ckpt = t / "old" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    for name, body in {"adapter_model.safetensors": "x", "trainer_state.json": "{}", "complete": "2\n"}.items():
        (ckpt / name).write_text(body)
    (t / "afile").write_text("not a dir")
    return t


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its content (dirs as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write(t: Path, name: str, content) -> Path:
    path = t / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def messages_line(text="hi") -> str:
    return json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]})


def adapter_copy(t: Path, make_adapter) -> Path:
    dst = t / "adapter"
    shutil.copytree(make_adapter("chat_template"), dst)
    return dst


# ------------------------------------------------------------------------------ the rows
# (id, argv with {T} = the test dir and {R} = its recipe, exit code, message part, prep)
# prep(t, make_adapter) creates the row's inputs before the snapshot.


def _p_files(files: dict):
    def prep(t, make_adapter):
        for name, content in files.items():
            write(t, name, content)

    return prep


def _p_adapter(t, make_adapter):
    adapter_copy(t, make_adapter)


def _p_truncated_adapter(t, make_adapter):
    f = adapter_copy(t, make_adapter) / "adapter_model.safetensors"
    os.truncate(f, f.stat().st_size // 2)


def _p_truncated_base(t, make_adapter):
    from peftchat.config import load_recipe  # the recipe's model, copied, its weights cut in half

    src = Path(load_recipe(t / "r.yaml").model.path)
    shutil.copytree(src, t / "model")
    f = t / "model" / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)


def _p_adapter_bad_json(t, make_adapter):
    (adapter_copy(t, make_adapter) / "adapter_config.json").write_text("{bad", encoding="utf-8")


def _p_adapter_no_weights(t, make_adapter):
    (adapter_copy(t, make_adapter) / "adapter_model.safetensors").unlink()


def _p_out_nonempty(t, make_adapter):
    adapter_copy(t, make_adapter)
    write(t, "export/keep.txt", "mine")


def _p_damaged_checkpoint(t, make_adapter):
    """old/checkpoint-2 with a manifest whose checksum of trainer_state.json does not match."""
    state = t / "old" / "checkpoint-2" / "trainer_state.json"
    manifest = {"files": {"trainer_state.json": {"size": state.stat().st_size, "sha256": "0" * 64}}}
    write(t, "old/checkpoint-2/checksums.json", json.dumps(manifest))


_HELD_LOCKS = []  # kept alive (and so locked) for the rest of the test session


def _p_held_output_dir(t, make_adapter):
    """{T}/run held by a live writer (this process, through another open file: flock is per open file)."""
    from filelock import FileLock

    from peftchat.train.lock import HOLDER_FILE, LOCK_FILE

    (t / "run").mkdir()
    lock = FileLock(str(t / "run" / LOCK_FILE), timeout=0)
    lock.acquire()
    _HELD_LOCKS.append(lock)
    write(t, f"run/{HOLDER_FILE}", json.dumps({"pid": os.getpid(), "host": "here", "started": "now"}))


RANGE_ROWS = [
    ("training.epochs=0", "'training.epochs' must be in (0, 1000000], got 0"),
    ("training.epochs=-1", "'training.epochs' must be in (0, 1000000]"),
    ("training.epochs=.inf", "'training.epochs' must be in (0, 1000000], got inf"),
    ("training.epochs=1e308", "'training.epochs' must be in (0, 1000000], got 1e+308"),
    ("training.lr=.nan", "'training.lr' must be > 0, got nan"),
    ("training.lr=.inf", "'training.lr' must be a finite number, got inf"),
    (
        f"training.max_steps={2**70}",
        f"'training.max_steps' must be at most 2147483647 (no run reaches more), got {2**70}",
    ),
    (f"training.batch_size={2**70}", "'training.batch_size' must be at most 2147483647"),
    ("training.seed=4294967296", "'training.seed' must be in [0, 4294967295], got 4294967296"),
    ("training.warmup_steps=-1", "'training.warmup_steps' must be >= 0"),
    ("training.warmup_ratio=1.5", "'training.warmup_ratio' must be in [0, 1]"),
    ("training.save_steps=-5", "'training.save_steps' must be >= 0"),
    ("training.max_grad_norm=-1", "'training.max_grad_norm' must be >= 0"),
    ("training.save_total_limit=-1", "'training.save_total_limit' must be >= 0"),
    ("training.eval_steps=-1", "'training.eval_steps' must be >= 0"),
    ("training.log_steps=0", "'training.log_steps' must be > 0"),
    ("training.batch_size=0", "'training.batch_size' must be > 0"),
    ("training.gradient_accumulation_steps=0", "'training.gradient_accumulation_steps' must be > 0"),
    ("training.lr=0", "'training.lr' must be > 0"),
    ("training.lr=nan", "'training.lr' must be > 0, got nan"),
    ("training.weight_decay=-0.1", "'training.weight_decay' must be >= 0"),
    ("training.max_steps=-2", "'training.max_steps' must be >= -1"),
    ("training.adam_beta1=1", "'training.adam_beta1' must be in [0, 1)"),
    ("training.adam_beta2=-0.5", "'training.adam_beta2' must be in [0, 1)"),
    ("training.adam_eps=0", "'training.adam_eps' must be > 0"),
    ("training.checkpoint_skip_layers=-1", "'training.checkpoint_skip_layers' must be >= 0"),
    ("training.seed=-1", "'training.seed' must be in [0, 4294967295]"),
    ("data.eval_split=-0.1", "'data.eval_split' must be >= 0"),
    ("data.eval_split=2.5", "'data.eval_split' must be a share below 1 or a whole number"),
    ("data.num_proc=0", "'data.num_proc' must be >= 1"),
    ("data.max_length=0", "'data.max_length' must be > 0"),
    ("data.max_source_length=0", "'data.max_source_length' must be > 0"),
    ("data.max_target_length=-3", "'data.max_target_length' must be > 0"),
    ("data.max_record_bytes=0", "'data.max_record_bytes' must be > 0"),
    ("adapter.r=0", "'adapter.r' must be > 0"),
    ("adapter.alpha=0", "'adapter.alpha' must be > 0"),
    ("adapter.alpha=-8", "'adapter.alpha' must be > 0"),
    ("adapter.dropout=1.0", "'adapter.dropout' must be in [0, 1)"),
    ("adapter.dropout=-0.1", "'adapter.dropout' must be in [0, 1)"),
    ("decoding.top_p=1.5", "'decoding.top_p' must be in (0, 1]"),
    ("decoding.top_p=0", "'decoding.top_p' must be in (0, 1]"),
    ("decoding.temperature=-1", "'decoding.temperature' must be >= 0"),
    ("decoding.max_new_tokens=0", "'decoding.max_new_tokens' must be >= 1"),
    ("decoding.top_k=-1", "'decoding.top_k' must be >= 0"),
    ("decoding.repetition_penalty=0", "'decoding.repetition_penalty' must be > 0"),
    ("decoding.max_context=0", "'decoding.max_context' must be > 0"),
]

ENUM_ROWS = [
    ("model.quantization=3bit", "'model.quantization' is '3bit'"),
    ("model.dtype=float64", "'model.dtype' is 'float64'"),
    ("model.quant_type=nf3", "'model.quant_type' is 'nf3'"),
    ("model.compute_dtype=int8", "'model.compute_dtype' is 'int8'"),
    ("model.attn_implementation=flash", "'model.attn_implementation' is 'flash'"),
    ("adapter.bias=some", "'adapter.bias' is 'some'"),
    ("data.format=csv", "'data.format' is 'csv'"),
    ("data.collator=llama", "'data.collator' is 'llama'"),
    ("data.chatglm_style=chatglm9", "'data.chatglm_style' is 'chatglm9'"),
    ("data.truncation=middle", "'data.truncation' is 'middle'"),
    ("data.loss_on=everything", "'data.loss_on' is 'everything'"),
    ("data.on_error=ignore", "'data.on_error' is 'ignore'"),
    ("training.lr_scheduler=exp", "'training.lr_scheduler' is 'exp'"),
    ("training.optimizer=sgd", "'training.optimizer' is 'sgd'"),
]

TYPE_ROWS = [
    ("training.batch_size=abc", "wrong value for 'training.batch_size'"),
    ("training.epochs=many", "wrong value for 'training.epochs'"),
    ("training.gradient_checkpointing=maybe", "wrong value for 'training.gradient_checkpointing'"),
    ("training.nope=1", "unknown key 'training.nope'"),
    ("trainig.lr=1", "unknown key 'trainig'"),
    ("training.lr", "not of the form key=value"),
    ("adapter.target_modules=5", "'adapter.target_modules' must be"),
    ("training.resume=3", "'training.resume' must be false, true or a checkpoint path"),
    ("data.train=[]", "'data.train' is an empty list"),
    ("model.path=${nope}", "cannot resolve"),
    ("data.train=[a.jsonl, b.jsonl", "override 'data.train': its value '[a.jsonl, b.jsonl' is not valid YAML"),
    (
        "data.train=[{path: a.jsonl, weight: 0}]",
        "'data.train[0].weight' must be a number in (0, 1e+06] (0 takes nothing",
    ),
    ("data.train=[{path: a.jsonl, weight: .inf}]", "'data.train[0].weight' must be a number in (0, 1e+06]"),
    ("training.output_dir=runs/a\nb", "'training.output_dir' is 'runs/a\\nb': a path with a line break or NUL"),
]

DUMP_B = ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.jsonl"]

ROWS = (
    [(f"range:{o}", ["config", "{R}", o], 2, m, None) for o, m in RANGE_ROWS]
    + [(f"enum:{o}", ["config", "{R}", o], 2, m, None) for o, m in ENUM_ROWS]
    + [(f"type:{o}", ["config", "{R}", o], 2, m, None) for o, m in TYPE_ROWS]
    + [
        # ---- the recipe file
        ("recipe:missing", ["config", "{T}/nope.yaml"], 2, "recipe file not found", None),
        ("recipe:is-a-dir", ["config", "{T}/old"], 2, "is a directory", None),
        (
            "recipe:invalid-yaml",
            ["config", "{T}/b.yaml"],
            2,
            "b.yaml:3: invalid YAML",
            _p_files({"b.yaml": "model:\n  path: m\n data: [\n"}),
        ),
        (
            "recipe:not-utf8",
            ["config", "{T}/b.yaml"],
            2,
            "b.yaml:2: not UTF-8 text",
            _p_files({"b.yaml": b"model:\n  path: caf\xe9\n"}),
        ),
        (
            "recipe:utf16",
            ["config", "{T}/b.yaml"],
            2,
            "b.yaml:1: not UTF-8 text",
            _p_files({"b.yaml": "model: {path: m}\n".encode("utf-16")}),
        ),
        (
            "recipe:duplicate-key",
            ["config", "{T}/b.yaml"],
            2,
            "b.yaml:3: duplicate key 'path' (first set on line 2)",
            _p_files({"b.yaml": "model:\n  path: a\n  path: b\ndata: {train: x}\n"}),
        ),
        (
            "recipe:duplicate-section",
            ["config", "{T}/b.yaml"],
            2,
            "b.yaml:3: duplicate key 'model'",
            _p_files({"b.yaml": "model: {path: a}\ndata: {train: x}\nmodel: {path: b}\n"}),
        ),
        (
            "recipe:nested-deep",
            ["config", "{T}/b.yaml"],
            2,
            "b.yaml: YAML nested too deeply",
            _p_files({"b.yaml": "model: " + DEEP + "\n"}),
        ),
        (
            "recipe:a-list",
            ["config", "{T}/b.yaml"],
            2,
            "a recipe must be a mapping",
            _p_files({"b.yaml": "- model\n- data\n"}),
        ),
        (
            "recipe:section-scalar",
            ["config", "{T}/b.yaml"],
            2,
            "'model' must be a mapping",
            _p_files({"b.yaml": "model: llama\n"}),
        ),
        (
            "recipe:extends-missing",
            ["config", "{T}/b.yaml"],
            2,
            "extends 'gone.yaml', which is not found",
            _p_files({"b.yaml": "extends: gone.yaml\n"}),
        ),
        (
            "recipe:extends-circular",
            ["config", "{T}/b.yaml"],
            2,
            "circular 'extends'",
            _p_files({"b.yaml": "extends: c.yaml\n", "c.yaml": "extends: b.yaml\n"}),
        ),
        (
            "recipe:extends-not-a-path",
            ["config", "{T}/b.yaml"],
            2,
            "'extends' must be a path",
            _p_files({"b.yaml": "extends: [5]\n"}),
        ),
        (
            "recipe:no-model-path",
            ["config", "{T}/b.yaml"],
            2,
            "required key 'model.path' is not set",
            _p_files({"b.yaml": "data: {train: x}\n"}),
        ),
        (
            "recipe:unknown-key-in-file",
            ["config", "{T}/b.yaml"],
            2,
            "unknown key 'model.pth' (did you mean 'model.path'?)",
            _p_files({"b.yaml": "model: {pth: m}\n"}),
        ),
        # ---- the command line
        ("cli:unknown-command", ["fly"], 2, "invalid choice: 'fly'", None),
        ("cli:unknown-flag", ["train", "{R}", "--bogus"], 2, "unrecognized argument(s): --bogus", None),
        ("cli:chat-temperature", ["chat", "{R}", "--temperature", "-1"], 2, "--temperature must be >= 0", None),
        ("cli:chat-top-p", ["chat", "{R}", "--top-p", "2"], 2, "--top-p must be in (0, 1]", None),
        ("cli:chat-top-k", ["chat", "{R}", "--top-k", "-1"], 2, "--top-k must be >= 0", None),
        ("cli:chat-max-new-tokens", ["chat", "{R}", "--max-new-tokens", "0"], 2, "--max-new-tokens must be >= 1", None),
        (
            "cli:chat-repetition-penalty",
            ["chat", "{R}", "--repetition-penalty", "0"],
            2,
            "--repetition-penalty must be > 0",
            None,
        ),
        ("cli:chat-temperature-not-a-number", ["chat", "{R}", "--temperature", "hot"], 2, "invalid float value", None),
        (
            "cli:generate-temperature",
            ["generate", "{R}", "--in", "{T}/data.jsonl", "--out", "{T}/g.jsonl", "--temperature", "-1"],
            2,
            "--temperature must be >= 0",
            None,
        ),
        (
            "cli:generate-top-p",
            ["generate", "{R}", "--in", "{T}/data.jsonl", "--out", "{T}/g.jsonl", "--top-p", "0"],
            2,
            "--top-p must be in (0, 1]",
            None,
        ),
        (
            "cli:generate-batch-size",
            ["generate", "{R}", "--in", "{T}/data.jsonl", "--out", "{T}/g.jsonl", "--batch-size", "0"],
            2,
            "--batch-size must be >= 1",
            None,
        ),
        (
            "cli:dump-limit",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "--limit", "-1"],
            2,
            "--limit must be >= 0",
            None,
        ),
        ("cli:dump-out-is-dir", ["data", "dump", "{R}", "--out", "{T}/old"], 2, "is a directory", None),
        (
            "cli:dump-out-read-only",
            ["data", "dump", "{R}", "--out", "/sys/peftchat-test/d.jsonl"],
            2,
            "is not writable",
            None,
        ),
        ("cli:inspect-count", ["data", "inspect", "{R}", "--count", "0"], 2, "--count must be >= 1", None),
        ("cli:merge-no-out", ["merge", "--adapter", "{T}/old"], 2, "the following arguments are required: --out", None),
        (
            "cli:merge-dtype",
            ["merge", "--adapter", "{T}/old", "--out", "{T}/x", "--dtype", "int8"],
            2,
            "invalid choice: 'int8'",
            None,
        ),
        ("cli:tiny-model-arch", ["tiny-model", "{T}/m", "--arch", "gpt9"], 2, "invalid choice: 'gpt9'", None),
        (
            "cli:tiny-model-seed",
            ["tiny-model", "{T}/m", "--seed", str(2**64)],
            2,
            "--seed must be in [0, 2**64 - 1]",
            None,
        ),
        ("cli:chat-empty-message", ["chat", "{R}", "--message", " \n"], 2, "--message is empty", None),
        ("cli:dump-out-newline", ["data", "dump", "{R}", "--out", "{T}/d\n.jsonl"], 2, "'--out' is", None),
        (
            "cli:out-not-utf8",
            ["data", "dump", "{R}", "--out", "{T}/d\udcff.jsonl"],
            2,
            "d\\xff.jsonl' is not UTF-8 text",
            None,
        ),
        # ---- the output dir of a training run (checked before the model is loaded)
        (
            "train:output-dir-is-a-file",
            ["train", "{R}", "training.output_dir={T}/afile"],
            2,
            "exists and is not a directory",
            None,
        ),
        (
            "train:output-dir-under-a-file",
            ["train", "{R}", "training.output_dir={T}/afile/run"],
            2,
            "cannot be created: ",
            None,
        ),
        (
            "train:output-dir-read-only",
            ["train", "{R}", "training.output_dir=/sys/peftchat-test/run"],
            2,
            "training.output_dir /sys/peftchat-test/run is not writable",
            None,
        ),
        (
            "train:output-dir-holds-a-run",
            ["train", "{R}", "training.output_dir={T}/old"],
            2,
            "already holds a run (checkpoint-2); continue it with training.resume=true",
            None,
        ),
        (
            "train:resume-nothing",
            ["train", "{R}", "training.resume=true"],
            2,
            "has no complete checkpoint-STEP dir",
            None,
        ),
        ("train:resume-path-missing", ["train", "{R}", "training.resume={T}/old/checkpoint-9"], 2, "not found", None),
        (
            "train:resume-path-damaged",
            ["train", "{R}", "training.resume={T}/old/checkpoint-2"],
            2,
            "checkpoint-2 is damaged: trainer_state.json does not match its checksum",
            _p_damaged_checkpoint,
        ),
        (
            "train:second-writer",
            ["train", "{R}"],
            2,
            f"is in use by another peftchat train (pid {os.getpid()} on here",
            _p_held_output_dir,
        ),
        (
            "train:resume-while-running",
            ["train", "{R}", "training.resume=true"],
            2,
            f"is in use by another peftchat train (pid {os.getpid()} on here",
            _p_held_output_dir,
        ),
        (
            "train:resume-path-incomplete",
            ["train", "{R}", "training.resume={T}/old"],
            2,
            "is not a complete checkpoint",
            None,
        ),
        # ---- the base model
        ("model:missing", ["train", "{R}", "model.path={T}/nomodel"], 2, "model not found", None),
        ("model:not-a-model-dir", ["train", "{R}", "model.path={T}/old"], 2, "is not a transformers model dir", None),
        ("model:device-unknown", ["train", "{R}", "training.device=tpu"], 2, "'training.device' is 'tpu'", None),
        (
            "model:flash-attention-on-cpu",
            ["train", "{R}", "model.attn_implementation=flash_attention_2"],
            2,
            "needs a CUDA device",
            None,
        ),
        (
            "model:truncated-safetensors",
            ["train", "{R}", "model.path={T}/model"],
            2,
            "model.safetensors is truncated or damaged",
            _p_truncated_base,
        ),
        # ---- data files (data dump reads them as training does)
        (
            "data:missing",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/none.jsonl"],
            2,
            "file not found",
            None,
        ),
        (
            "data:invalid-json",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.jsonl"],
            2,
            "b.jsonl:2: invalid JSON",
            _p_files({"b.jsonl": messages_line() + '\n{"messages": \n'}),
        ),
        (
            "data:not-utf8",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.jsonl"],
            2,
            "b.jsonl:2: not UTF-8 text",
            _p_files({"b.jsonl": (messages_line() + "\n").encode() + b'{"x": "\xff"}\n'}),
        ),
        (
            "data:line-not-an-object",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.jsonl"],
            2,
            "b.jsonl:1: expected a JSON object, got list",
            _p_files({"b.jsonl": "[1, 2]\n"}),
        ),
        (
            "data:nested-100000-deep",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.jsonl"],
            2,
            "b.jsonl:2: JSON nested too deeply",
            _p_files({"b.jsonl": messages_line() + "\n" + DEEP + "\n"}),
        ),
        (
            "data:json-file-nested-deep",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.json"],
            2,
            "b.json: JSON nested too deeply",
            _p_files({"b.json": DEEP}),
        ),
        (
            "data:duplicate-json-key",
            DUMP_B,
            2,
            "b.jsonl:2: duplicate key 'content' in a JSON object",
            _p_files(
                {"b.jsonl": messages_line() + '\n{"messages": [{"role": "user", "content": "a", "content": "b"}]}\n'}
            ),
        ),
        (
            "data:lone-surrogate",
            DUMP_B,
            2,
            "b.jsonl:2: lone surrogate escape \\ud800",
            _p_files({"b.jsonl": messages_line() + '\n{"messages": [{"role": "user", "content": "\\ud800"}]}\n'}),
        ),
        (
            "data:invalid-utf8-in-a-string",
            DUMP_B,
            2,
            "b.jsonl:2: not UTF-8 text",
            _p_files(
                {
                    "b.jsonl": (messages_line() + "\n").encode()
                    + b'{"messages": [{"role": "user", "content": "\xc3("}]}\n'
                }
            ),
        ),
        (
            "data:nan-literal",
            DUMP_B,
            2,
            "b.jsonl:2: NaN is not valid JSON",
            _p_files({"b.jsonl": messages_line() + '\n{"messages": [], "score": NaN}\n'}),
        ),
        (
            "data:record-over-size-limit",
            [*DUMP_B, "data.max_record_bytes=300"],
            2,
            "b.jsonl:2: record of 988 bytes is over the limit of 300 bytes",
            _p_files({"b.jsonl": messages_line() + "\n" + messages_line("x" * 900) + "\n"}),
        ),
        (
            "data:json-array-duplicate-key",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.json"],
            2,
            "b.json[1]: duplicate key 'messages' in a JSON object (only one value would be kept) (line 3)",
            _p_files({"b.json": "[\n" + messages_line() + ',\n{"messages": [], "messages": []}\n]\n'}),
        ),
        (
            "data:two-user-turns-in-a-row",
            DUMP_B,
            2,
            "b.jsonl:2: messages[1]: two user turns in a row",
            _p_files(
                {
                    "b.jsonl": messages_line() + '\n{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}\n'
                }
            ),
        ),
        (
            "data:tool-result-with-no-call",
            DUMP_B,
            2,
            "b.jsonl:2: messages[2]: a tool result with no tool call before it",
            _p_files(
                {
                    "b.jsonl": messages_line() + '\n{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "b"}, {"role": "tool", "content": "t"}, '
                    '{"role": "assistant", "content": "c"}]}\n'
                }
            ),
        ),
        (
            "data:role-spelling-not-mapped",
            DUMP_B,
            2,
            "b.jsonl:2: messages[1].role is 'bot'; expected one of",
            _p_files(
                {
                    "b.jsonl": messages_line() + '\n{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "bot", "content": "b"}]}\n'
                }
            ),
        ),
        (
            "data:tools-the-template-cannot-render",
            DUMP_B,
            2,
            "b.jsonl:2: the conversation has a tool list, but the chat template of",
            _p_files(
                {
                    "b.jsonl": messages_line() + '\n{"tools": [{"name": "f"}], "messages": [{"role": "user", '
                    '"content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                }
            ),
        ),
        (
            "data:empty-file",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.jsonl"],
            2,
            "b.jsonl: no records",
            _p_files({"b.jsonl": "\n"}),
        ),
        (
            "data:unsupported-type",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.csv"],
            2,
            "unsupported data file type '.csv'",
            _p_files({"b.csv": "a,b\n"}),
        ),
        (
            "data:glob-matches-nothing",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/*.parquet"],
            2,
            "no file matches",
            None,
        ),
        (
            "data:dir-without-json",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/old"],
            2,
            "holds no .jsonl/.json files",
            None,
        ),
        (
            "data:json-scalar",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.json"],
            2,
            "expected a list of records (or JSON Lines), got int",
            _p_files({"b.json": "5"}),
        ),
        (
            "data:json-array-of-non-objects",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.json"],
            2,
            "b.json[1]: expected a JSON object",
            _p_files({"b.json": '[{"messages": []}, 3]'}),
        ),
        (
            "data:all-lines-bad-skip",
            ["data", "dump", "{R}", "--out", "{T}/d.jsonl", "data.train={T}/b.jsonl", "data.on_error=skip"],
            2,
            "no usable records",
            _p_files({"b.jsonl": "{\n[\n"}),
        ),
        ("data:eval-split-takes-all", ["train", "{R}", "data.eval_split=1000"], 2, "would hold out all", None),
        (
            "data:inspect-index-out-of-range",
            ["data", "inspect", "{R}", "--index", "999"],
            2,
            "--index 999 is out of range",
            None,
        ),
        # ---- merge (checked before anything is loaded)
        (
            "merge:adapter-missing",
            ["merge", "--adapter", "{T}/nope", "--out", "{T}/export"],
            2,
            "no such directory",
            None,
        ),
        (
            "merge:not-an-adapter-dir",
            ["merge", "--adapter", "{T}/old", "--out", "{T}/export"],
            2,
            "is not an adapter dir (no adapter_config.json)",
            None,
        ),
        (
            "merge:adapter-config-invalid-json",
            ["merge", "--adapter", "{T}/adapter", "--out", "{T}/export"],
            2,
            "adapter_config.json: invalid JSON",
            _p_adapter_bad_json,
        ),
        (
            "merge:adapter-weights-missing",
            ["merge", "--adapter", "{T}/adapter", "--out", "{T}/export"],
            2,
            "has no adapter_model.safetensors",
            _p_adapter_no_weights,
        ),
        (
            "merge:adapter-truncated",
            ["merge", "--adapter", "{T}/adapter", "--out", "{T}/export"],
            2,
            "adapter_model.safetensors is truncated or damaged",
            _p_truncated_adapter,
        ),
        (
            "merge:out-is-a-file",
            ["merge", "--adapter", "{T}/adapter", "--out", "{T}/afile"],
            2,
            "exists and is not a directory",
            _p_adapter,
        ),
        (
            "merge:out-not-empty",
            ["merge", "--adapter", "{T}/adapter", "--out", "{T}/export"],
            2,
            "exists and is not empty (use --force",
            _p_out_nonempty,
        ),
        (
            "merge:out-read-only",
            ["merge", "--adapter", "{T}/adapter", "--out", "/sys/peftchat-test/export"],
            2,
            "its parent /sys/peftchat-test is not writable",
            _p_adapter,
        ),
        (
            "merge:out-over-adapter",
            ["merge", "--adapter", "{T}/adapter", "--out", "{T}/adapter", "--force"],
            2,
            "would overwrite",
            _p_adapter,
        ),
        (
            "merge:base-missing",
            ["merge", "--adapter", "{T}/adapter", "--out", "{T}/export", "--base", "{T}/nomodel"],
            2,
            "nomodel: no such model dir",
            _p_adapter,
        ),
        # ---- chat / generate
        ("chat:source-missing", ["chat", "{T}/nope", "--message", "hi"], 2, "not found", None),
        ("chat:source-neither", ["chat", "{T}/old", "--message", "hi"], 2, "is neither an adapter dir", None),
        (
            "generate:in-missing",
            ["generate", "{R}", "--in", "{T}/none.jsonl", "--out", "{T}/g.jsonl"],
            2,
            "no such file",
            None,
        ),
        (
            "generate:in-invalid-json",
            ["generate", "{R}", "--in", "{T}/p.jsonl", "--out", "{T}/g.jsonl"],
            2,
            "p.jsonl:1: invalid JSON",
            _p_files({"p.jsonl": "{oops\n"}),
        ),
        (
            "generate:in-no-prompt",
            ["generate", "{R}", "--in", "{T}/p.jsonl", "--out", "{T}/g.jsonl"],
            2,
            "p.jsonl:1: needs a string 'prompt'",
            _p_files({"p.jsonl": '{"text": "hi"}\n'}),
        ),
        (
            "generate:in-not-utf8",
            ["generate", "{R}", "--in", "{T}/p.jsonl", "--out", "{T}/g.jsonl"],
            2,
            "not UTF-8 text",
            _p_files({"p.jsonl": b'{"prompt": "\xff"}\n'}),
        ),
        (
            "generate:in-nested-deep",
            ["generate", "{R}", "--in", "{T}/p.jsonl", "--out", "{T}/g.jsonl"],
            2,
            "p.jsonl:1: JSON nested too deeply",
            _p_files({"p.jsonl": '{"prompt": ' + DEEP + "}\n"}),
        ),
        (
            "generate:out-read-only",
            ["generate", "{R}", "--in", "{T}/data.jsonl", "--out", "/sys/peftchat-test/g.jsonl"],
            2,
            "is not writable",
            None,
        ),
    ]
)

# Rows that load a model before they fail may print progress notes first.
NOTES_OK = {"model:truncated-safetensors"}


def _fill(arg: str, t: Path) -> str:
    return arg.replace("{R}", str(t / "r.yaml")).replace("{T}", str(t))


def _check_one_line(err: str, message: str, notes_ok: bool) -> None:
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert lines, "nothing on stderr"
    if not notes_ok:
        assert len(lines) == 1, err
    assert lines[-1].startswith("peftchat") and ": error: " in lines[-1], err
    assert message in lines[-1], err


@pytest.mark.parametrize("row_id, argv, code, message, prep", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(world, make_adapter, capsys, row_id, argv, code, message, prep):
    if "/sys/" in " ".join(argv) and not os.path.isdir("/sys"):
        pytest.skip("needs /sys, a location nobody may write")
    if prep is not None:
        prep(world, make_adapter)
    before = snapshot(world)
    capsys.readouterr()
    try:
        rc = main([_fill(a, world) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    _check_one_line(err, message, row_id in NOTES_OK)
    assert snapshot(world) == before, "a failed command changed files"
    assert not os.path.exists("/sys/peftchat-test")


SKIPPABLE = [
    "data:invalid-json",
    "data:not-utf8",
    "data:nested-100000-deep",
    "data:duplicate-json-key",
    "data:lone-surrogate",
    "data:invalid-utf8-in-a-string",
    "data:nan-literal",
    "data:record-over-size-limit",
    "data:json-array-duplicate-key",
    "data:two-user-turns-in-a-row",
    "data:tool-result-with-no-call",
    "data:role-spelling-not-mapped",
    "data:tools-the-template-cannot-render",
]


@pytest.mark.parametrize("row_id", SKIPPABLE)
def test_bad_record_is_skipped_and_counted(world, make_adapter, capsys, row_id):
    """The same bad file with data.on_error=skip: exit 0, the good record dumped, the bad one
    counted and named in the report."""
    _, argv, _, message, prep = next(r for r in ROWS if r[0] == row_id)
    prep(world, make_adapter)
    capsys.readouterr()
    assert main([_fill(a, world) for a in argv] + ["data.on_error=skip"]) == 0
    out = capsys.readouterr()
    report = out.out + out.err
    assert "Traceback" not in report and "1 bad records skipped" in report, report
    assert message.split(": ", 1)[1] in report, report
    assert len((world / "d.jsonl").read_text(encoding="utf-8").splitlines()) == 1


def test_nan_loss_is_one_line_and_saves_nothing(world, capsys):
    """A base whose embeddings are inf: the loss of step 1 is NaN; exit 2 naming the step and
    micro-batch, no checkpoint and no final outputs (train/test_nonfinite.py: later steps, and skip)."""
    import torch
    from safetensors.torch import load_file, save_file

    from peftchat.config import load_recipe

    shutil.copytree(load_recipe(world / "r.yaml").model.path, world / "model")
    weights = load_file(str(world / "model" / "model.safetensors"))
    for name in weights:
        if "embed_tokens" in name:
            weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, str(world / "model" / "model.safetensors"), metadata={"format": "pt"})
    rc = main(["train", str(world / "r.yaml"), f"model.path={world / 'model'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    _check_one_line(err, "loss is nan at step 1, micro-batch 0 of epoch 0", notes_ok=True)
    assert not list((world / "run").glob("checkpoint-*")) and not (world / "run" / "complete").exists()
    assert not (world / "run" / "adapter_model.safetensors").exists()


def test_catalogue_has_100_classes():
    assert len({r[0] for r in ROWS}) == len(ROWS) >= 100


# ------------------------------------------------------------------------------ failures of the machine, and bugs


def _raiser(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _safetensors_full():
    from safetensors import SafetensorError

    return SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


# (id, module attribute to replace, exception factory, argv, exit code, message parts)
MACHINE_ROWS = [
    (
        "gpu-out-of-memory",
        "peftchat.train.loop.train",
        _oom,
        ["train", "{R}"],
        2,
        [
            "out of GPU memory",
            "training.batch_size",
            "data.max_length",
            "training.gradient_checkpointing=true",
            "training.checkpoint_offload=true",
            "model.quantization=4bit",
            "training.max_memory_gib",
        ],
    ),
    (
        "host-out-of-memory",
        "peftchat.train.loop.train",
        MemoryError,
        ["train", "{R}"],
        2,
        ["out of host memory", "training.batch_size"],
    ),
    (
        "disk-full-oserror",
        "peftchat.data.inspect.dump_samples",
        lambda: OSError(errno.ENOSPC, "No space left on device", "/data/d.jsonl"),
        ["data", "dump", "{R}", "--out", "{T}/d.jsonl"],
        2,
        ["no space left on the device writing /data/d.jsonl"],
    ),
    (
        "disk-full-safetensors",
        "peftchat.train.loop.train",
        _safetensors_full,
        ["train", "{R}"],
        2,
        ["no space left on the device", "no complete checkpoint was saved: free space, then run it again"],
    ),
    (
        "disk-full-torch-save",
        "peftchat.train.loop.train",
        lambda: RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
            "PytorchStreamWriter failed writing file data/0: file write failed"
        ),
        ["train", "{R}"],
        2,
        ["writing a file failed", "is the disk full?", "no complete checkpoint was saved"],
    ),
    (
        "permission-denied",
        "peftchat.data.inspect.dump_samples",
        lambda: PermissionError(errno.EACCES, "Permission denied", "/data/x.jsonl"),
        ["data", "dump", "{R}", "--out", "{T}/d.jsonl"],
        2,
        ["permission denied: /data/x.jsonl"],
    ),
    (
        "read-only-filesystem",
        "peftchat.data.inspect.dump_samples",
        lambda: OSError(errno.EROFS, "Read-only file system", "/data/x.jsonl"),
        ["data", "dump", "{R}", "--out", "{T}/d.jsonl"],
        2,
        ["read-only file system: /data/x.jsonl"],
    ),
    (
        "internal-error",
        "peftchat.config.recipe_to_yaml",
        lambda: RuntimeError("boom\nsecond line"),
        ["config", "{R}"],
        1,
        ["internal error (RuntimeError: boom); traceback in ", "please report it"],
    ),
    (
        "internal-recursion-error",
        "peftchat.config.recipe_to_yaml",
        lambda: RecursionError("maximum recursion depth"),
        ["config", "{R}"],
        1,
        ["internal error (RecursionError: maximum recursion depth); traceback in "],
    ),
]


@pytest.mark.parametrize("row_id, target, exc, argv, code, parts", MACHINE_ROWS, ids=[r[0] for r in MACHINE_ROWS])
def test_machine_failure_or_bug_is_one_line(
    world, tmp_path_factory, monkeypatch, capsys, row_id, target, exc, argv, code, parts
):
    import importlib

    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _raiser(exc()))
    before = snapshot(world)
    rc = main([_fill(a, world) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and len(err.strip("\n").splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)
    assert snapshot(world) == before
    logs = list(state.rglob("crash-*.log"))
    if code == 1:  # a bug: the traceback is in the log the line names
        assert len(logs) == 1 and str(logs[0]) in err
        text = logs[0].read_text(encoding="utf-8")
        assert "Traceback (most recent call last)" in text and type(exc()).__name__ in text and "config" in text
    else:
        assert logs == []

"""Recipes: typed OmegaConf YAML with `extends`, `key=value` overrides and interpolation.

A recipe is layered, lowest first: the schema defaults below, the chain of parent recipes named by
`extends` (each resolved relative to the file that names it), the recipe file itself, then the
command-line overrides. Every layer is checked for unknown keys and wrong types on its own, so an
error names the file (or the override) it came from.

Each recipe key is declared once, as a field of the schema below (the manner of litgpt's
`litgpt/args.py`): its type (the annotation), default, one-line doc, allowed values (`choices=`,
`range=` or a normalizing `check=`) and resume policy (`resume=`). Everything else is generated
from that declaration: validation (`_validate`: one line naming the key, exit 2), the resume rules
(`peftchat.train.resume.key_kind`), `peftchat config --explain [KEY]` and the README's table of
keys (`peftchat config --explain --markdown`; `python -m peftchat.config --update-readme README.md`
rewrites it, and tests/test_config_keys.py fails while the README's differs).

To add a key: add one field to its section, e.g.

    beta: float = key(0.1, "DPO: strength of the pull towards the reference model", range=POSITIVE)

(a numeric key needs a `range=`; a string with a fixed set of values `choices=`; a key that only
says how a run is carried out, not what it learns, `resume=RUNTIME`; the default `TRAINED` refuses
a change on resume), then regenerate the README table. A rule between several keys (fp8 needs
fused_lora, ...) goes in `_validate_training` / `_validate_distributed`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import errno
import math
import os
import stat
import sys
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from peftchat.demo_assets import TINY_ARCHS
from peftchat.errors import ConfigError
from peftchat.shipped_recipes import resolve_recipe_name, shipped_path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


# ------------------------------------------------------------------------------ numeric ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: `low`/`high` bounds (None = unbounded), each inclusive
    unless `*_open`. NaN is never inside. `whole_from`: values at or above it must be whole numbers
    (`data.eval_split`: a share below 1, a count of sessions from 1 on)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    whole_from: Optional[float] = None

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: Optional[float]) -> str:
    """A bound as written: whole numbers in full (the seed's 4294967295, not 4.29497e+09)."""
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Range(0, low_open=True), Range(0), Range(1)
# Bounds of what a run can mean, for keys without a high bound of their own: an integer key above
# MAX_COUNT (a step count, a batch, a length, ...) would not finish or fit in any run (torch and
# numpy take such counts as int32 or int64 in places, and 2**70 trains or fails deep inside), and
# a float key must be finite. A source weight or `epochs` repeats the data that many times.
MAX_COUNT = 2**31 - 1
MAX_EPOCHS = MAX_WEIGHT = 1e6
SHARE = Range(0, 1, high_open=True)  # a probability or fraction that must leave something


# ------------------------------------------------------------------------------ key declarations

# Resume policies: what a resumed run may change against its checkpoint's recipe.
TRAINED = "trained"  # changes what is learned: a resume that changes it stops (exit 2) unless resume_changes=allow
SCHEDULE = "schedule"  # shapes only the future (length, intervals): may change; a new length re-plans the lr
RUNTIME = "runtime"  # how the run is carried out, not what it learns: may change, not recorded
RESUME_POLICIES = {
    TRAINED: "a change stops the resume (exit 2) unless training.resume_changes=allow, which records it",
    SCHEDULE: "may change; a new run length re-plans the rest of the lr schedule",
    RUNTIME: "may change",
}


@dataclass(frozen=True)
class KeySpec:
    """What a key's declaration says beyond its type and default (see `key`)."""

    doc: str
    choices: Optional[tuple] = None
    range: Optional[Range] = None
    check: Optional[Callable[[str, Any], Any]] = None
    resume: str = TRAINED
    allowed: Optional[str] = None
    shown_type: Optional[str] = None


def key(
    default: Any,
    doc: str,
    *,
    choices: Optional[Iterable] = None,
    range: Optional[Range] = None,
    check: Optional[Callable[[str, Any], Any]] = None,
    resume: str = TRAINED,
    allowed: Optional[str] = None,
    type: Optional[str] = None,
) -> Any:
    """A recipe key, declared once: `default` (MISSING: required), its one-line `doc`, the values it
    takes (`choices`, a numeric `range`, or `check(key, value)` -> the normalized value, raising
    ConfigError), its `resume` policy, and for `--explain` the `allowed` values and `type` where
    the annotation does not say them (a key typed Any)."""
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume policy {resume!r} is none of {', '.join(RESUME_POLICIES)}")
    spec = KeySpec(doc, tuple(choices) if choices is not None else None, range, check, resume, allowed, type)
    return field(default=default, metadata={"key": spec})


# YAML and `key=value` spellings of a tri-state / boolean-or-path key.
_BOOLEANS = {"true": True, "false": False}


def _auto_or_bool(key: str, value: Any) -> Any:
    """A tri-state key as "auto", True or False, whichever way YAML or `key=value` spelled it."""
    word = str(value).strip().lower()
    if word not in ("auto", *_BOOLEANS):
        raise ConfigError(f"'{key}' is {value!r}; expected one of auto, true, false")
    return _BOOLEANS.get(word, "auto")


def _bool_or_path(key: str, value: Any) -> Any:
    """`training.resume` as a bool or a path str (`true` typed on the command line is a bool)."""
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        value = _BOOLEANS[value.strip().lower()]
    if not isinstance(value, (bool, str)) or value == "":
        raise ConfigError(f"'{key}' must be false, true or a checkpoint path, got {value!r}")
    return value


def _module_names(key: str, value: Any) -> Any:
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))):
        raise ConfigError(f"'{key}' must be 'all-linear' or a list of names, got {value!r}")
    return value


DTYPES = ("bf16", "fp16", "fp32")
DATA_FORMATS = ("auto", "moss", "chatglm", "messages", "sharegpt", "alpaca", "preference")
DATA_FORMS = "a file, glob, dataset dir or hub name, a {path, format, weight} mapping, or a list of those"
TRI_STATE: dict[str, Any] = dict(
    check=_auto_or_bool, allowed="auto | true | false", type="auto or bool", resume=RUNTIME
)


# ------------------------------------------------------------------------------ the schema


@dataclass
class ModelConfig:
    path: str = key(MISSING, "local dir or hub id of the base model")
    tokenizer: Optional[str] = key(None, "tokenizer dir or hub id; null = model.path")
    dtype: str = key("bf16", "dtype of the weights that are not quantized", choices=DTYPES)
    quantization: str = key(
        "none", "base weights through bitsandbytes: 8bit (LLM.int8) or 4bit (QLoRA)", choices=("none", "8bit", "4bit")
    )
    quant_type: str = key("nf4", "4bit only: the 4-bit data type", choices=("nf4", "fp4"))
    double_quant: bool = key(True, "4bit only: quantize the quantization constants too")
    compute_dtype: str = key("bf16", "dtype of matmuls on quantized weights", choices=DTYPES)
    attn_implementation: str = key(
        "sdpa",
        "attention kernel (transformers' names; sdpa_varlen: peftchat's flash attention over packed rows, "
        "which packed CUDA training takes for sdpa; sdpa_masked: sdpa with packed rows through its block mask)",
        choices=(
            "sdpa",
            "sdpa_varlen",
            "sdpa_masked",
            "eager",
            "flash_attention_2",
            "flash_attention_3",
            "flex_attention",
        ),
        resume=RUNTIME,
    )
    trust_remote_code: bool = key(False, "run the Python code of the model's own repository (custom models)")
    revision: Optional[str] = key(None, "hub revision (branch, tag or commit) of model.path")
    # Demo recipes build their tiny model, so the demo runs from an empty directory.
    tiny_if_missing: Optional[str] = key(
        None,
        "demo recipes: build a random-init tiny model of this family at model.path when nothing is there "
        "(never over a hub id)",
        choices=TINY_ARCHS,
        resume=RUNTIME,
    )


@dataclass
class AdapterConfig:
    r: int = key(16, "LoRA rank", range=POSITIVE)
    alpha: int = key(
        32, "LoRA scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora)", range=POSITIVE
    )
    dropout: float = key(0.05, "dropout on the LoRA input", range=SHARE)
    target_modules: Any = key(
        "all-linear",
        "modules that get LoRA: all-linear (every linear layer but the head) or a list of module names",
        check=_module_names,
        allowed="all-linear | [name, ...]",
        type="str or list",
    )
    use_dora: bool = key(False, "DoRA: weight-decomposed LoRA")
    use_rslora: bool = key(False, "rank-stabilized LoRA: scale by alpha / sqrt(r)")
    modules_to_save: Optional[List[str]] = key(
        None, "modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head])"
    )
    bias: str = key(
        "none", "bias terms trained: none, all, or those of the LoRA layers", choices=("none", "all", "lora_only")
    )
    init_from: Optional[str] = key(
        None, "a finished run dir or checkpoint: start from its adapter weights (SFT -> DPO); null = a fresh adapter"
    )


@dataclass
class DataConfig:
    train: Any = key(
        MISSING,
        "the training data; a mapping's format applies to its source, its weight repeats its "
        "records (2 = each twice, 0.5 = a seeded half)",
        type="source or list",
        allowed=DATA_FORMS,
    )
    eval: Any = key(
        None,
        "held-out data; null: data.eval_split carves some out of data.train",
        type="source or list",
        allowed="as data.train | null",
    )
    eval_split: float = key(
        0.0,
        "sessions of data.train held out for evaluation when data.eval is null: a share "
        "below 1, or a number of sessions",
        range=Range(0, whole_from=1),
    )
    format: str = key(
        "auto", "record format of the sources that name none (auto: detected per source)", choices=DATA_FORMATS
    )
    # the formats registry (peftchat.formats) checks the name: config cannot import it
    collator: str = key(
        "chat_template",
        "the conversation format: how records become tokens",
        allowed="chatglm | moss | chat_template (peftchat.formats.registry)",
    )
    max_length: int = key(2048, "max tokens per sample (moss, chat_template)", range=POSITIVE)
    max_source_length: int = key(1024, "chatglm: max prompt tokens (ChatGLM-6B's S)", range=POSITIVE)
    max_target_length: int = key(128, "chatglm: max answer tokens (ChatGLM-6B's T)", range=POSITIVE)
    prompt_column: str = key("prompt", "chatglm rows: the prompt's column")
    response_column: str = key("response", "chatglm rows: the answer's column")
    history_column: Optional[str] = key(
        "history", "chatglm rows: the earlier rounds' column; null = bare query prompt, no [Round] text"
    )
    source_prefix: str = key("", "chatglm: text put in front of every prompt")
    chatglm_style: str = key(
        "chatglm", "chatglm prompt layout: ChatGLM-6B's or ChatGLM2's", choices=("chatglm", "chatglm2")
    )
    separator_tokens: Optional[List[str]] = key(None, "chatglm: tokens between prompt and answer")
    truncation: str = key(
        "seed",
        "a sample over its limit: seed cuts the tail, drop_oldest first drops whole oldest rounds",
        choices=("seed", "drop_oldest"),
    )
    loss_on: str = key(
        "auto",
        "tokens that carry loss: auto = the format's own (moss also trains the <|Human|> "
        "turns, as MOSS's trainer; chatglm and chat_template the assistant answers), all (moss only), "
        "assistant (= all_assistant), last_assistant",
        choices=("auto", "all", "all_assistant", "assistant", "last_assistant"),
    )
    meta_instruction: Optional[str] = key(None, "system message when a record has none (training and chat)")
    on_error: str = key("stop", "a bad record stops the run, or is skipped and counted", choices=("stop", "skip"))
    # ROLE_TARGETS (below) is what a spelling may map to; any other spelling is a bad record
    roles: Optional[Dict[str, str]] = key(
        None,
        "messages/sharegpt: role spellings beyond the documented ones, e.g. {bot: assistant}",
        type="mapping or null",
    )
    # null: far more than any sample can hold, so only runaway records hit it
    max_record_bytes: Optional[int] = key(
        None,
        "a JSON record longer than this is bad (data.on_error), before it is "
        "parsed; null = max(1 MiB, 256 bytes per token of the sample limit)",
        range=POSITIVE,
        resume=RUNTIME,
    )
    packing: bool = key(False, "padding-free rows of several samples")
    group_by_length: bool = key(False, "batch samples of similar length (when packing is off)")
    shuffle: bool = key(True, "shuffle the samples each epoch (seeded by training.seed)")
    num_proc: int = key(1, "processes for tokenization (datasets.map)", range=AT_LEAST_1, resume=RUNTIME)
    cache_dir: Optional[str] = key(None, "where datasets caches the tokenized data", resume=RUNTIME)


@dataclass
class TrainingConfig:
    output_dir: str = key("outputs/run", "the run dir: checkpoints, metrics and the final adapter", resume=RUNTIME)
    batch_size: int = key(4, "micro-batch size per process", range=POSITIVE)
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", range=POSITIVE)
    lr: float = key(2e-4, "peak learning rate", range=POSITIVE)
    weight_decay: float = key(
        0.0, "AdamW weight decay of the matrices (biases, norms, DoRA magnitudes get none)", range=NON_NEGATIVE
    )
    lr_scheduler: str = key("cosine", "lr curve after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = key(0, "steps of linear lr warmup", range=NON_NEGATIVE)
    warmup_ratio: float = key(0.0, "warmup as a share of the run's steps, when warmup_steps is 0", range=Range(0, 1))
    epochs: float = key(
        1.0,
        "passes over the data (fractions allowed), when max_steps is not > 0",
        range=Range(0, MAX_EPOCHS, low_open=True),
        resume=SCHEDULE,
    )
    max_steps: int = key(
        -1,
        "> 0: exactly this many optimizer steps (overrides epochs); -1 or 0: train epochs",
        range=Range(-1),
        resume=SCHEDULE,
    )
    max_grad_norm: float = key(1.0, "gradient clipping norm; 0 = no clipping", range=NON_NEGATIVE)
    optimizer: str = key(
        "adamw",
        "adamw (torch), or bitsandbytes' adamw_8bit / paged_adamw_8bit",
        choices=("adamw", "paged_adamw_8bit", "adamw_8bit"),
    )
    adam_beta1: float = key(0.9, "Adam beta1", range=SHARE)
    adam_beta2: float = key(0.999, "Adam beta2", range=SHARE)
    adam_eps: float = key(1e-8, "Adam epsilon", range=POSITIVE)
    gradient_checkpointing: bool = key(
        True, "recompute decoder-layer activations in backward: less memory, more compute", resume=RUNTIME
    )
    checkpoint_skip_layers: int = key(
        0, "last N decoder layers not checkpointed: faster, costs their activations", range=NON_NEGATIVE, resume=RUNTIME
    )
    checkpoint_offload: bool = key(False, "CUDA: checkpointed layer inputs wait in pinned host memory", resume=RUNTIME)
    max_memory_gib: Optional[float] = key(
        None,
        "GPU memory budget: the fastest checkpoint_skip_layers / "
        "checkpoint_offload that fits (overrides both); null = no budget",
        range=POSITIVE,
        resume=RUNTIME,
    )
    fused_kernels: Any = key(
        "auto", "liger-kernel RMSNorm / SwiGLU / RoPE and the fused linear cross-entropy", **TRI_STATE
    )
    autocast: bool = key(
        True, "CUDA, bf16 base: run the step under bf16 autocast (LoRA math in bf16, no fp32 casts)", resume=RUNTIME
    )
    compile: bool = key(
        False, "torch.compile each decoder layer (pays on long runs; the first steps compile)", resume=RUNTIME
    )
    fused_lora: Any = key("auto", "LoRA and the frozen base linear as one autograd function", **TRI_STATE)
    fp8: bool = key(
        False,
        "CUDA capability >= 9.0: frozen base matmuls in FP8 (e4m3, per-row/channel scales); LoRA stays bf16",
        resume=RUNTIME,
    )
    seed: int = key(42, "seed of the LoRA init, shuffling and dropout", range=Range(0, 2**32 - 1))  # numpy's range
    save_steps: int = key(
        100, "a checkpoint every N optimizer steps; 0 = only at the end", range=NON_NEGATIVE, resume=SCHEDULE
    )
    save_total_limit: int = key(2, "checkpoints kept; 0 = all", range=NON_NEGATIVE, resume=SCHEDULE)
    eval_steps: int = key(
        100,
        "an evaluation every N steps; 0 = only at the end (when there is eval data)",
        range=NON_NEGATIVE,
        resume=SCHEDULE,
    )
    # the CLI passes `peftchat eval`'s scorer in (train cannot import infer)
    eval_generate: int = key(
        0,
        "N > 0: each evaluation also scores greedy answers to N eval samples (BLEU-4, ROUGE)",
        range=NON_NEGATIVE,
        resume=RUNTIME,
    )
    log_steps: int = key(10, "a metrics row every N steps", range=POSITIVE, resume=SCHEDULE)
    resume: Any = key(
        False,
        "false, true (the newest complete checkpoint of output_dir) or a checkpoint path",
        check=_bool_or_path,
        allowed="false | true | a checkpoint path",
        type="bool or path",
        resume=RUNTIME,
    )
    resume_changes: str = key(
        "refuse",
        "a resumed recipe that changes a key marked 'trained': refuse (exit 2) or allow (recorded)",
        choices=("refuse", "allow"),
        resume=RUNTIME,
    )
    on_nan: str = key(
        "stop",
        "a NaN/inf loss stops the run (exit 2), or its optimizer step is dropped and counted",
        choices=("stop", "skip"),
        resume=RUNTIME,
    )
    # checked where the device is resolved (peftchat.model.load.resolve_device)
    device: str = key("auto", "where to train", allowed="auto | cpu | cuda | cuda:N", resume=RUNTIME)
    tensorboard: bool = key(True, "also log to TensorBoard, when it is installed", resume=RUNTIME)
    # Preference tuning (README "Preference tuning"; the math: peftchat/train/preference.py).
    objective: str = key(
        "sft",
        "what is trained: sft on answers, or dpo / orpo / simpo on chosen/rejected pairs",
        choices=("sft", "dpo", "orpo", "simpo"),
    )
    beta: float = key(0.1, "dpo: KL strength; orpo: odds-ratio weight; simpo: reward scale", range=POSITIVE)
    label_smoothing: float = key(
        0.0, "dpo, simpo: conservative (cDPO) share of flipped labels", range=Range(0, 0.5, high_open=True)
    )
    simpo_gamma: float = key(0.5, "simpo: target reward margin", range=NON_NEGATIVE)
    reference: str = key(
        "auto",
        "dpo reference: base (adapter off), precomputed (once, cached in the run dir), "
        "auto (precomputed with adapter.init_from, else base)",
        choices=("auto", "base", "precomputed"),
    )


@dataclass
class DistributedConfig:
    """Used only under `torchrun` (README "Several GPUs"); a single process ignores it."""

    strategy: str = key(
        "ddp",
        "ddp (replicate, reduce gradients) or fsdp (FSDP2 fully_shard: shard the base)",
        choices=("ddp", "fsdp"),
        resume=RUNTIME,
    )
    quant_storage: str = key(
        "auto",
        "storage dtype of 4-bit weights: auto = model.compute_dtype under fsdp (FSDP2 "
        "shards them with the other weights), uint8 otherwise",
        choices=("auto", "uint8", *DTYPES),
        resume=RUNTIME,
    )
    find_unused_parameters: bool = key(False, "ddp: only if some trainable parameter gets no gradient", resume=RUNTIME)
    reshard_after_forward: bool = key(
        True, "fsdp: free gathered layers after forward (false: more memory, less traffic)", resume=RUNTIME
    )
    timeout_s: int = key(
        1800,
        "a collective that waits longer fails the job (also the wait for process 0's data preparation)",
        range=POSITIVE,
        resume=RUNTIME,
    )


@dataclass
class DecodingConfig:
    max_new_tokens: int = key(256, "tokens generated per answer at most", range=AT_LEAST_1, resume=RUNTIME)
    temperature: float = key(0.7, "sampling temperature; 0 = greedy", range=NON_NEGATIVE, resume=RUNTIME)
    top_k: int = key(40, "sample from the k likeliest tokens; 0 = no top-k filter", range=NON_NEGATIVE, resume=RUNTIME)
    top_p: float = key(
        0.8, "nucleus sampling mass; 1 = no nucleus filter", range=Range(0, 1, low_open=True), resume=RUNTIME
    )
    repetition_penalty: float = key(
        1.02, "penalty on tokens already in the context; 1 = none", range=POSITIVE, resume=RUNTIME
    )
    max_context: Optional[int] = key(
        None, "chat history budget in tokens; null = data.max_length", range=POSITIVE, resume=RUNTIME
    )


@dataclass
class Recipe:
    name: str = key("peftchat", "the run's name", resume=RUNTIME)
    description: str = key("", "what the recipe is for", resume=RUNTIME)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)


@dataclass(frozen=True)
class KeyInfo:
    """One recipe key as its declaration gives it, under its dotted name."""

    name: str
    type: str  # the annotation as written, e.g. "Optional[int]"
    default: Any
    spec: KeySpec

    @property
    def optional(self) -> bool:
        return self.type.startswith("Optional[")


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Map every dotted key of the schema to its field type (dataclass fields recurse)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        ftype = f.default_factory
        if ftype is not dataclasses.MISSING and is_dataclass(ftype):
            out[name] = ftype
            out.update(_schema_keys(ftype, name + "."))
        else:
            out[name] = f.type
    return out


def _declared_keys(cls: type, prefix: str = "") -> dict[str, KeyInfo]:
    out: dict[str, KeyInfo] = {}
    for f in fields(cls):
        if f.default_factory is not dataclasses.MISSING and is_dataclass(f.default_factory):
            out.update(_declared_keys(f.default_factory, f"{prefix}{f.name}."))
        elif "key" not in f.metadata:
            raise TypeError(f"recipe key {prefix}{f.name} is not declared with config.key()")
        else:
            out[f"{prefix}{f.name}"] = KeyInfo(f"{prefix}{f.name}", str(f.type), f.default, f.metadata["key"])
    return out


SCHEMA_KEYS = _schema_keys(Recipe)  # sections too: {dotted name: field type or section class}
KEYS: dict[str, KeyInfo] = _declared_keys(Recipe)  # the keys themselves, in schema order
# Views of the declarations, for readers that want one aspect.
CHOICES: dict[str, tuple] = {k: i.spec.choices for k, i in KEYS.items() if i.spec.choices is not None}
RANGES: dict[str, Range] = {k: i.spec.range for k, i in KEYS.items() if i.spec.range is not None}

EXTENDS_KEY = "extends"


@dataclass(frozen=True)
class DataSource:
    """One entry of `data.train` / `data.eval`: where its records are, their format (None = the
    recipe's `data.format`) and the per-epoch multiplier of its records (2 = each twice, 0.5 = a
    seeded half)."""

    path: str
    format: Optional[str] = None
    weight: float = 1.0
    tools: Optional[tuple] = None  # messages/sharegpt: the tool list of records that have none


SOURCE_KEYS = ("path", "format", "weight", "tools")
ROLE_TARGETS = ("system", "user", "assistant", "tool", "function_call")  # what data.roles maps to


def data_sources(value: Any, key: str) -> list[DataSource]:
    """The entries of `data.train` / `data.eval` (a path, a mapping, or a list of those), checked."""
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise ConfigError(f"'{key}' is an empty list; expected at least one data file or dataset")
    out: list[DataSource] = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(entry, str):  # "" too: chat on a bare model dir builds a recipe with no data
            out.append(DataSource(entry))
            continue
        if not isinstance(entry, dict):
            raise ConfigError(
                f"'{where}' must be a path, a dataset name or a mapping {{path, format, weight}}, got {entry!r}"
            )
        for k in entry:
            if k not in SOURCE_KEYS:
                close = difflib.get_close_matches(str(k), SOURCE_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"'{where}.{k}': unknown key{hint}; a data source takes {', '.join(SOURCE_KEYS)}")
        path, fmt, weight = entry.get("path"), entry.get("format"), entry.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            raise ConfigError(f"'{where}.path' must be a file, glob, dataset dir or dataset name, got {path!r}")
        formats = CHOICES["data.format"]
        if fmt is not None and fmt not in formats:
            close = difflib.get_close_matches(str(fmt), formats, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'{where}.format' is {fmt!r}; expected one of {', '.join(formats)}{hint}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= MAX_WEIGHT:
            raise ConfigError(
                f"'{where}.weight' must be a number in (0, {MAX_WEIGHT:g}] (0 takes nothing: leave "
                f"the source out), got {weight!r}"
            )
        tools = entry.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ConfigError(f"'{where}.tools' must be a list of tool objects, got {tools!r:.60}")
        out.append(DataSource(path, fmt, float(weight), tuple(tools) if tools else None))
    return out


def _asset_resolver(name: str) -> str:
    return str(ASSETS_DIR / name)


# `${asset:demo/moss_demo.jsonl}` points into the installed package, so shipped recipes work
# from any working directory.
if not OmegaConf.has_resolver("asset"):
    with warnings.catch_warnings():  # omegaconf 2.4 renamed register_new_resolver; 2.3 lacks the new one
        warnings.simplefilter("ignore", UserWarning)
        OmegaConf.register_new_resolver("asset", _asset_resolver)


def _suggest(key: str) -> str:
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in SCHEMA_KEYS if k.startswith(parent) and "." not in k[len(parent) :]]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if not close:  # a key put under the wrong section: look everywhere by its last part
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in SCHEMA_KEYS if k.rsplit(".", 1)[-1] == leaf]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(node: Any, source: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key of `node` that the schema does not have."""
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        key = f"{prefix}{k}"
        if key not in SCHEMA_KEYS:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
        if is_dataclass(SCHEMA_KEYS[key]):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping of keys, got {v!r}")
            _check_keys(v, source, key + ".")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key '{key}' (first set on line {first})")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error instead of the last
    one silently winning (OmegaConf takes the loaded dict as it is). Keys merged in with `<<` may
    be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base loader reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path} (`peftchat recipes` lists the shipped ones)") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe path is a directory, not a YAML file: {path}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: {e}") from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def _load_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """Return (source, raw dict) layers for `path` and its `extends` ancestors, parents first."""
    check_regular_file(path, "recipe", ConfigError)
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"circular 'extends': {cycle}")
    data = _read_yaml(path)
    parents = data.pop(EXTENDS_KEY, None)
    layers: list[tuple[str, dict]] = []
    if parents is not None:
        for parent in [parents] if isinstance(parents, str) else list(parents):
            if not isinstance(parent, str):
                raise ConfigError(f"{path}: 'extends' must be a path or a list of paths")
            parent_path = path.parent / os.path.expanduser(parent)
            if not parent_path.exists() and shipped_path(parent) is not None:
                # a copied recipe (`peftchat recipes copy`) still extends its shipped parent
                parent_path = resolve_recipe_name(parent, f"{path}: extends")
            if not parent_path.exists():
                raise ConfigError(f"{path}: extends '{parent}', which is not found at {parent_path}")
            layers.extend(_load_layers(parent_path, (*chain, path)))
    layers.append((str(path), data))
    return layers


def is_override(arg: str) -> bool:
    """Whether a command-line argument is a `key=value` recipe override."""
    return "=" in arg and not arg.startswith(("=", "-"))


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`key=value` items (dotted keys, YAML values) as a nested dict; the one parser of them."""
    items = list(overrides)
    for item in items:
        if not is_override(item):
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # a path of bytes that are not UTF-8: a recipe is UTF-8 YAML
            shown = os.fsencode(item).decode("utf-8", "backslashreplace")
            raise ConfigError(
                f"override '{shown}' is not UTF-8 text; recipes and the run's recipe.yaml are "
                "UTF-8, so use a UTF-8 name"
            ) from None
        key, value = item.split("=", 1)
        if key in PATH_KEYS or key.startswith(("data.train", "data.eval")):  # before YAML folds a line break
            check_path_text(key, value)
        try:  # one at a time, so that the error names the override
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:  # a value that is not YAML, say an unclosed `[`
            what = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
            raise ConfigError(
                f"override '{key}': its value {value!r} is not valid YAML ({what or e}); "
                "a list is written [a, b], quoted when it holds spaces or commas"
            ) from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{key}': {str(e).splitlines()[0]}") from None
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {e}") from None


def _merge_layer(base: DictConfig, raw: dict, source: str) -> DictConfig:
    _check_keys(raw, source)
    try:
        return OmegaConf.merge(base, raw)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: wrong value for '{key}': {msg}") from None


PATH_KEYS = ("model.path", "model.tokenizer", "data.cache_dir", "training.output_dir", "training.resume")


def check_regular_file(path: Path, what: str, error: type[Exception]) -> None:
    """`error` for a `what` path that exists but is no file that can be read to its end: a FIFO
    (read blocks until someone writes), a device (/dev/zero never ends), a socket, or a symlink
    loop. A missing path and a directory pass: the reader says those in its own words."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what} {path}: a loop of symbolic links; point it at a file") from None
        return  # permission and the like: the read names it
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise error(f"{what} {path} is {kind}, not a regular file; give a file") from None


def check_path_text(name: str, value: Any) -> None:
    """ConfigError for a path holding a line break or NUL: no file a user means is named so (a
    pasted line ending, a script's bad quoting), and it would split the one-line messages."""
    if isinstance(value, str) and any(c in value for c in "\n\r\0"):
        raise ConfigError(f"'{name}' is {value!r}: a path with a line break or NUL; remove it")


def _owner(recipe: Recipe, name: str) -> tuple[Any, str]:
    """(the section object holding dotted key `name`, the key's last part)."""
    *sections, attr = name.split(".")
    owner: Any = recipe
    for section in sections:
        owner = getattr(owner, section)
    return owner, attr


def _check_declared(recipe: Recipe, info: KeyInfo) -> None:
    """ConfigError when the key's value is not among its `choices`, or its `check` refuses it;
    a `check` may also normalize the value (YAML's several spellings of one thing)."""
    owner, attr = _owner(recipe, info.name)
    value, spec = getattr(owner, attr), info.spec
    if spec.choices is not None and value is not None and value not in spec.choices:
        allowed = [str(c) for c in spec.choices]
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'{info.name}' is {value!r}; expected one of {', '.join(allowed)}{hint}")
    if spec.check is not None:
        setattr(owner, attr, spec.check(info.name, value))


def _validate(recipe: Recipe) -> None:
    for info in KEYS.values():
        _check_declared(recipe, info)
    paths = {
        "model.path": recipe.model.path,
        "model.tokenizer": recipe.model.tokenizer,
        "data.cache_dir": recipe.data.cache_dir,
        "training.output_dir": recipe.training.output_dir,
        "adapter.init_from": recipe.adapter.init_from,
    }
    for name in ("data.train", "data.eval"):
        value = getattr(recipe.data, name.split(".")[1])
        if value is not None:
            for i, source in enumerate(data_sources(value, name)):
                paths[f"{name}[{i}]" if isinstance(value, list) else name] = source.path
    for spelling, role in (recipe.data.roles or {}).items():
        if role not in ROLE_TARGETS:
            raise ConfigError(f"'data.roles.{spelling}' is {role!r}; expected one of {', '.join(ROLE_TARGETS)}")
    _validate_training(recipe.training)
    if recipe.training.objective != "sft" and recipe.data.packing:
        # a pair is scored as two whole rows (chosen, rejected) of one concatenated batch
        raise ConfigError(
            f"'data.packing' does not apply to training.objective={recipe.training.objective}; set data.packing=false"
        )
    if isinstance(recipe.training.resume, str):
        paths["training.resume"] = recipe.training.resume
    for name, value in paths.items():
        check_path_text(name, value)
    _validate_distributed(recipe)


def range_error(name: str, value: Any) -> Optional[str]:
    """Why `value` is not allowed for the numeric key `name` (None when it is, or the key has no range)."""
    allowed = RANGES.get(name)
    if allowed is None or value is None or isinstance(value, bool):
        return None
    if value not in allowed:
        return f"must be {allowed}, got {value}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and allowed.high is None and abs(value) > MAX_COUNT:
        return f"must be at most {MAX_COUNT} (no run reaches more), got {value}"
    if allowed.whole_from is not None and value >= allowed.whole_from and value != int(value):
        return f"must be a share below {_number(allowed.whole_from)} or a whole number of sessions, got {value}"
    return None


def validate_ranges(recipe: Recipe) -> None:
    """ConfigError naming the first numeric key of `recipe` outside its declared range."""
    for name in RANGES:
        owner, attr = _owner(recipe, name)
        problem = range_error(name, getattr(owner, attr, None))
        if problem:
            raise ConfigError(f"'{name}' {problem}")


def _validate_training(t: TrainingConfig) -> None:
    """The rules between training keys (each key's own values are its declaration's)."""
    if t.fp8 and t.fused_lora is False:
        raise ConfigError(
            "'training.fp8' runs the base matmuls inside the fused LoRA function; "
            "set 'training.fused_lora' to auto or true"
        )
    if (t.fp8 or t.fused_lora is True) and t.compile:
        # the fused function dequantizes bitsandbytes weights, which torch.compile cannot trace
        raise ConfigError("'training.compile' cannot be combined with 'training.fp8' or 'training.fused_lora: true'")
    if t.objective != "sft" and t.fp8:
        # the reference forward (adapter off) and the pair loss were checked in bf16 only
        raise ConfigError(f"'training.fp8' is for training.objective=sft; got objective {t.objective}")


def _validate_distributed(recipe: Recipe) -> None:
    d, m = recipe.distributed, recipe.model
    if d.strategy != "fsdp":
        return
    if m.quantization == "8bit":
        # bitsandbytes' Int8Params keep their scales beside the weight; FSDP2 would shard the weight alone
        raise ConfigError(
            "distributed.strategy=fsdp does not support model.quantization=8bit; use 4bit or none, "
            "or distributed.strategy=ddp"
        )
    if recipe.training.optimizer != "adamw":
        # bitsandbytes' 8-bit optimizers keep state per whole tensor; FSDP2 hands them DTensor shards
        raise ConfigError(f"distributed.strategy=fsdp needs training.optimizer=adamw, got {recipe.training.optimizer}")
    if m.quantization == "4bit" and d.quant_storage not in ("auto", m.compute_dtype):
        raise ConfigError(
            f"distributed.strategy=fsdp with a 4-bit base needs distributed.quant_storage equal to "
            f"model.compute_dtype ({m.compute_dtype}) or auto, got {d.quant_storage}"
        )


def quant_storage(recipe: Recipe, sharded: bool) -> str:
    """The storage dtype name of 4-bit weights (`distributed.quant_storage`; `sharded`: FSDP2 runs)."""
    name = recipe.distributed.quant_storage
    if name != "auto":
        return name
    return recipe.model.compute_dtype if sharded else "uint8"


# A value read from the environment is saved as the interpolation that read it, never resolved:
# it is how a recipe passes a secret (a token, a password in a URL), and recipe.yaml is copied
# with every run dir and checkpoint.
SECRET_INTERPOLATION = "${oc.env:"
SECRETS_ATTR = "_env_interpolations"  # on a loaded Recipe: {(key, ...): (the raw text, its value)}


def _env_interpolations(node: Any, at: tuple = ()) -> dict[tuple, str]:
    """{path: raw text} of every string under `node` (an unresolved container) that reads `oc.env`."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {at: node} if isinstance(node, str) and SECRET_INTERPOLATION in node.replace(" ", "") else {}
    found: dict[tuple, str] = {}
    for k, v in items:
        found.update(_env_interpolations(v, (*at, k)))
    return found


def _get(container: Any, at: tuple) -> Any:
    for k in at:
        container = container[k]
    return container


def _to_recipe(cfg: DictConfig) -> Recipe:
    """The typed Recipe of a merged config, remembering which values came from the environment."""
    recipe: Recipe = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    setattr(
        recipe,
        SECRETS_ATTR,
        {
            at: (raw, _get(resolved, at))
            for at, raw in _env_interpolations(OmegaConf.to_container(cfg, resolve=False)).items()
        },
    )
    return recipe


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe file, its `extends` chain and `key=value` overrides into a validated Recipe."""
    cfg: DictConfig = OmegaConf.structured(Recipe)
    path = resolve_recipe_name(path)  # `demo` names the shipped recipe when no file of that name exists
    for source, raw in _load_layers(path):
        cfg = _merge_layer(cfg, raw, source)
    cfg = _merge_layer(cfg, parse_overrides(overrides), "command-line override")
    try:
        recipe = _to_recipe(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{path}: required key '{e.full_key}' is not set") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{path}: cannot resolve '{key}': {str(e).splitlines()[0]}") from None
    _validate(recipe)
    validate_ranges(recipe)
    return recipe


def recipe_from_dict(data: dict, overrides: Iterable[str] = (), source: str = "recipe") -> Recipe:
    """Build a validated Recipe from a plain dict (as tests and saved runs do), plus `key=value`
    overrides; `source` names the dict in errors."""
    cfg = _merge_layer(OmegaConf.structured(Recipe), data, source)
    cfg = _merge_layer(cfg, parse_overrides(overrides), "command-line override")
    try:
        recipe = _to_recipe(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{source}: required key '{e.full_key}' is not set") from None
    _validate(recipe)
    validate_ranges(recipe)
    return recipe


def recipe_to_yaml(recipe: Recipe, resolve_env: bool = False) -> str:
    """The recipe as YAML; values read from the environment stay `${oc.env:...}` unless
    `resolve_env` (`peftchat config`, which prints the resolved recipe on the user's own terminal)."""
    data = OmegaConf.to_container(OmegaConf.structured(recipe))
    for at, (raw, value) in ({} if resolve_env else getattr(recipe, SECRETS_ATTR, {})).items():
        try:
            node = _get(data, at[:-1])
            if node[at[-1]] == value:  # else the key was set after loading (merge, a test): no longer the env's
                node[at[-1]] = raw
        except (KeyError, IndexError, TypeError):
            continue
    return OmegaConf.to_yaml(OmegaConf.create(data))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    Path(path).write_text(recipe_to_yaml(with_absolute_paths(recipe)), encoding="utf-8")


def _absolute(value: Any, data: bool = False) -> Any:
    """`value` made absolute when it is a relative local path (relative to the working dir, as
    every reader takes it); a hub id (`org/name`) stays. `data`: a data source, where a glob or a
    JSON file name is local too (`peftchat.data.sources`)."""
    from peftchat.paths import looks_local

    if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
        return value
    local = looks_local(value) or (data and (value.endswith((".json", ".jsonl")) or any(c in value for c in "*?[")))
    return os.path.abspath(value) if local else value


def _absolute_sources(value: Any) -> Any:
    if isinstance(value, list):
        return [_absolute_sources(v) for v in value]
    if isinstance(value, dict) and "path" in value:
        return {**value, "path": _absolute(value["path"], data=True)}
    return _absolute(value, data=True)


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """A copy of `recipe` whose local paths are absolute: what a run saves as recipe.yaml, so
    that merge, chat and resume read the same files from any directory."""
    out = copy.deepcopy(recipe)  # keeps the record of values read from the environment
    out.model.path = _absolute(out.model.path)
    out.model.tokenizer = _absolute(out.model.tokenizer)
    out.data.train = _absolute_sources(out.data.train)
    out.data.eval = _absolute_sources(out.data.eval)
    out.data.cache_dir = _absolute(out.data.cache_dir)
    out.adapter.init_from = _absolute(out.adapter.init_from)
    out.training.output_dir = os.path.abspath(os.path.expanduser(out.training.output_dir))
    if isinstance(out.training.resume, str):  # a checkpoint path (true/false are bools by now)
        out.training.resume = os.path.abspath(os.path.expanduser(out.training.resume))
    return out


def tokenizer_source(recipe: Recipe) -> str:
    return recipe.model.tokenizer or recipe.model.path


# ------------------------------------------------------------------------------ the keys, explained
# `peftchat config --explain` and the README's table are written from KEYS, so they cannot drift
# from what validation and resume enforce.

README_BEGIN = "<!-- recipe keys: generated from peftchat/config.py by `peftchat config --explain --markdown` -->"
README_END = "<!-- end of recipe keys -->"


def _shown_type(info: KeyInfo) -> str:
    if info.spec.shown_type:
        return info.spec.shown_type
    inner = info.type.removeprefix("Optional[")[:-1] if info.optional else info.type
    inner = {"List[str]": "list of str", "Dict[str, str]": "mapping"}.get(inner, inner)
    return f"{inner} or null" if info.optional else inner


def _shown_value(value: Any) -> str:
    """A value as YAML writes it."""
    if value is MISSING:
        return "(required)"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value else '""'
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()


def _shown_allowed(info: KeyInfo) -> str:
    spec = info.spec
    if spec.allowed:
        text = spec.allowed
    elif spec.choices is not None:
        text = " | ".join(map(str, spec.choices))
    elif spec.range is not None:
        text = str(spec.range)
        if spec.range.whole_from is not None:
            text += f", whole from {_number(spec.range.whole_from)}"
    elif info.type.removeprefix("Optional[").rstrip("]") == "bool":
        text = "true | false"
    else:
        return ""
    return f"{text} | null" if info.optional and "null" not in text else text


def select_keys(selector: str = "") -> list[KeyInfo]:
    """The keys `selector` names: one key, a section (`training`), or all (""); ConfigError otherwise."""
    if not selector:
        return list(KEYS.values())
    chosen = [i for k, i in KEYS.items() if k == selector or k.startswith(selector + ".")]
    if not chosen:
        raise ConfigError(
            f"--explain: unknown key '{selector}'{_suggest(selector)}; `peftchat config --explain` lists them all"
        )
    return chosen


def explain_text(selector: str = "", recipe: Optional[Recipe] = None) -> str:
    """Each selected key: its name (and value in `recipe`), its doc, then type, default, allowed
    values and resume policy; a legend of the resume policies first."""
    lines = ["on resume (what a resumed run may change):"]
    lines += [*(f"  {p}: {text}" for p, text in RESUME_POLICIES.items()), ""]
    for info in select_keys(selector):
        head = info.name
        if recipe is not None:
            owner, attr = _owner(recipe, info.name)
            head += f" = {_shown_value(getattr(owner, attr))}"
        facts = [f"type {_shown_type(info)}", f"default {_shown_value(info.default)}"]
        allowed = _shown_allowed(info)
        facts += [f"allowed {allowed}"] if allowed else []
        facts.append(f"on resume: {info.spec.resume}")
        lines += [head, f"    {info.spec.doc}", "    " + "; ".join(facts)]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The README's table of every key (between README_BEGIN and README_END)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| key | type | default | allowed | on resume | what |", "|---|---|---|---|---|---|"]
    for info in KEYS.values():
        default = "required" if info.default is MISSING else f"`{_shown_value(info.default)}`"
        rows.append(
            f"| `{info.name}` | {cell(_shown_type(info))} | {cell(default)} | {cell(_shown_allowed(info))} "
            f"| {info.spec.resume} | {cell(info.spec.doc)} |"
        )
    return "\n".join(rows) + "\n"


def readme_with_table(text: str) -> str:
    """`text` (the README) with the generated table between its markers."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README has no {README_BEGIN} ... {README_END} block")
    return text[:begin] + README_BEGIN + "\n" + markdown_table() + text[end:]


if __name__ == "__main__":  # from a clone: python -m peftchat.config --update-readme README.md
    if sys.argv[1:2] != ["--update-readme"] or len(sys.argv) != 3:
        sys.exit("usage: python -m peftchat.config --update-readme README.md")
    readme = Path(sys.argv[2])
    readme.write_text(readme_with_table(readme.read_text(encoding="utf-8")), encoding="utf-8")

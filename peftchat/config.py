"""Recipes: typed OmegaConf YAML with `extends`, `key=value` overrides and interpolation.

A recipe is layered, lowest first: the schema defaults below, the chain of parent recipes named by
`extends` (each resolved relative to the file that names it), the recipe file itself, then the
command-line overrides. Every layer is checked for unknown keys and wrong types on its own, so an
error names the file (or the override) it came from.
"""

from __future__ import annotations

import copy
import difflib
import errno
import math
import os
import stat
import warnings
import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from peftchat.demo_assets import TINY_ARCHS
from peftchat.errors import ConfigError
from peftchat.shipped_recipes import resolve_recipe_name, shipped_path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


@dataclass
class ModelConfig:
    path: str = MISSING  # local dir or hub id
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: str = "bf16"  # weights of the non-quantized parts: bf16 | fp16 | fp32
    quantization: str = "none"  # none | 8bit | 4bit
    quant_type: str = "nf4"  # 4bit only: nf4 | fp4
    double_quant: bool = True  # 4bit only: quantize the quantization constants too
    compute_dtype: str = "bf16"  # dtype of matmuls on quantized weights: bf16 | fp16 | fp32
    attn_implementation: str = "sdpa"  # sdpa | sdpa_varlen | eager | flash_attention_2 | flash_attention_3 | flex_attention
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # Demo recipes: a peftchat.demo_assets.TINY_ARCHS name; `peftchat train` builds a random-init
    # tiny model of it at `path` when nothing is there (and `path` is no hub id), so the demo runs
    # from an empty directory.
    tiny_if_missing: Optional[str] = None


@dataclass
class AdapterConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: Optional[List[str]] = None
    bias: str = "none"  # none | all | lora_only
    init_from: Optional[str] = None  # a finished run dir or checkpoint: start from its adapter weights (SFT -> DPO)


@dataclass
class DataConfig:
    train: Any = MISSING  # a file/glob/dataset dir/hub name, a {path, format, weight} mapping, or a list of those
    eval: Any = None  # same forms as `train`; when unset, `eval_split` carves one out of train
    eval_split: float = 0.0  # share (0..1) or, when >= 1, a number of sessions held out
    format: str = "auto"  # auto | moss | chatglm | messages | sharegpt | alpaca | preference: for sources naming none
    collator: str = "chat_template"  # the conversation format; peftchat.formats.registry lists them
    max_length: int = 2048  # moss, chat_template
    max_source_length: int = 1024  # chatglm: S
    max_target_length: int = 128  # chatglm: T
    prompt_column: str = "prompt"
    response_column: str = "response"
    history_column: Optional[str] = "history"  # null = bare query prompt, no [Round] text
    source_prefix: str = ""  # chatglm: text put in front of every prompt
    chatglm_style: str = "chatglm"  # chatglm (ChatGLM-6B) | chatglm2
    separator_tokens: Optional[List[str]] = None  # chatglm: tokens between prompt and answer
    truncation: str = "seed"  # seed | drop_oldest
    # auto (the format's own: moss trains the <|Human|> turns too, as MOSS's trainer; chatglm and
    # chat_template the assistant answers) | all (moss only) | all_assistant (= assistant) | last_assistant
    loss_on: str = "auto"
    meta_instruction: Optional[str] = None  # system message when a record has none (training and chat)
    on_error: str = "stop"  # stop | skip: what a bad record does
    # messages/sharegpt: role spellings beyond the documented ones -> system | user | assistant | tool |
    # function_call (e.g. {bot: assistant}); any other spelling is a bad record
    roles: Optional[Dict[str, str]] = None
    # A JSON record (a line, or an item of a .json array) longer than this many bytes is bad: it is
    # skipped or stops the run (on_error) before it is parsed. null = max(1 MiB, 256 bytes per
    # token of the format's sample limit): far more than any sample can hold, so only runaway records hit it.
    max_record_bytes: Optional[int] = None
    packing: bool = False  # padding-free rows of several samples
    group_by_length: bool = False  # batch samples of similar length (when packing is off)
    shuffle: bool = True
    num_proc: int = 1  # processes for tokenization (datasets.map)
    cache_dir: Optional[str] = None  # where datasets caches the tokenized data


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit | adamw_8bit
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    gradient_checkpointing: bool = True
    checkpoint_skip_layers: int = 0  # last N decoder layers not checkpointed: faster, costs their activations
    checkpoint_offload: bool = False  # CUDA: checkpointed layer inputs wait in pinned host memory
    max_memory_gib: Optional[float] = None  # GPU budget: picks skip_layers/offload (overrides both)
    fused_kernels: Any = "auto"  # auto | true | false (validated to "auto", True or False): liger-kernel RMSNorm/SwiGLU/RoPE + fused linear CE
    autocast: bool = True  # CUDA, bf16 base: run the step under bf16 autocast (LoRA math in bf16, no fp32 casts)
    compile: bool = False  # torch.compile each decoder layer (pays on long runs; first steps compile)
    fused_lora: Any = "auto"  # auto | true | false (validated like fused_kernels): LoRA + frozen base linear as one autograd function
    fp8: bool = False  # CUDA capability >= 9.0: frozen base matmuls in FP8 (e4m3, per-row/channel scales); LoRA stays bf16
    seed: int = 42
    save_steps: int = 100  # 0 = only at the end
    save_total_limit: int = 2  # checkpoints kept; 0 = all
    eval_steps: int = 100  # 0 = only at the end (when there is an eval set)
    eval_generate: int = 0  # N > 0: at each eval also score greedy answers to N eval samples (BLEU-4, ROUGE)
    log_steps: int = 10
    resume: Any = False  # false | true (newest complete checkpoint) | a checkpoint path (validated to bool or str)
    resume_changes: str = "refuse"  # refuse | allow: a resumed recipe that changes what is trained (README "Resuming")
    on_nan: str = "stop"  # stop | skip: a NaN/inf loss stops the run (exit 2), or its optimizer step is dropped and counted
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensorboard: bool = True  # when tensorboard is installed
    # Preference tuning (README "Preference tuning"; the math: peftchat/train/preference.py).
    objective: str = "sft"  # sft | dpo | orpo | simpo (dpo/orpo/simpo train on chosen/rejected pairs)
    beta: float = 0.1  # dpo: KL strength; orpo: odds-ratio weight; simpo: reward scale
    label_smoothing: float = 0.0  # dpo, simpo: conservative (cDPO) share of flipped labels
    simpo_gamma: float = 0.5  # simpo: target reward margin
    reference: str = "auto"  # dpo: base (adapter off) | precomputed (once, cached in the run dir) | auto


@dataclass
class DistributedConfig:
    """Used only under `torchrun` (README "Several GPUs"); a single process ignores it."""

    strategy: str = "ddp"  # ddp (replicate, reduce gradients) | fsdp (FSDP2 fully_shard: shard the base)
    # storage dtype of 4-bit weights: auto = model.compute_dtype under fsdp (FSDP2 shards them
    # with the other weights), uint8 otherwise | uint8 | bf16 | fp16 | fp32
    quant_storage: str = "auto"
    find_unused_parameters: bool = False  # ddp: only if some trainable parameter gets no gradient
    reshard_after_forward: bool = True  # fsdp: free gathered layers after forward (False: more memory, less traffic)
    timeout_s: int = 1800  # a collective that waits longer fails the job (also: the wait for process 0's data preparation)


@dataclass
class DecodingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 40
    top_p: float = 0.8
    repetition_penalty: float = 1.02
    max_context: Optional[int] = None  # history budget in tokens; defaults to data.max_length


@dataclass
class Recipe:
    name: str = "peftchat"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)


# Keys whose value must be one of a fixed set. Plain strings rather than Enums because YAML users
# write `4bit` and `none`, which are not valid Enum member names.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("bf16", "fp16", "fp32"),
    "model.quantization": ("none", "8bit", "4bit"),
    "model.quant_type": ("nf4", "fp4"),
    "model.compute_dtype": ("bf16", "fp16", "fp32"),
    "model.attn_implementation": ("sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
    "adapter.bias": ("none", "all", "lora_only"),
    "data.format": ("auto", "moss", "chatglm", "messages", "sharegpt", "alpaca", "preference"),
    "data.chatglm_style": ("chatglm", "chatglm2"),
    "data.truncation": ("seed", "drop_oldest"),
    "data.loss_on": ("auto", "all", "all_assistant", "assistant", "last_assistant"),
    "data.on_error": ("stop", "skip"),
    "training.lr_scheduler": ("cosine", "linear", "constant"),
    "training.optimizer": ("adamw", "paged_adamw_8bit", "adamw_8bit"),
    "training.resume_changes": ("refuse", "allow"),
    "training.on_nan": ("stop", "skip"),
    "training.objective": ("sft", "dpo", "orpo", "simpo"),
    "training.reference": ("auto", "base", "precomputed"),
    "distributed.strategy": ("ddp", "fsdp"),
    "distributed.quant_storage": ("auto", "uint8", "bf16", "fp16", "fp32"),
}

# YAML and `key=value` spellings of a tri-state / boolean-or-path key.
_BOOLEANS = {"true": True, "false": False}

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
            raise ConfigError(f"'{where}' must be a path, a dataset name or a mapping {{path, format, weight}}, got {entry!r}")
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
            raise ConfigError(f"'{where}.weight' must be a number in (0, {MAX_WEIGHT:g}] (0 takes nothing: leave "
                              f"the source out), got {weight!r}")
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


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Map every dotted key of the schema to its field type (dataclass fields recurse)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        ftype = f.default_factory
        if ftype is not dataclasses.MISSING and is_dataclass(ftype):
            out[key] = ftype
            out.update(_schema_keys(ftype, key + "."))
        else:
            out[key] = f.type
    return out


SCHEMA_KEYS = _schema_keys(Recipe)


def _suggest(key: str) -> str:
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in SCHEMA_KEYS if k.startswith(parent) and "." not in k[len(parent):]]
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
            parent_path = (path.parent / os.path.expanduser(parent))
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
            raise ConfigError(f"override '{shown}' is not UTF-8 text; recipes and the run's recipe.yaml are "
                              "UTF-8, so use a UTF-8 name") from None
        key, value = item.split("=", 1)
        if key in PATH_KEYS or key.startswith(("data.train", "data.eval")):  # before YAML folds a line break
            check_path_text(key, value)
        try:  # one at a time, so that the error names the override
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:  # a value that is not YAML, say an unclosed `[`
            what = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
            raise ConfigError(f"override '{key}': its value {value!r} is not valid YAML ({what or e}); "
                              "a list is written [a, b], quoted when it holds spaces or commas") from None
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


def _validate(recipe: Recipe) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'{key}' is {value!r}; expected one of {', '.join(allowed)}{hint}")
    tm = recipe.adapter.target_modules
    if not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise ConfigError(f"'adapter.target_modules' must be 'all-linear' or a list of names, got {tm!r}")
    tiny = recipe.model.tiny_if_missing
    if tiny is not None and tiny not in TINY_ARCHS:
        raise ConfigError(f"'model.tiny_if_missing' is {tiny!r}; expected one of {', '.join(TINY_ARCHS)}")
    paths = {"model.path": recipe.model.path, "model.tokenizer": recipe.model.tokenizer,
             "data.cache_dir": recipe.data.cache_dir, "training.output_dir": recipe.training.output_dir,
             "adapter.init_from": recipe.adapter.init_from}
    for key in ("data.train", "data.eval"):
        value = getattr(recipe.data, key.split(".")[1])
        if value is not None:
            for i, source in enumerate(data_sources(value, key)):
                paths[f"{key}[{i}]" if isinstance(value, list) else key] = source.path
    for spelling, role in (recipe.data.roles or {}).items():
        if role not in ROLE_TARGETS:
            raise ConfigError(f"'data.roles.{spelling}' is {role!r}; expected one of {', '.join(ROLE_TARGETS)}")
    _validate_training(recipe.training)
    if recipe.training.objective != "sft" and recipe.data.packing:
        # a pair is scored as two whole rows (chosen, rejected) of one concatenated batch
        raise ConfigError(f"'data.packing' does not apply to training.objective={recipe.training.objective}; "
                          "set data.packing=false")
    if isinstance(recipe.training.resume, str):
        paths["training.resume"] = recipe.training.resume
    for key, value in paths.items():
        check_path_text(key, value)
    _validate_distributed(recipe)


# ------------------------------------------------------------------------------ numeric ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: `low`/`high` bounds (None = unbounded), each inclusive
    unless `*_open`. NaN is never inside."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

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

# Every numeric key of the schema and the values it accepts. This table is the documentation of
# the ranges (docs/reliability.md points here); `validate_ranges` enforces it after a recipe is
# merged, so a bad value is one line naming the key whichever layer set it.
RANGES: dict[str, Range] = {
    "adapter.r": POSITIVE,
    "adapter.alpha": POSITIVE,
    "adapter.dropout": SHARE,
    "data.eval_split": NON_NEGATIVE,  # < 1: a share of the sessions; >= 1: a whole number of them
    "data.max_length": POSITIVE,
    "data.max_source_length": POSITIVE,
    "data.max_target_length": POSITIVE,
    "data.num_proc": AT_LEAST_1,
    "data.max_record_bytes": POSITIVE,  # null = derived from the sample limit (DataConfig)
    "training.batch_size": POSITIVE,
    "training.gradient_accumulation_steps": POSITIVE,
    "training.lr": POSITIVE,
    "training.weight_decay": NON_NEGATIVE,
    "training.warmup_steps": NON_NEGATIVE,
    "training.warmup_ratio": Range(0, 1),
    "training.epochs": Range(0, MAX_EPOCHS, low_open=True),
    "training.max_steps": Range(-1),  # -1 or 0: train `epochs`; > 0: exactly this many steps
    "training.max_grad_norm": NON_NEGATIVE,  # 0 = no clipping
    "training.eval_generate": NON_NEGATIVE,  # 0 = off; N: score greedy answers to N eval samples
    "training.adam_beta1": SHARE,
    "training.adam_beta2": SHARE,
    "training.adam_eps": POSITIVE,
    "training.checkpoint_skip_layers": NON_NEGATIVE,
    "training.seed": Range(0, 2**32 - 1),  # numpy's seed range
    "training.save_steps": NON_NEGATIVE,  # 0 = only at the end
    "training.save_total_limit": NON_NEGATIVE,  # 0 = keep all
    "training.eval_steps": NON_NEGATIVE,  # 0 = only at the end
    "training.log_steps": POSITIVE,
    "decoding.max_new_tokens": AT_LEAST_1,
    "decoding.temperature": NON_NEGATIVE,  # 0 = greedy
    "decoding.top_k": NON_NEGATIVE,  # 0 = no top-k filter
    "decoding.top_p": Range(0, 1, low_open=True),  # 1 = no nucleus filter
    "decoding.repetition_penalty": POSITIVE,  # 1 = none
    "decoding.max_context": POSITIVE,  # null = data.max_length
    "training.max_memory_gib": POSITIVE,  # null = no budget: the recipe's own checkpoint settings
    "distributed.timeout_s": POSITIVE,
    "training.beta": POSITIVE,
    "training.label_smoothing": Range(0, 0.5, high_open=True),
    "training.simpo_gamma": NON_NEGATIVE,
}


def range_error(key: str, value: Any) -> Optional[str]:
    """Why `value` is not allowed for the numeric `key` (None when it is, or `key` has no range)."""
    allowed = RANGES.get(key)
    if allowed is None or value is None or isinstance(value, bool):
        return None
    if value not in allowed:
        return f"must be {allowed}, got {value}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and allowed.high is None and abs(value) > MAX_COUNT:
        return f"must be at most {MAX_COUNT} (no run reaches more), got {value}"
    if key == "data.eval_split" and value >= 1 and value != int(value):
        return f"must be a share below 1 or a whole number of sessions, got {value}"
    return None


def validate_ranges(recipe: Recipe) -> None:
    """ConfigError naming the first numeric key of `recipe` outside its RANGES entry."""
    for key in RANGES:
        section, name = key.split(".")
        problem = range_error(key, getattr(getattr(recipe, section), name, None))
        if problem:
            raise ConfigError(f"'{key}' {problem}")


def _auto_or_bool(key: str, value: Any) -> Any:
    """A tri-state key as "auto", True or False, whichever way YAML or `key=value` spelled it."""
    word = str(value).strip().lower()
    if word not in ("auto", *_BOOLEANS):
        raise ConfigError(f"'{key}' is {value!r}; expected one of auto, true, false")
    return _BOOLEANS.get(word, "auto")


def _validate_training(t: TrainingConfig) -> None:
    """Normalize the keys YAML may spell several ways, so code downstream reads real types:
    `resume` -> bool or a path str, `fused_kernels` and `fused_lora` -> "auto", True or False."""
    resume = t.resume
    if isinstance(resume, str) and resume.strip().lower() in _BOOLEANS:
        resume = _BOOLEANS[resume.strip().lower()]
    if not isinstance(resume, (bool, str)) or resume == "":
        raise ConfigError(f"'training.resume' must be false, true or a checkpoint path, got {t.resume!r}")
    t.resume = resume
    t.fused_kernels = _auto_or_bool("training.fused_kernels", t.fused_kernels)
    t.fused_lora = _auto_or_bool("training.fused_lora", t.fused_lora)
    if t.fp8 and t.fused_lora is False:
        raise ConfigError("'training.fp8' runs the base matmuls inside the fused LoRA function; "
                          "set 'training.fused_lora' to auto or true")
    if (t.fp8 or t.fused_lora is True) and t.compile:
        # the fused function dequantizes bitsandbytes weights, which torch.compile cannot trace
        raise ConfigError("'training.compile' cannot be combined with 'training.fp8' or 'training.fused_lora: true'")
    if t.objective != "sft" and t.fp8:
        # the reference forward (adapter off) and the pair loss were checked in bf16 only
        raise ConfigError(f"'training.fp8' is for training.objective=sft; got objective {t.objective}")
    if t.checkpoint_skip_layers < 0:
        raise ConfigError(f"'training.checkpoint_skip_layers' must be >= 0, got {t.checkpoint_skip_layers}")


def _validate_distributed(recipe: Recipe) -> None:
    d, m = recipe.distributed, recipe.model
    if d.strategy != "fsdp":
        return
    if m.quantization == "8bit":
        # bitsandbytes' Int8Params keep their scales beside the weight; FSDP2 would shard the weight alone
        raise ConfigError("distributed.strategy=fsdp does not support model.quantization=8bit; use 4bit or none, "
                          "or distributed.strategy=ddp")
    if recipe.training.optimizer != "adamw":
        # bitsandbytes' 8-bit optimizers keep state per whole tensor; FSDP2 hands them DTensor shards
        raise ConfigError(f"distributed.strategy=fsdp needs training.optimizer=adamw, got {recipe.training.optimizer}")
    if m.quantization == "4bit" and d.quant_storage not in ("auto", m.compute_dtype):
        raise ConfigError(f"distributed.strategy=fsdp with a 4-bit base needs distributed.quant_storage equal to "
                          f"model.compute_dtype ({m.compute_dtype}) or auto, got {d.quant_storage}")


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
    setattr(recipe, SECRETS_ATTR, {at: (raw, _get(resolved, at)) for at, raw in
                                   _env_interpolations(OmegaConf.to_container(cfg, resolve=False)).items()})
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

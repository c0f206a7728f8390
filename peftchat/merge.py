"""`peftchat merge`: fold a trained LoRA/DoRA adapter into its base and write a plain transformers model dir.

An adapter trained on a 4-bit or 8-bit base learned a correction to the *quantized* weights, so by
default it is merged onto those: the base is loaded quantized exactly as in training, each
bitsandbytes layer's weight is dequantized with bitsandbytes' own kernels (through peft's
`dequantize_module_weight`), a plain torch model in the export dtype is built from those weights,
and peft merges the adapter into it (`merge_and_unload`). `onto_original=True` merges onto the
original 16-bit weights instead, which the adapter never saw.

The output dir loads with `AutoModelForCausalLM.from_pretrained` alone: sharded safetensors,
config, a generation config whose eos ids are the conversation format's stop tokens, the tokenizer
with its chat template, and the training `recipe.yaml` (pointing at the dir, quantization none) so
`peftchat chat DIR` keeps the conversation format.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from peftchat.config import Recipe, save_recipe
from peftchat.dirswap import partial_dir, remove_stale_partials, replace_dir, sole_writer_of
from peftchat.errors import UserError
from peftchat.infer.loading import load_adapter, load_tokenizer_for
from peftchat.model.load import damaged_safetensors, load_base_model, torch_dtype
from peftchat.paths import check_outputs, check_writable_dir, looks_local
from peftchat.rundir import (
    ADAPTER_WEIGHTS,
    MODEL_CONFIG,
    RECIPE_FILE,
    adapter_source,
    read_adapter_config,
    source_paths,
)
from peftchat.rundir import note as say

VERIFY_MAX_PARAMS = 3_000_000_000  # verification is on by default below this size
MAX_SHARD_SIZE = "5GB"

# Max |logit difference| allowed, as a fraction of the logit scale max(1, max|reference logit|),
# by the coarsest precision in play. fp32: the merged product W + s·BA is summed in another order
# than W·x + s·B(A·x); that is ~1e-7 relative per matmul, and 1e-4 leaves room for depth.
# fp16 (10-bit mantissa, unit roundoff 4.9e-4) and bf16 (7-bit, 3.9e-3): rounding W + s·BA to
# the export dtype, and the activations of both models, costs a few units of roundoff per layer;
# ~20x the unit roundoff covers a deep stack (bf16, H200, random-init Llamas: 0.8% of the
# logit scale at 2 layers, 2.2% at 12).
PRECISION_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# On CUDA, LLM.int8 quantizes the *activations* of every 8-bit matmul to int8 (steps of 1/127 of a
# row's max) in fp16, in training too; the trained model carries that noise, a merged plain model
# cannot. (On CPU, bitsandbytes trains 8-bit layers with dequantize + matmul: no such noise.)
# Measured on an H200 with random-init Llamas (bf16): 0.5% of the logit scale at 2 layers, 3.5% at
# 12, growing with depth. A wrong merge or dequantization is off by about the scale itself.
INT8_TOLERANCE = 1e-1

PROBE_TEXTS = (
    "Hello! Who are you?",
    "Explain in one sentence why the sky is blue.",
    "写一首关于春天的短诗。",
)


# ------------------------------------------------------------------------------------ checks


def _check_out_dir(out_dir: Path, force: bool, inputs: list) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    # --force replaces the dir: never let that be the adapter, the base or a dir holding them.
    check_outputs([("--out", out_dir)], inputs)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"--out {out_dir} exists and is not empty (use --force to overwrite it)")


def _skeleton(recipe: Recipe):
    """The base model built on the meta device from its config: module names and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(
            os.path.expanduser(recipe.model.path),
            trust_remote_code=recipe.model.trust_remote_code,
            revision=recipe.model.revision,
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read the base model config from '{recipe.model.path}': {str(e).splitlines()[0]}"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    return model


def _expected_shape(module: torch.nn.Module, kind: str, r: int) -> Optional[tuple[int, ...]]:
    """Shape of an adapter tensor of `kind` on `module`, per peft's LoRA layers; None if unknown."""
    shapes: dict[str, tuple[Any, ...]]  # in/out_features: ints that nn.Module's typing cannot see
    if isinstance(module, torch.nn.Embedding):
        shapes = {"lora_embedding_A": (r, module.num_embeddings), "lora_embedding_B": (module.embedding_dim, r)}
        return shapes.get(kind)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        shapes = {
            "lora_A.weight": (r, module.in_features),
            "lora_B.weight": (module.out_features, r),
            "lora_magnitude_vector": (module.out_features,),
            "lora_B.bias": (module.out_features,),
        }
        return shapes.get(kind)
    return None


def _trained_on_class(adapter_config: dict) -> Optional[str]:
    """Model class the adapter was trained on: peft's `auto_mapping` when it wrote one, else the
    architecture in the config of `base_model_name_or_path` when that is still a local model dir."""
    import json

    recorded = (adapter_config.get("auto_mapping") or {}).get("base_model_class")
    if recorded:
        return recorded
    trained_base = adapter_config.get("base_model_name_or_path")
    config = Path(os.path.expanduser(trained_base)) / MODEL_CONFIG if trained_base else None
    if config is not None and config.is_file():
        try:
            return (json.loads(config.read_text(encoding="utf-8")).get("architectures") or [None])[0]
        except (OSError, json.JSONDecodeError):
            return None
    return None


def check_adapter_fits(adapter_dir: Path, skeleton, adapter_config: dict) -> None:
    """UserError unless every tensor of the adapter has a module of the right shape in the base."""
    from safetensors import safe_open

    base_class = type(skeleton).__name__
    trained_on = _trained_on_class(adapter_config)
    if trained_on and trained_on != base_class:
        raise UserError(f"{adapter_dir} was trained on a {trained_on}, but the base model is a {base_class}")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    damaged = damaged_safetensors(adapter_dir)
    if damaged is not None:
        raise UserError(f"{damaged}; use another checkpoint of the run or train again")
    modules = dict(skeleton.named_modules())
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            if name in params:  # a fully trained module (modules_to_save)
                if tuple(params[name].shape) != shape:
                    raise UserError(
                        f"adapter tensor {key} has shape {list(shape)}, the base's {name} has {list(params[name].shape)}"
                    )
                continue
            for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B"):
                if marker in name:
                    module_name, kind = name.split(marker, 1)
                    kind = marker.strip(".") + ("." + kind if kind else "")
                    break
            else:
                raise UserError(f"adapter tensor {key} does not belong to a LoRA layer of the base model {base_class}")
            # peft names the adapter in some keys (".lora_A.default.weight") but not in saved files.
            module = modules.get(module_name)
            if module is None:
                raise UserError(
                    f"adapter tensor {key} targets {module_name}, which the base model ({base_class}) does not have"
                )
            r = shape[0] if kind in ("lora_A.weight", "lora_embedding_A") else shape[-1]
            want = _expected_shape(module, kind, r)
            if want is not None and want != shape:
                raise UserError(
                    f"adapter tensor {key} has shape {list(shape)} but the base's {module_name} needs {list(want)} "
                    f"(adapter trained on another model size?)"
                )


# ------------------------------------------------------------------------------------ models


def bnb_layers_as_in_training(model) -> None:
    """Put the bitsandbytes layers (only) in train mode, so a forward takes their training path
    while dropout stays off. bitsandbytes computes differently per mode: on CPU an 8-bit layer
    trains with dequantize + matmul (MatMul8bitFp) but infers with LLM.int8 (int8 activations), and
    a 4-bit layer on an AVX512-BF16 CPU repacks its weight at its first eval forward (bf16 absmax,
    another kernel). On CUDA both modes compute alike. Call it after the last `model.eval()`."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # then nothing is quantized either
        return
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module.train()


def dequantized_copy(qmodel, base_path: str, dtype: torch.dtype, recipe: Recipe):
    """A plain (non-quantized) CPU model in `dtype` whose every weight is the quantized model's,
    bitsandbytes layers dequantized with bitsandbytes' own kernels."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        base_path, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
    )
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)
    quantized = {n: m for n, m in qmodel.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    say(f"dequantizing {len(quantized)} quantized linear layers to {str(dtype).removeprefix('torch.')} ...")
    state = {}
    for key in plain.state_dict():
        module_name, attr = key.rsplit(".", 1)
        if module_name in quantized and attr == "weight":
            tensor = dequantize_module_weight(quantized[module_name])
        else:
            tensor = getattr(qmodel.get_submodule(module_name), attr)
        state[key] = tensor.detach().to(device="cpu", dtype=dtype, copy=True)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.eval()
    return plain


def _plain_recipe(recipe: Recipe, dtype_name: str) -> Recipe:
    plain = copy.deepcopy(recipe)
    plain.model.quantization = "none"
    plain.model.dtype = dtype_name
    if plain.model.attn_implementation.startswith("flash_attention"):
        plain.model.attn_implementation = "sdpa"  # the merge runs on CPU
    return plain


@torch.no_grad()
def probe_logits(model, probes: list[list[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in probes]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b|, logit scale max(1, max |b|)) over all probes."""
    diff = max((x - y).abs().max().item() for x, y in zip(a, b))
    scale = max(1.0, max(y.abs().max().item() for y in b))
    return diff, scale


def _check_close(
    label: str, merged: list[torch.Tensor], reference: list[torch.Tensor], tolerance: Optional[float]
) -> None:
    """Print the max logit difference of the merged model from `reference`; UserError beyond
    `tolerance` (a fraction of the logit scale). None: report only (the drift of --onto-original)."""
    diff, scale = max_difference(merged, reference)
    if tolerance is None:
        say(f"verify: max |logit diff| merged vs {label} = {diff:.3g} (the drift of --onto-original)")
        return
    tol = tolerance * scale
    say(f"verify: max |logit diff| merged vs {label} = {diff:.3g} (tolerance {tol:.3g})")
    if not diff <= tol:  # also catches NaN
        raise UserError(
            f"merge verification failed: merged logits differ from the {label} by {diff:.3g} "
            f"> {tol:.3g}; nothing written"
        )


def _probes(recipe: Recipe, tokenizer) -> list[list[int]]:
    """Probe prompts in the model's conversation format (one with a finished round), plus raw text."""
    from peftchat.formats.conversation import Conversation
    from peftchat.formats.registry import make_format

    fmt = make_format(recipe.data, tokenizer)
    probes = [
        fmt.prompt(Conversation([]), PROBE_TEXTS[0]).ids,
        fmt.prompt(Conversation.from_rounds([(PROBE_TEXTS[0], "I am a helpful assistant.")]), PROBE_TEXTS[1]).ids,
        tokenizer.encode(PROBE_TEXTS[2], add_special_tokens=False),
    ]
    return [p for p in probes if p]


def _tolerance(dtypes: list[torch.dtype], int8: bool) -> float:
    tol = max(PRECISION_TOLERANCE[d] for d in dtypes)
    return max(tol, INT8_TOLERANCE) if int8 else tol


def _trained_precisions(recipe: Recipe) -> list[torch.dtype]:
    """Dtypes the trained model computes in: hidden states in `model.dtype` (non-quantized
    weights and activations between layers), 4-bit matmuls in `compute_dtype`, 8-bit ones in fp16."""
    dtypes = [torch_dtype(recipe.model.dtype)]
    if recipe.model.quantization == "4bit":
        dtypes.append(torch_dtype(recipe.model.compute_dtype))
    elif recipe.model.quantization == "8bit":
        dtypes.append(torch.float16)  # LLM.int8 casts matmul inputs to fp16 (CUDA)
    return dtypes


# ------------------------------------------------------------------------------------ writing


def _generation_config(recipe: Recipe, tokenizer):
    from peftchat.formats.registry import make_format
    from peftchat.infer.decoding import generation_config

    return generation_config(recipe, tokenizer, make_format(recipe.data, tokenizer).stop_ids)


def _write(merged, tokenizer, recipe: Recipe, out: Path, dtype_name: str) -> None:
    """Write everything into a hidden sibling dir, then move it into place: a failed or interrupted
    merge never leaves a half-written model where a loader would take it for a whole one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(out):
        say(f"note: cleaned {stale} left by a merge that was killed")
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.generation_config = _generation_config(recipe, tokenizer)
        merged.config.dtype = torch_dtype(dtype_name)
        merged.save_pretrained(str(tmp), max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(str(tmp))
        exported = _plain_recipe(recipe, dtype_name)
        exported.model.path = str(out.resolve())
        exported.model.tokenizer = None
        save_recipe(exported, tmp / RECIPE_FILE)
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors into {tmp}")
        # save_pretrained's atomic writes leave weight files 0600; an export is meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        replace_dir(tmp, out)  # --force: the old export goes only once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ merge


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: Optional[str] = None,
    dtype: str = "bf16",
    verify: Optional[bool] = None,
    force: bool = False,
    onto_original: bool = False,
) -> Path:
    """Merge the adapter in `adapter_dir` into its base and write a plain model dir to `out_dir`.

    `base` replaces the base named by the adapter's recipe.yaml. `dtype` (bf16 | fp16 | fp32) is the
    export dtype. `verify` (None = on below 3B parameters) compares the merged model's logits on
    probe prompts with the adapter on its base as trained (and on the unmerged export-dtype base)
    and raises when they differ beyond the dtype's tolerance. Everything the user can get wrong
    (paths, a base the adapter does not fit, a non-empty `out_dir` without `force`) fails before
    anything is loaded or written. Returns `out_dir`.
    """
    adapter_path = Path(adapter_dir).expanduser()
    out = Path(out_dir).expanduser()
    if not adapter_path.is_dir():
        raise UserError(f"--adapter {adapter_dir}: no such directory")
    adapter_config = read_adapter_config(adapter_path)
    if base is not None and looks_local(base) and not Path(base).expanduser().exists():
        raise UserError(f"--base {base}: no such model dir")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_path} holds a {adapter_config.get('peft_type')} adapter; merge handles LoRA/DoRA")
    source = adapter_source(adapter_path, base=base)
    inputs = [("--adapter", adapter_path), ("--base", base)] + source_paths(adapter_path)[1:]
    _check_out_dir(out, force, inputs)
    check_writable_dir(out.parent, f"--out {out}: its parent")  # the export is written beside it, then moved
    with sole_writer_of(out, "--out"):
        _check_out_dir(out, force, inputs)  # again, held: another merge may have written it meanwhile
        return _merge(source, adapter_path, adapter_config, out, dtype, verify, onto_original)


def _merge(
    source, adapter_path: Path, adapter_config: dict, out: Path, dtype: str, verify: Optional[bool], onto_original: bool
) -> Path:
    """merge_adapter once its inputs are checked and `out` is held."""
    recipe = source.recipe
    export_dtype = torch_dtype(dtype)
    skeleton = _skeleton(recipe)
    check_adapter_fits(adapter_path, skeleton, adapter_config)
    n_params = sum(p.numel() for p in skeleton.parameters())
    del skeleton
    if verify is None:
        verify = n_params < VERIFY_MAX_PARAMS

    quant = recipe.model.quantization
    kbit = quant != "none" and not onto_original
    _note_onto_original(recipe, onto_original)
    tokenizer = load_tokenizer_for(source)
    probes = _probes(recipe, tokenizer) if verify else []
    plain, trained_logits = _plain_base(recipe, adapter_path, dtype, kbit, probes)
    trained_label = f"{quant if quant != 'none' else recipe.model.dtype} base + adapter (as trained)"

    say(f"merging adapter {adapter_path} ...")
    peft_model = load_adapter(plain, adapter_path)
    unmerged_logits = probe_logits(peft_model, probes) if verify else None
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged.eval()

    if verify:
        say(f"verifying on {len(probes)} probe prompts ...")
        merged_logits = probe_logits(merged, probes)
        assert unmerged_logits is not None  # verify
        _check_close(
            f"{'dequantized ' if kbit else ''}{dtype} base + unmerged adapter",
            merged_logits,
            unmerged_logits,
            _tolerance([export_dtype], int8=False),
        )
        if trained_logits is not None:
            tol = (
                None
                if onto_original
                else _tolerance([export_dtype, *_trained_precisions(recipe)], int8=quant == "8bit")
            )
            _check_close(trained_label, merged_logits, trained_logits, tol)

    say(f"writing {dtype} model to {out} ...")
    _write(merged, tokenizer, recipe, out, dtype)
    print(f"merged model written to {out}", flush=True)
    return out


def _note_onto_original(recipe: Recipe, onto_original: bool) -> None:
    quant = recipe.model.quantization
    if onto_original and quant != "none":
        say(
            f"warning: merging onto the original {recipe.model.dtype} weights, but the adapter was trained "
            f"against their {quant} quantization; the merged model will drift from the trained one "
            f"(the drift is printed when verifying)"
        )
    elif onto_original:
        say("note: --onto-original has no effect: the adapter was trained on a non-quantized base")


def _plain_base(recipe: Recipe, adapter_path: Path, dtype: str, kbit: bool, probes: list[list[int]]):
    """(the base as a plain CPU model in the export `dtype` (dequantized when `kbit`), the probe
    logits of the trained model, the base as in training + the unmerged adapter, or None when
    there are no probes or they would equal the unmerged export-dtype ones)."""
    export_dtype = torch_dtype(dtype)
    base_path = Path(recipe.model.path).expanduser()
    quant = recipe.model.quantization
    trained_logits = None
    if kbit:
        say(f"loading base {recipe.model.path} in {quant} as in training ...")
        # Dequantize before any forward: an eval forward may repack 4-bit weights (see above).
        qmodel = load_base_model(recipe, for_training=False)
        plain = dequantized_copy(
            qmodel, str(base_path) if base_path.exists() else recipe.model.path, export_dtype, recipe
        )
        if probes:
            trained_logits = _adapter_logits(qmodel, adapter_path, probes)
        del qmodel
        return plain, trained_logits
    if probes and not (quant == "none" and torch_dtype(recipe.model.dtype) == export_dtype):
        say(f"loading base {recipe.model.path} as in training, for verification ...")
        trained_logits = _adapter_logits(load_base_model(recipe, for_training=False), adapter_path, probes)
    say(f"loading base {recipe.model.path} in {dtype} ...")
    return load_base_model(_plain_recipe(recipe, dtype), device="cpu", for_training=False), trained_logits


def _adapter_logits(base_model, adapter_dir: Path, probes: list[list[int]]) -> list[torch.Tensor]:
    """Probe logits of `adapter_dir` on `base_model` (left unmerged, as in training)."""
    model = load_adapter(base_model, adapter_dir)
    bnb_layers_as_in_training(model)
    logits = probe_logits(model, probes)
    model.unload()  # take the LoRA layers out again, so base_model is the bare base once more
    return logits

"""Loading the base model: local dir or hub id, dtype, bitsandbytes 8-bit/4-bit, attention kernel.

For training, a k-bit model is set up by hand rather than with peft's
`prepare_model_for_kbit_training`: that helper casts every non-quantized weight (norms, embeddings,
lm_head) to float32, which drags the hidden states to float32 and sends attention to the slow fp32
math kernel (half the speed measured on an H200). Here the non-quantized parts stay in
`model.dtype`; only the LoRA weights are float32 (peft does that itself).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch

from peftchat.config import Recipe, quant_storage
from peftchat.errors import UserError
from peftchat.kernels.varlen import VARLEN_ATTENTION, flash_varlen_available, register_varlen_attention
from peftchat.paths import looks_local
from peftchat.quiet import quiet_int8_cast
from peftchat.rundir import MODEL_CONFIG

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """`bf16` | `fp16` | `fp32` as a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}'; expected one of {', '.join(DTYPES)}") from None


def resolve_device(recipe: Recipe) -> torch.device:
    """`training.device`: `auto` (CUDA when there is one, else CPU), `cpu`, `cuda` or `cuda:N`."""
    name = recipe.training.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"'training.device' is '{name}'; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"'training.device' is '{name}' but CUDA is not available here (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"'training.device' is '{name}' but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise UserError(f"'training.device' is '{name}'; expected auto, cpu, cuda or cuda:N")
    return device


def _check_attention(name: str, device: torch.device) -> None:
    if not name.startswith("flash_attention"):
        return
    from transformers.utils import import_utils

    check = getattr(import_utils, f"is_{name.replace('attention', 'attn')}_available", None)
    if device.type != "cuda":
        raise UserError(f"model.attn_implementation={name} needs a CUDA device; use sdpa on {device.type}")
    if check is None or not check():
        package = "flash-attn" if name == "flash_attention_2" else "flash-attn 3 (flash_attn_interface)"
        raise UserError(f"model.attn_implementation={name} but {package} is not installed; use sdpa or install it")


# sdpa that stays sdpa: packed rows go through its block-diagonal mask, never `sdpa_varlen`.
MASKED_SDPA = "sdpa_masked"


def attention_for(
    source: str, recipe: Recipe, device: Optional[torch.device] = None, for_training: bool = False
) -> str:
    """`model.attn_implementation` as from_pretrained gets it. Family quirk: Gemma 2 soft-caps its
    attention logits, which sdpa cannot do, so transformers refuses sdpa for it (flash_attention_2
    and eager soft-cap): `sdpa` becomes `eager` for a model class without an sdpa path. Packed
    training on CUDA with `sdpa` takes `sdpa_varlen` (model/varlen.py: the flash kernel per sample
    instead of a dense block-diagonal mask; everything else is sdpa's) where the class takes
    transformers' registered attention functions; `sdpa_masked` keeps sdpa there (packed rows
    through its block-diagonal mask: the benchmarks' eager reference, and a way around the kernel)."""
    m = recipe.model
    if m.attn_implementation not in ("sdpa", VARLEN_ATTENTION, MASKED_SDPA):
        return m.attn_implementation
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=m.trust_remote_code, revision=m.revision)
        # a model class (transformers types the lazy mapping's values as tuples)
        model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):  # remote code or an unreadable config: from_pretrained decides
        if m.attn_implementation == VARLEN_ATTENTION:
            raise UserError(
                f"model.attn_implementation={VARLEN_ATTENTION} needs a model class of transformers "
                f"itself ('{m.path}' has none: remote code or no readable config); use sdpa"
            ) from None
        return "sdpa" if m.attn_implementation == MASKED_SDPA else m.attn_implementation
    if not getattr(model_class, "_supports_sdpa", True):
        print(
            f"note: {model_class.__name__} has no sdpa attention (it soft-caps attention logits); using eager",
            file=sys.stderr,
            flush=True,
        )
        return "eager"
    pluggable = getattr(model_class, "_supports_attention_backend", False)
    if m.attn_implementation == VARLEN_ATTENTION:
        if not pluggable:
            raise UserError(
                f"model.attn_implementation={VARLEN_ATTENTION}: {model_class.__name__} does not take "
                f"registered attention functions; use sdpa"
            )
        return register_varlen_attention()
    if (
        m.attn_implementation == "sdpa"
        and for_training
        and recipe.data.packing
        and pluggable
        and device is not None
        and flash_varlen_available(device)
    ):
        return register_varlen_attention()
    return "sdpa"


def _quantization_config(recipe: Recipe, sharded: bool = False):
    """A transformers BitsAndBytesConfig for `model.quantization`, or None. `sharded` (FSDP2):
    4-bit weights are stored in the compute dtype unless `distributed.quant_storage` says otherwise."""
    m = recipe.model
    if m.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if m.quantization == "8bit":
        quiet_int8_cast()
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = quant_storage(recipe, sharded)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_storage=torch.uint8 if storage == "uint8" else torch_dtype(storage),
        bnb_4bit_quant_type=m.quant_type,
        bnb_4bit_use_double_quant=m.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(m.compute_dtype),
    )


def check_model_source(recipe: Recipe) -> str:
    """`model.path` as from_pretrained wants it; a UserError when a local path is missing."""
    source = recipe.model.path
    if not looks_local(source):
        return source  # a hub id: from_pretrained says whether it exists
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"model not found: {source} (model.path); build a demo one with `peftchat tiny-model {source}`"
            " or point model.path to a model dir or hub id"
        )
    if not (path / MODEL_CONFIG).is_file():
        raise UserError(f"model.path {source} is not a transformers model dir (no config.json)")
    return str(path)


def keep_4bit_training_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On an AVX512-BF16 CPU, a `Linear4bit`'s first forward in eval mode without grad rewrites its
    weight into another layout (`packing_format_for_cpu`) and leaves it so; later training
    forwards then run `gemv_4bit`, which has no backward, and the adapter silently learns from
    wrong gradients after the first periodic evaluation. The layer decides by its own flag
    `support_avx512bf16_for_cpu` (set once from the CPU's features in `__init__`), so clearing it
    keeps the training layout for good; evaluation then computes exactly as training does."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # then nothing is quantized either
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def damaged_safetensors(directory: Path) -> str | None:
    """'FILE is truncated or damaged (why)' for the first .safetensors file in `directory` whose
    header does not describe the file (safetensors checks that the tensors cover it exactly),
    else None. Reads headers only."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{path} is truncated or damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def load_base_model(
    recipe: Recipe, device: torch.device | str | None = None, for_training: bool = True, sharded: bool = False
):
    """Load `model.path` as a transformers causal LM on `device` (default: `resolve_device(recipe)`);
    `sharded`: FSDP2 will shard it (the 4-bit storage dtype, `_quantization_config`).

    For training the weights are frozen, the KV cache is off and the model is in train mode
    (from_pretrained returns eval mode, in which transformers silently skips checkpointing);
    checkpointing itself is `peftchat.train.speedups.apply_checkpoint_policy`'s, after LoRA.
    """
    from transformers import AutoModelForCausalLM

    m = recipe.model
    device = torch.device(device) if device is not None else resolve_device(recipe)
    source = check_model_source(recipe)
    _check_attention(m.attn_implementation, device)
    quant = _quantization_config(recipe, sharded)
    if quant is not None and device.type not in ("cuda", "cpu"):
        raise UserError(f"model.quantization={m.quantization} needs a CUDA or CPU device, got {device}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype(m.dtype),
            quantization_config=quant,
            attn_implementation=attention_for(source, recipe, device, for_training),
            device_map={"": device},
            trust_remote_code=m.trust_remote_code,
            revision=m.revision,
        )
    except OSError as e:  # a hub id that does not resolve, a dir without weights, no network
        raise UserError(f"cannot load model from '{m.path}': {str(e).splitlines()[0]}") from None
    except ImportError as e:  # e.g. bitsandbytes or an attention package missing
        raise UserError(f"cannot load model from '{m.path}': {str(e).splitlines()[0]}") from None
    except Exception:
        damaged = damaged_safetensors(Path(source)) if looks_local(source) else None
        if damaged is None:
            raise
        raise UserError(
            f"cannot load model from '{m.path}': {damaged}; replace the file (download or export the model again)"
        ) from None

    if not for_training:
        model.eval()
        return model
    keep_4bit_training_layout(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False  # the cache is useless in training and costs memory
    model.train()
    return model

"""LoRA (and DoRA / rsLoRA) adapters through peft, from the recipe's `adapter` section."""

from __future__ import annotations

from peftchat.config import Recipe
from peftchat.errors import UserError
from peftchat.quiet import quiet_peft


def unwrap_peft(model):
    """The transformers model under a peft wrapper (its LoRA layers stay injected), else `model`."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lora_config(recipe: Recipe):
    """peft LoraConfig for a causal LM from `adapter.*`."""
    from peft import LoraConfig

    a = recipe.adapter
    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=a.target_modules if isinstance(a.target_modules, str) else list(a.target_modules),
        use_dora=a.use_dora,
        use_rslora=a.use_rslora,
        modules_to_save=list(a.modules_to_save) if a.modules_to_save else None,
        bias=a.bias,  # type: ignore[arg-type]  # one of peft's Literal values: the recipe key's choices
        task_type="CAUSAL_LM",
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted as their unpacked size."""
    trainable, total = 0, 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # packed two per byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trains_tied_embeddings(model, recipe: Recipe) -> bool:
    """Whether `adapter.modules_to_save` names the input or output embeddings of a model that ties
    them (Gemma; the demo recipes train a copy of `lm_head`).

    Family quirk: then peft must keep the two tied (`ensure_weight_tying`), one trained copy serving
    both. Left untied, the copy of lm_head drifts from the frozen input embeddings, and the merged
    model has to be written untied, with a second vocab x hidden matrix (0.6B parameters for Gemma 2's
    256k vocabulary at 2304 hidden).
    """
    saved = {name.rsplit(".", 1)[-1] for name in recipe.adapter.modules_to_save or []}
    text_config = model.config.get_text_config()
    if not saved or not getattr(text_config, "tie_word_embeddings", False):
        return False
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or inputs.weight is not outputs.weight:
        return False
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is inputs or module is outputs}
    return bool(names & saved)


def apply_lora(model, recipe: Recipe, verbose: bool = True):
    """Wrap `model` in a peft LoRA PeftModel (base weights frozen, adapter weights float32)."""
    from peft import get_peft_model

    config = lora_config(recipe)
    config.ensure_weight_tying = trains_tied_embeddings(model, recipe)
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, config)
    except ValueError as e:  # unknown target_modules / modules_to_save names and the like
        raise UserError(f"adapter settings do not fit model {recipe.model.path}: {str(e).splitlines()[0]}") from None
    if verbose:
        trainable, total = count_parameters(peft_model)
        print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)", flush=True)
    return peft_model

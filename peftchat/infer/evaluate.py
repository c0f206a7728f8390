"""`peftchat eval`: greedy generations on held-out conversations, scored as ChatGLM-6B's ptuning does.

Every answer a collator would train on is one sample: its prompt is built by the run's conversation
format from the reference history before it (for chatglm with ChatGLM's eval semantics: a bare
query when there is no history), the model answers greedily, and the answer is scored against the
reference with ChatGLM's `compute_metrics`: ROUGE-1/2/L F1 of jieba word segmentations
(rouge-chinese) and BLEU-4 of characters (nltk `sentence_bleu`, smoothing method3), each × 100 and
averaged over samples.

`score_generations` is the scoring alone, for the training loop's `training.eval_generate`.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from peftchat.config import Recipe
from peftchat.errors import UserError
from peftchat.infer import bridge

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
MISSING_EXTRA = "scoring needs jieba, rouge-chinese and nltk: pip install 'peftchat[eval]'"


@dataclass
class EvalSample:
    origin: str
    history: list[dict]
    query: str
    reference: str
    system: Optional[str] = None


def _scorers():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO
    return jieba, Rouge(), sentence_bleu, SmoothingFunction().method3


def score_pair(prediction: str, reference: str, scorers=None) -> dict[str, float]:
    """ChatGLM's per-sample scores (× 100, 4 decimals) of one prediction against its reference."""
    jieba, rouge, sentence_bleu, smoothing = scorers or _scorers()
    hypothesis = " ".join(jieba.cut(prediction))
    ref = " ".join(jieba.cut(reference))
    if hypothesis.split() and ref.split():
        scores = {k: v["f"] for k, v in rouge.get_scores(hypothesis, ref)[0].items()}
    else:  # rouge raises on an empty side; ChatGLM2's compute_metrics scores it 0
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores["bleu-4"] = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)
    return {k: round(scores[k] * 100, 4) for k in METRICS}


def score_generations(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Mean BLEU-4 and ROUGE-1/2/L (× 100) over the pairs, plus `n`: the object `peftchat eval`
    prints and `training.eval_generate` logs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorers = _scorers()
    per = [score_pair(p, r, scorers) for p, r in zip(predictions, references)]
    out: dict[str, Any] = {k: (round(sum(s[k] for s in per) / len(per), 4) if per else 0.0) for k in METRICS}
    out["n"] = len(per)
    return out


def load_eval_samples(recipe: Recipe, data: Any, limit: Optional[int] = None) -> list[EvalSample]:
    """Samples (history, query, reference) of every trained-on answer in `data` (a file, glob or
    dataset, read as the recipe's `data.format`), in data order, the first `limit` of them."""
    from peftchat.data.pipeline import resolve_format
    from peftchat.data.sources import load_records

    source = load_records(data, key="--data")
    fmt = resolve_format(source, recipe.data)
    return samples_from_records(recipe, source.dataset, fmt, limit, origin=source.origins)


def samples_from_records(recipe: Recipe, records, fmt: str, limit: Optional[int] = None, origin=None) -> list[EvalSample]:
    """Samples of raw `records` (a list or datasets.Dataset) of format `fmt`; `origin(row)` names
    a record in messages (default `record N`)."""
    from peftchat.data.formats import normalize

    samples: list[EvalSample] = []
    for row in range(len(records)):
        conv = normalize(records[row], fmt, recipe.data, origin(row) if origin else f"record {row}")
        if conv.dropped:
            continue
        for history, query, reference, system in bridge.eval_rounds(conv):
            samples.append(EvalSample(conv.origin, history, query, reference, system))
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


def generate_answers(model, tokenizer, recipe: Recipe, samples: list[EvalSample], batch_size: int = 8) -> list[str]:
    """Greedy answers to `samples`, prompts in the run's format (ChatGLM eval semantics)."""
    greedy = copy.deepcopy(recipe)
    greedy.decoding.temperature = 0
    greedy.decoding.repetition_penalty = 1.0
    prompts = []
    for s in samples:
        try:
            prompts.append(bridge.eval_prompt_ids(greedy, tokenizer, s.history, s.query, s.system))
        except UserError as e:
            raise UserError(f"{s.origin}: {e}") from None
    return bridge.generate_batch(model, tokenizer, greedy, prompts, batch_size)


def eval_generation_scores(model, tokenizer, recipe: Recipe, samples: list[EvalSample], batch_size: int = 8) -> dict:
    """For the training loop (`training.eval_generate`): greedy answers to `samples` scored, as a
    metrics row fragment `{"eval_bleu-4", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l",
    "eval_generate_n"}`. The model is put in eval mode for generation and back as it was."""
    was_training = model.training
    model.eval()
    try:
        predictions = generate_answers(model, tokenizer, recipe, samples, batch_size)
    finally:
        model.train(was_training)
    scores = score_generations(predictions, [s.reference for s in samples])
    return {f"eval_{k}": v for k, v in scores.items() if k != "n"} | {"eval_generate_n": scores["n"]}


def held_out_samples(recipe: Recipe, limit: int) -> list[EvalSample]:
    """The first `limit` eval samples of a training run: from `data.eval`, else from the sessions
    `data.eval_split` holds out of `data.train` (the same rows the training pipeline holds out)."""
    from peftchat.data.pipeline import _hold_out, resolve_format
    from peftchat.data.sources import load_records

    cfg = recipe.data
    if cfg.eval:
        return load_eval_samples(recipe, cfg.eval, limit)
    if not cfg.eval_split:
        return []
    source = load_records(cfg.train, on_error=cfg.on_error, cache_dir=cfg.cache_dir, key="data.train")
    fmt = resolve_format(source, cfg)
    _, rows = _hold_out(source.dataset, fmt, cfg, recipe.training.seed)
    return samples_from_records(recipe, source.dataset.select(rows), fmt, limit,
                                origin=lambda k: source.origins(rows[k]))


def eval_generate_hook(recipe: Recipe):
    """For `training.eval_generate: N`: None when N is 0, else `hook(model, tokenizer) -> dict`
    giving the `eval_bleu-4` ... `eval_generate_n` fragment of an eval metrics row. The samples
    are read once, here, so a bad eval file fails before training starts."""
    n = recipe.training.eval_generate
    if n <= 0:
        return None
    _scorers()
    samples = held_out_samples(recipe, n)
    if not samples:
        raise UserError("training.eval_generate needs eval data: set data.eval or data.eval_split")

    def hook(model, tokenizer) -> dict:
        return eval_generation_scores(model, tokenizer, recipe, samples)

    return hook


def run_eval(source: str, data: str, overrides: Iterable[str], limit: Optional[int] = None,
             out: Optional[str] = None, batch_size: int = 8) -> int:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    _scorers()  # a missing extra answers before the model loads
    if not Path(data).expanduser().exists():
        raise UserError(f"--data {data}: no such file")
    model, tokenizer, recipe = bridge.load_model(source, overrides)
    samples = load_eval_samples(recipe, data, limit)
    if not samples:
        raise UserError(f"--data {data}: no answers to evaluate")
    bridge.say(f"generating {len(samples)} answers ...")
    predictions = generate_answers(model, tokenizer, recipe, samples, batch_size)
    scores = score_generations(predictions, [s.reference for s in samples])
    if out is not None:
        scorers = _scorers()
        rows = [asdict(s) | {"prediction": p} | score_pair(p, s.reference, scorers) for s, p in zip(samples, predictions)]
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"scores": scores, "samples": rows}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        bridge.say(f"scores and {len(rows)} predictions written to {path}")
    print(json.dumps(scores, ensure_ascii=False))
    return 0

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
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from peftchat.config import Recipe
from peftchat.errors import DataError, UserError
from peftchat.formats.base import ConversationFormat
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import context_budget
from peftchat.infer.generate import generate_replies
from peftchat.infer.loading import load_chat_model, say
from peftchat.paths import atomic_output

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
MISSING_EXTRA = "scoring needs jieba, rouge-chinese and nltk: pip install 'peftchat[eval]'"


@dataclass
class EvalSample:
    origin: str
    history: Conversation  # the reference rounds before `query` (teacher forcing), system included
    query: str
    reference: str

    def row(self) -> dict[str, Any]:
        """The sample as `--out` writes it: the history as OpenAI-style messages."""
        return {
            "origin": self.origin,
            "history": self.history.messages,
            "query": self.query,
            "reference": self.reference,
        }


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


def eval_rounds(conv: Conversation) -> list[tuple[Conversation, str, str]]:
    """(history, query, reference answer) for every answer of `conv` that training puts loss on:
    context-only rounds (chatglm history) and answers marked ``"train": false`` are history, never
    references. The history is the reference history (teacher forcing): the conversation's own
    messages before the query — its system message, and for MOSS records their raw turns — as
    training rendered them."""
    head = 1 if conv.system is not None else 0
    out = []
    k = -1  # rounds before message i
    for i in range(head, len(conv.messages)):
        message = conv.messages[i]
        if message["role"] == "user":
            k += 1
        trained = message["role"] == "assistant" and message.get("train", True) is not False
        if (
            not trained
            or k < conv.context_rounds
            or i - 1 < head
            or conv.messages[i - 1]["role"] != "user"
            or message.get("tool_calls")
        ):
            continue  # (an answer after a tool message, or a tool call, is no question/answer round)
        turns = conv.moss_turns[:k] if conv.moss_turns is not None else None
        history = dataclasses.replace(conv, messages=conv.messages[: i - 1], moss_turns=turns, context_rounds=0)
        out.append((history, conv.messages[i - 1]["content"] or "", message["content"] or ""))
    return out


def load_eval_samples(recipe: Recipe, data: Any, limit: Optional[int] = None) -> list[EvalSample]:
    """Samples (history, query, reference) of every trained-on answer in `data` (a file, glob or
    dataset, read as the recipe's `data.format`), in data order, the first `limit` of them."""
    from peftchat.data.sources import load_records

    source = load_records(data, recipe.data, key="--data")
    return samples_from_records(recipe, source.dataset, limit)


def samples_from_records(recipe: Recipe, rows, limit: Optional[int] = None) -> list[EvalSample]:
    """Samples of record rows (`data.sources.RECORD_COLUMNS`: the record as JSON, its format and
    origin), a datasets.Dataset or a list of such dicts. A bad record is skipped under
    `data.on_error: skip`, else it stops the run."""
    from peftchat.data.readers import normalize

    samples: list[EvalSample] = []
    for j in range(len(rows)):
        row = rows[j]
        try:
            conv = normalize(json.loads(row["record"]), row["format"], recipe.data, row["origin"])
        except DataError:
            if recipe.data.on_error == "stop":
                raise
            continue
        if conv.dropped:
            continue
        for history, query, reference in eval_rounds(conv):
            samples.append(EvalSample(conv.origin, history, query, reference))
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


class EvalPrompts:
    """Prompts as ChatGLM's ptuning evaluates: the run's format, except that for the chatglm
    format a round with no history is the bare query (`preprocess_function_eval`) — the prompt of
    the same format with `data.history_column` null. Both formats are made once."""

    def __init__(self, recipe: Recipe, tokenizer) -> None:
        self.format: ConversationFormat = make_format(recipe.data, tokenizer)
        self.bare = self.format
        if recipe.data.collator == "chatglm":
            self.bare = make_format(dataclasses.replace(recipe.data, history_column=None), tokenizer)
        self.budget = context_budget(recipe)  # as `peftchat chat` budgets its prompts

    def ids(self, history: Conversation, query: str) -> list[int]:
        fmt = self.format if history.round_starts() else self.bare
        return fmt.prompt(history, query, self.budget).ids


def generate_answers(model, tokenizer, recipe: Recipe, samples: list[EvalSample], batch_size: int = 8) -> list[str]:
    """Greedy answers to `samples`, prompts in the run's format (ChatGLM eval semantics)."""
    greedy = copy.deepcopy(recipe)
    greedy.decoding.temperature = 0
    greedy.decoding.repetition_penalty = 1.0
    prompts = EvalPrompts(greedy, tokenizer)
    ids = []
    for s in samples:
        try:
            ids.append(prompts.ids(s.history, s.query))
        except UserError as e:
            raise UserError(f"{s.origin}: {e}") from None
    return generate_replies(model, tokenizer, greedy, ids, batch_size=batch_size, fmt=prompts.format)


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


def held_out_samples(recipe: Recipe, limit: Optional[int]) -> list[EvalSample]:
    """The first `limit` eval samples of a training run: from `data.eval`, else from the sessions
    `data.eval_split` holds out of `data.train` (the same rows the training pipeline holds out)."""
    from peftchat.data.pipeline import _hold_out
    from peftchat.data.sources import load_records

    cfg = recipe.data
    if cfg.eval:
        return load_eval_samples(recipe, cfg.eval, limit)
    if not cfg.eval_split:
        return []
    source = load_records(cfg.train, cfg, key="data.train")
    _, rows = _hold_out(source.dataset, cfg, recipe.training.seed)
    return samples_from_records(recipe, source.dataset.select(rows), limit)


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


def _samples_to_score(
    source: str, data: Optional[str], overrides: Iterable[str], limit: Optional[int]
) -> list[EvalSample]:
    """`--data`'s samples, or without it the run's held-out ones (data.eval, else the sessions
    data.eval_split held out). Read with the recipe only: bad data answers before the model loads."""
    from peftchat.rundir import resolve_source

    if data is not None and not Path(data).expanduser().exists():
        raise UserError(f"--data {data}: no such file")
    recipe = resolve_source(source, overrides).recipe
    if data is None:
        samples = held_out_samples(recipe, limit)
        if not samples:
            raise UserError(f"{source}: the recipe has no eval data (data.eval or data.eval_split); pass --data FILE")
        return samples
    samples = load_eval_samples(recipe, data, limit)
    if not samples:
        raise UserError(f"--data {data}: no answers to evaluate")
    return samples


def run_eval(
    source: str,
    data: Optional[str],
    overrides: Iterable[str],
    limit: Optional[int] = None,
    out: Optional[str] = None,
    batch_size: int = 8,
    force: bool = False,
) -> int:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    _scorers()  # a missing extra answers before the model loads
    samples = _samples_to_score(source, data, overrides, limit)
    model, tokenizer, recipe = load_chat_model(source, overrides)
    say(f"generating {len(samples)} answers ...")
    predictions = generate_answers(model, tokenizer, recipe, samples, batch_size)
    scores = score_generations(predictions, [s.reference for s in samples])
    if out is not None:
        scorers = _scorers()
        rows = [s.row() | {"prediction": p} | score_pair(p, s.reference, scorers) for s, p in zip(samples, predictions)]
        path = Path(out)
        with atomic_output(path, "--out", force) as tmp:
            tmp.write_text(
                json.dumps({"scores": scores, "samples": rows}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
            )
        say(f"scores and {len(rows)} predictions written to {path}")
    # the JSON object on stdout is the contract; the same scores as a line to read on the console
    say(f"{scores['n']} answers: " + ", ".join(f"{k.upper()} {scores[k]:.1f}" for k in METRICS))
    print(json.dumps(scores, ensure_ascii=False))
    return 0

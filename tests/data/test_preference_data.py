"""Preference pairs: the record shapes, the conversation formats' prompts, drop-and-count,
truncation that keeps the current question and cuts both sides' prompts alike."""

from __future__ import annotations

import pytest
from data_helpers import META, TOKENIZER_DIR, tok, write_jsonl

from peftchat.config import recipe_from_dict
from peftchat.data.pipeline import build_datasets
from peftchat.data.preference import EMPTY, IDENTICAL, PairEncoder, normalize_pair
from peftchat.errors import DataError
from peftchat.formats.registry import make_format

Q, GOOD, BAD = "How do I boil an egg?", "Put it in boiling water for eight minutes.", "No idea."
HISTORY = [("Hello there", "Hi! How can I help?"), ("Can you cook?", "Sure, ask me anything.")]

SHAPES = {
    "trl standard": {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    "trl conversational": {
        "prompt": [{"role": "user", "content": Q}],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    },
    "trl implicit prompt": {
        "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}],
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": Q}],
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
    "messages": {"messages": [{"role": "user", "content": Q}], "chosen": GOOD, "rejected": BAD},
}
COLLATORS = ("moss", "chatglm", "chat_template")


def recipe(train="unused.jsonl", objective="sft", **data):
    return recipe_from_dict(
        {
            "model": {"path": "unused", "tokenizer": TOKENIZER_DIR},
            "data": {"train": train, **data},
            "training": {"objective": objective},
        }
    )


def _cfg(collator, **data):
    return recipe(collator=collator, meta_instruction=META, objective="dpo", **data).data


def _history_record():
    prompt = [m for u, a in HISTORY for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    return {"prompt": prompt + [{"role": "user", "content": Q}], "chosen": GOOD, "rejected": BAD}


@pytest.mark.parametrize("collator", COLLATORS)
def test_every_shape_gives_the_same_pair(collator):
    cfg = _cfg(collator)
    encoder = PairEncoder(cfg, tok(), limit=512)
    pairs = {name: encoder.encode(*normalize_pair(r, cfg, name)).samples[0] for name, r in SHAPES.items()}
    first = pairs["trl standard"]
    for name, sample in pairs.items():
        assert (sample.input_ids, sample.labels, sample.rejected_input_ids, sample.rejected_labels) == (
            first.input_ids,
            first.labels,
            first.rejected_input_ids,
            first.rejected_labels,
        ), name


@pytest.mark.parametrize("collator", COLLATORS)
def test_prompt_is_the_chat_prompt_and_scored_tokens_are_the_reply(collator):
    """Both sides start with exactly the ids `peftchat chat` puts before a reply; only the reply is scored."""
    cfg = _cfg(collator)
    fmt = make_format(cfg, tok())
    chosen, rejected = normalize_pair(_history_record(), cfg, "x")
    sample = PairEncoder(cfg, tok(), limit=512).encode(chosen, rejected).samples[0]
    history = chosen.without_oldest_rounds(0)
    history.messages = history.messages[:-2]
    prompt = fmt.prompt(history, Q).ids
    for ids, labels, reply in (
        (sample.input_ids, sample.labels, GOOD),
        (sample.rejected_input_ids, sample.rejected_labels, BAD),
    ):
        assert ids[: len(prompt)] == prompt
        # ChatGLM-6B's labels start at the token that opens the answer (the prompt's last): scored on both sides alike
        assert sum(x != -100 for x in labels[: len(prompt)]) == (collator == "chatglm")
        scored = [t for t, x in zip(ids, labels) if x != -100]
        assert reply in tok().decode(scored)
        assert Q not in tok().decode(scored)


@pytest.mark.parametrize("collator", COLLATORS)
def test_truncation_drops_oldest_rounds_alike_and_keeps_the_question(collator):
    cfg = _cfg(collator)
    full = PairEncoder(cfg, tok(), limit=10_000).encode(*normalize_pair(_history_record(), cfg, "x")).samples[0]
    reply_room = max(len(full.input_ids), len(full.rejected_input_ids)) - 6  # forces history out
    short = PairEncoder(cfg, tok(), limit=reply_room).encode(*normalize_pair(_history_record(), cfg, "x")).samples[0]
    assert short.truncated and not full.truncated
    assert max(len(short.input_ids), len(short.rejected_input_ids)) <= reply_room
    k = next(i for i, x in enumerate(short.labels) if x != -100)
    assert short.input_ids[:k] == short.rejected_input_ids[:k]  # one prompt for both sides
    prompt_text = tok().decode(short.input_ids[:k])
    assert Q in prompt_text and HISTORY[0][0] not in prompt_text


def test_replies_cut_alike_when_the_question_alone_is_near_the_limit():
    cfg = _cfg("chat_template")
    encoder = PairEncoder(cfg, tok(), limit=10_000)
    full = encoder.encode(*normalize_pair(SHAPES["trl standard"], cfg, "x")).samples[0]
    k = next(i for i, x in enumerate(full.labels) if x != -100)
    cut = PairEncoder(cfg, tok(), limit=k + 3).encode(*normalize_pair(SHAPES["trl standard"], cfg, "x")).samples[0]
    assert cut.truncated and len(cut.input_ids) == len(cut.rejected_input_ids) == k + 3
    assert cut.input_ids[:k] == full.input_ids[:k]
    tiny = PairEncoder(cfg, tok(), limit=k).encode(*normalize_pair(SHAPES["trl standard"], cfg, "x"))
    assert not tiny.samples and tiny.dropped


def test_identical_and_empty_pairs_are_dropped_and_counted(tmp_path):
    records = [
        SHAPES["trl standard"],
        {"prompt": Q, "chosen": GOOD, "rejected": GOOD + "  "},
        {"prompt": Q, "chosen": "", "rejected": BAD},
        {"prompt": Q, "chosen": GOOD, "rejected": " "},
        SHAPES["sharegpt"],
    ]
    r = recipe(train=str(write_jsonl(tmp_path / "pairs.jsonl", records)), collator="chat_template", objective="dpo")
    bundle = build_datasets(r, tok())
    assert len(bundle.train) == 2
    assert bundle.report.dropped == {EMPTY: 2, IDENTICAL: 1}
    assert set(bundle.train.column_names) == {"input_ids", "labels", "rejected_input_ids", "rejected_labels"}
    # the report speaks of pairs and counts both sides of each kept pair
    summary = bundle.report.summary()
    assert "sessions -> 2 pairs," in summary and f"  dropped 2 pairs: {EMPTY}" in summary
    assert "samples" not in summary
    rows = bundle.train
    both = sum(len(x) + len(y) for x, y in zip(rows["input_ids"], rows["rejected_input_ids"]))
    scored = sum(x != -100 for side in ("labels", "rejected_labels") for row in rows[side] for x in row)
    assert bundle.report.tokens == both and bundle.report.loss_tokens == scored
    assert bundle.report.longest == max(len(x) for side in ("input_ids", "rejected_input_ids") for x in rows[side])


def test_sft_on_preference_records_trains_the_chosen_reply(tmp_path):
    r = recipe(train=str(write_jsonl(tmp_path / "pairs.jsonl", [SHAPES["trl standard"]])), collator="chat_template")
    sample = build_datasets(r, tok()).train[0]
    scored = tok().decode([t for t, x in zip(sample["input_ids"], sample["labels"]) if x != -100])
    assert GOOD in scored and BAD not in tok().decode(sample["input_ids"])


def test_non_pair_record_under_dpo_names_the_line(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            SHAPES["trl standard"],
            {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}]},
        ],
    )
    r = recipe(train=str(path), collator="chat_template", objective="dpo")
    with pytest.raises(DataError, match=r"mixed.jsonl:2: missing field .chosen."):
        build_datasets(r, tok())


def test_bad_pair_record_names_the_field():
    with pytest.raises(DataError, match="missing field 'rejected'"):
        normalize_pair({"prompt": Q, "chosen": GOOD}, _cfg("moss"), "f.jsonl:3")

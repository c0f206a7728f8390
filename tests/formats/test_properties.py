"""Property-based tests (hypothesis) of the conversation formats and the packer, on random
conversations — random unicode text (CJK included), 1-4 rounds, an optional system message,
random ``train`` flags — with the shipped demo tokenizer.

For every format and sample: labels as long as input_ids, a label is -100 or its input token, no
longer than the format's sample limit, and the tokens with loss are exactly the trained text (never
the system/meta instruction, a user turn where the format masks it, a tool response's body or an
assistant message marked ``train: false``). Where the format promises it (no truncation), the
chat prompt for a prefix of the conversation is the training tokens of that prefix. Packing: rows
within max_length, every sample exactly once, position ids restarting at each sample so attention
never crosses samples.
"""

from __future__ import annotations

import unicodedata

from data_helpers import recipe, tok
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftchat.data.batching import collate, plan_batches
from peftchat.formats.conversation import Conversation
from peftchat.formats.moss import human_field, moss_field
from peftchat.formats.registry import make_format, sample_limit
from peftchat.formats.samples import IGNORE_INDEX

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Letters, digits, punctuation and spaces of any script, plus a CJK run; no markup characters
# ("<", "|", ">" would spell the formats' own special tokens), NFC like any stored text.
TEXT = st.text(
    st.one_of(
        st.characters(categories=("L", "N", "P", "Zs"), exclude_characters="<|>"),
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    ),
    min_size=0,
    max_size=24,
).map(lambda s: unicodedata.normalize("NFC", s))
WORDS = st.text(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF) | st.sampled_from("abcxyz"), min_size=1, max_size=8
)  # a tool response body: letters only, so its tokens end at its edges


@st.composite
def conversations(draw) -> Conversation:
    system = draw(st.none() | TEXT)
    messages = [{"role": "system", "content": system}] if system else []
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(TEXT)})
        answer = {"role": "assistant", "content": draw(TEXT)}
        if draw(st.booleans()) and draw(st.booleans()):
            answer["train"] = False
        messages.append(answer)
    return Conversation(messages=messages, origin="random[0]")


def decode(ids) -> str:
    return tok().decode(ids, clean_up_tokenization_spaces=False)


def loss_runs(labels) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, x in enumerate([*labels, IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_sample(sample, limit: int) -> None:
    assert len(sample.input_ids) == len(sample.labels) <= limit
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(sample.input_ids, sample.labels))


def prefix(conv: Conversation, k: int) -> Conversation:
    head = 1 if conv.system is not None else 0
    turns = conv.moss_turns[:k] if conv.moss_turns is not None else None
    return Conversation(conv.messages[: head + 2 * k], moss_turns=turns)


def trained(conv: Conversation) -> list[bool]:
    """Which answers carry loss: not marked train: false and, for the session formats, not empty
    (an empty answer stays as context without loss; chatglm drops such a round: test_chatglm)."""
    return [
        m.get("train", True) is not False and bool((m.get("content") or "").strip())
        for m in conv.messages
        if m["role"] == "assistant"
    ]


@SETTINGS
@given(conv=conversations(), max_length=st.integers(8, 160), truncation=st.sampled_from(["seed", "drop_oldest"]))
def test_chat_template(conv, max_length, truncation):
    cfg = recipe(collator="chat_template", max_length=max_length, truncation=truncation).data
    fmt = make_format(cfg, tok())
    encoded = fmt.encode(conv)
    assert len(encoded.samples) + len(encoded.dropped) == 1
    if not encoded.samples:
        return
    (sample,) = encoded.samples
    check_sample(sample, sample_limit(cfg))
    answers = [
        m["content"] + "<|im_end|>"
        for m, t in zip([m for m in conv.messages if m["role"] == "assistant"], trained(conv))
        if t
    ]
    runs = loss_runs(sample.labels)
    # every run of loss is (a part of) one trained answer and its end-of-turn token, nothing else
    whole = runs[:-1] if sample.truncated else runs  # a cut last run may end inside a character
    assert all(any(decode(sample.input_ids[a:b]) in text for text in answers) for a, b in whole)
    if sample.truncated:
        return
    assert [decode(sample.input_ids[a:b]) for a, b in runs] == answers
    rounds, k_run = conv.rounds(), 0
    for k, is_trained in enumerate(trained(conv)):
        if is_trained:  # the chat prompt after rounds 0..k-1 ends where answer k's loss begins
            prompt = fmt.prompt(prefix(conv, k), rounds[k][0])
            assert prompt.dropped_rounds == 0 and prompt.ids == sample.input_ids[: runs[k_run][0]]
            k_run += 1


@SETTINGS
@given(
    conv=conversations(),
    max_length=st.integers(4, 160),
    truncation=st.sampled_from(["seed", "drop_oldest"]),
    tools=st.lists(WORDS, min_size=4, max_size=4),
    raw=st.booleans(),
)
def test_moss(conv, max_length, truncation, tools, raw):
    cfg = recipe(collator="moss", max_length=max_length, truncation=truncation, meta_instruction=None).data
    fmt = make_format(cfg, tok())
    if raw:  # MOSS records: raw fields with a tool response whose body gets no loss
        conv.moss_turns = [
            [
                ("Human", human_field(q)),
                ("Inner Thoughts", "<|Inner Thoughts|>: None<eot>\n"),
                ("Commands", "<|Commands|>: None<eoc>\n"),
                ("Tool Responses", f"<|Results|>: {tools[k]}<eor>\n"),
                ("MOSS", moss_field(a)),
            ]
            for k, (q, a) in enumerate(conv.rounds())
        ]
    encoded = fmt.encode(conv)
    assert len(encoded.samples) + len(encoded.dropped) == 1
    if not encoded.samples:
        return
    (sample,) = encoded.samples
    check_sample(sample, sample_limit(cfg))
    meta = fmt.meta_instruction(conv)
    n_meta = len(tok().encode(meta, add_special_tokens=False)) if meta else 0
    assert sample.labels[:n_meta] == [IGNORE_INDEX] * n_meta
    text = decode(sample.input_ids[n_meta:])
    # the kept turns are a run of whole turns; the loss is on each of them less what is masked
    fields = fmt.turn_fields(conv)
    flags = trained(conv)
    windows = [
        (a, b)
        for a in range(len(fields))
        for b in range(a + 1, len(fields) + 1)
        if "".join(v for f in fields[a:b] for _, v in f) == text
    ]
    assert windows, text
    a, b = windows[0]
    expected = ""
    for k in range(a, b):
        for name, value in fields[k]:
            if name == "Human" or flags[k]:
                expected += value.replace(f" {tools[k]}<eor>", "<eor>") if name == "Tool Responses" else value
    assert "".join(decode(sample.input_ids[s:e]) for s, e in loss_runs(sample.labels)) == expected
    if sample.truncated:
        return
    for k in range(len(fields)):  # the chat prompt after turns 0..k-1 is the training prefix
        prompt = fmt.prompt(prefix(conv, k), conv.rounds()[k][0])
        assert prompt.dropped_rounds == 0 and prompt.ids == sample.input_ids[: len(prompt.ids)]
        assert decode(prompt.ids[n_meta:]).endswith(human_field(conv.rounds()[k][0]))


@SETTINGS
@given(
    conv=conversations(),
    source=st.integers(4, 48),
    target=st.integers(3, 24),
    style=st.sampled_from(["chatglm", "chatglm2"]),
)
def test_chatglm(conv, source, target, style):
    cfg = recipe(collator="chatglm", max_source_length=source, max_target_length=target, chatglm_style=style).data
    fmt = make_format(cfg, tok())
    encoded = fmt.encode(conv)
    rounds = conv.rounds()
    flags = [m.get("train", True) is not False for m in conv.messages if m["role"] == "assistant"]
    wanted = [k for k, t in enumerate(flags) if t and rounds[k][0] and rounds[k][1]]  # ChatGLM-6B's test
    assert len(encoded.samples) == len(wanted)
    eos = tok().eos_token_id
    for k, sample in zip(wanted, encoded.samples):
        check_sample(sample, sample_limit(cfg))
        (run,) = loss_runs(sample.labels)  # one answer a sample: the prompt and history carry no loss
        assert run[1] == len(sample.input_ids) and sample.input_ids[-1] == eos
        answer_ids = tok().encode(rounds[k][1], add_special_tokens=False)[: fmt.target_budget]
        context = fmt.prompt(prefix(conv, k), rounds[k][0]).ids
        if style == "chatglm2":  # loss on the answer (cut to its budget) and eos only
            assert sample.input_ids[run[0] : -1] == answer_ids
        else:  # ChatGLM-6B: from the last separator (sop) on
            assert sample.input_ids[run[0]] == fmt.seps[-1] and sample.input_ids[run[0] + 1 : -1] == answer_ids
        if not sample.truncated:
            assert rounds[k][1] == decode(sample.input_ids[len(context) : -1])
            assert sample.input_ids[: len(context)] == context


@SETTINGS
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    max_length=st.integers(8, 64),
    batch_size=st.integers(1, 5),
    shuffle=st.booleans(),
    seed=st.integers(0, 5),
)
def test_packer(lengths, max_length, batch_size, shuffle, seed):
    plan = plan_batches(
        lengths,
        batch_size=batch_size,
        max_length=max_length,
        packing=True,
        group_by_length=False,
        shuffle=shuffle,
        seed=seed,
        epoch=0,
    )
    rows = [row for batch in plan for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each sample exactly once
    assert all(sum(lengths[i] for i in row) <= max_length or len(row) == 1 for row in rows)
    samples = [
        {"input_ids": [1000 * i + t for t in range(n)], "labels": [1000 * i + t for t in range(n)]}
        for i, n in enumerate(lengths)
    ]
    for batch in plan:
        out = collate([[samples[i] for i in row] for row in batch], pad_id=-1, packing=True)
        for r, row in enumerate(batch):
            pos = out["position_ids"][r].tolist()
            ids = out["input_ids"][r].tolist()
            labels = out["labels"][r].tolist()
            # segments as transformers finds them: a new one wherever the position does not count on
            starts = [t for t in range(len(pos)) if t == 0 or pos[t] != pos[t - 1] + 1]
            bounds = [0]
            for i in row:
                bounds.append(bounds[-1] + lengths[i])
            width = len(pos)
            assert starts == bounds[:-1] + ([bounds[-1]] if bounds[-1] < width else [])
            for i, (a, b) in zip(row, zip(bounds, bounds[1:])):  # a segment holds exactly one sample
                assert ids[a:b] == samples[i]["input_ids"]
                assert labels[a] == (IGNORE_INDEX if a > 0 else samples[i]["labels"][0])
                assert labels[a + 1 : b] == samples[i]["labels"][1:]
            assert labels[bounds[-1] :] == [IGNORE_INDEX] * (width - bounds[-1])

"""Format rules beyond the spec's check cases: `"train": false`, the chatglm system message, the
chat_template meta instruction, linear-cost prompt fitting and reply streaming."""

import copy

import pytest
from data_helpers import E, conv, messages_record, moss_record, moss_turn, recipe, tid, tok, write_jsonl

from peftchat.data.pipeline import build_datasets
from peftchat.errors import ConfigError
from peftchat.formats.base import fewest_to_drop
from peftchat.formats.chatglm import SYSTEM_LEFT_OUT
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import FORMATS, format_class, make_format

PAIRS = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]


def fmt(tokenizer=None, **data):
    return make_format(recipe(**data).data, tokenizer or tok())


def untrained_second_answer(record: dict) -> dict:
    record = copy.deepcopy(record)
    assistants = [m for m in record["messages"] if m["role"] == "assistant"]
    assistants[1]["train"] = False
    return record


def labelled_text(sample) -> str:
    return tok().decode([t for t in sample.labels if t != -100])


def test_train_false_keeps_that_answer_out_of_the_loss():
    record = untrained_second_answer(messages_record(PAIRS))
    (s,) = fmt(collator="chat_template").encode(conv(record, "messages")).samples
    assert labelled_text(s) == "a1<|im_end|>a3<|im_end|>"
    (s,) = fmt(collator="moss").encode(conv(record, "messages")).samples
    assert "a2" not in labelled_text(s) and "a1<eom>" in labelled_text(s) and "a3<eom>" in labelled_text(s)
    assert all(f"<|Human|>: {q}<eoh>\n" in labelled_text(s) for q, _ in PAIRS)  # Human fields keep loss
    samples = fmt(collator="chatglm").encode(conv(record, "messages")).samples
    assert [tok().decode([t for t in x.labels if t != -100][1:-1]) for x in samples] == ["a1", "a3"]


def test_train_false_on_a_moss_record_turn():
    turns = [moss_turn("q1", "a1", tool="t1"), moss_turn("q2", "a2", tool="t2")]
    c = conv(moss_record(turns), "moss")
    [m for m in c.messages if m["role"] == "assistant"][0]["train"] = False
    (s,) = fmt(collator="moss").encode(c).samples
    text = labelled_text(s)
    assert "<|Human|>: q1<eoh>\n" in text and "a1" not in text and "<|Inner Thoughts|>" in text
    assert text.count("<|Inner Thoughts|>") == 1 and "a2<eom>" in text


def test_chatglm_leaves_the_system_message_out_and_the_report_counts_it(tmp_path):
    enc = fmt(collator="chatglm").encode(conv(messages_record(PAIRS, system="Be brief."), "messages"))
    assert len(enc.samples) == 3 and enc.left_out == [SYSTEM_LEFT_OUT] and not enc.dropped
    assert "Be brief" not in tok().decode(enc.samples[-1].input_ids)
    path = write_jsonl(tmp_path / "m.jsonl", [messages_record(PAIRS, system="S"), messages_record(PAIRS)])
    r = recipe(train=str(path), format="messages", collator="chatglm", cache_dir=str(tmp_path / "c"))
    report = build_datasets(r, tok()).report
    assert report.left_out == {SYSTEM_LEFT_OUT: 1} and report.samples == 6 and report.dropped == {}
    assert f"left out 1: {SYSTEM_LEFT_OUT}" in report.summary()


def test_chat_template_meta_instruction_is_the_system_message_in_training_and_chat():
    f = fmt(collator="chat_template", meta_instruction="Be kind.")
    (s,) = f.encode(conv(messages_record(PAIRS), "messages")).samples
    assert tok().decode(s.input_ids).startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    prompt = f.prompt(Conversation.from_rounds(PAIRS[:2]), PAIRS[2][0]).ids
    assert prompt == s.input_ids[: len(prompt)] and tok().decode(prompt).startswith("<|im_start|>system\nBe kind.")
    # a conversation's own system message wins, in both
    (s,) = f.encode(conv(messages_record(PAIRS, system="Own."), "messages")).samples
    assert "Be kind." not in tok().decode(s.input_ids)
    assert "Be kind." not in tok().decode(f.prompt(Conversation.from_rounds([], system="Own."), "q").ids)


def test_fewest_to_drop_matches_a_linear_scan_with_few_probes():
    for n in range(0, 40):
        for need in range(0, n + 2):
            probes = []

            def fits(s):
                probes.append(s)
                return s >= need

            got = fewest_to_drop(n, fits)
            assert got == (need if need <= n else None)
            assert len(probes) <= 2 * max(need, 1).bit_length() + 2


def test_chat_prompt_fitting_renders_logarithmically(monkeypatch):
    t = copy.deepcopy(tok())
    f = fmt(t, collator="chat_template", max_length=200)
    history = Conversation.from_rounds([(f"question number {k}", f"answer number {k}") for k in range(40)])
    renders = []
    original = type(t).apply_chat_template

    def counting(self, *args, **kwargs):
        renders.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(t), "apply_chat_template", counting)
    prompt = f.prompt(history, "last question")
    assert 30 < prompt.dropped_rounds < 40 and len(prompt.ids) <= 200
    assert len(renders) <= 14  # a scan over history starts would render ~35 times
    assert prompt.ids == f.prompt(history.without_oldest_rounds(prompt.dropped_rounds), "last question").ids


@pytest.mark.parametrize("collator", sorted(FORMATS))
def test_reply_stream_equals_the_parsed_reply_and_never_renders(collator, monkeypatch):
    f = fmt(collator=collator)
    answer = "春风拂面，花开满园。 And some English words, too."
    if collator == "moss":
        generated = E("<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n") + E(f"<|MOSS|>: {answer}<eom>\n")
    else:
        generated = E(" " + answer) + f.stop_ids[:1] + E("junk after the stop")
    monkeypatch.setattr(type(tok()), "apply_chat_template", lambda *a, **k: pytest.fail("re-rendered"))
    stream = f.reply_stream()
    pieces = [stream.push([t]) for t in generated]
    reply = f.parse_reply(generated)
    assert reply.text == answer and "".join(pieces) == answer and stream.finish(reply.text) == ""
    assert not any("\ufffd" in p for p in pieces)
    if collator == "moss":
        assert set(reply.fields) == {"Inner Thoughts", "Commands"}


def test_history_conversation_helpers():
    c = Conversation.from_rounds(PAIRS, system="S")
    assert c.round_starts() == [1, 3, 5]
    less = c.without_oldest_rounds(2)
    assert less.system == "S" and less.rounds() == [("q3", "a3")]
    assert c.with_round("q4", "a4").rounds()[-1] == ("q4", "a4") and len(c.rounds()) == 3
    assert tid("<|im_end|>") in fmt(collator="chat_template").stop_ids


def test_unknown_format_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match="'data.collator' is 'mos'; expected one of chatglm, moss, chat_template"):
        format_class("mos")

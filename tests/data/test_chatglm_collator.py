"""The chatglm collator against spec §1 and check cases 1-4, 10 (shipped demo tokenizer)."""

import pytest
from data_helpers import E, conv, labelled, messages_record, moss_record, moss_turn, recipe, tid, tok

from peftchat.errors import ConfigError
from peftchat.formats.chatglm import ChatGLMFormat as ChatGLMCollator
from peftchat.formats.chatglm import prompt_text

GMASK, SOP, EOS, BOS = 4, 5, 2, 1


def collator(**data):
    return ChatGLMCollator(recipe(**data).data, tok())


def row(prompt, response, history=None):
    return {"prompt": prompt, "response": response, "history": history if history is not None else []}


def test_shipped_tokenizer_ids_are_pinned():
    assert (tid("[gMASK]"), tid("<sop>"), tok().eos_token_id, tok().bos_token_id) == (GMASK, SOP, EOS, BOS)
    # "[Round 0]\n问：q\n答：" on the shipped tokenizer, token by token
    assert E("[Round 0]\n问：q\n答：") == [77, 308, 385, 79, 217, 303, 277, 99, 217, 300, 277]


def test_case1_one_row_empty_history():
    c = collator()
    assert prompt_text(c.cfg, [], "q") == "[Round 0]\n问：q\n答："
    enc = c.encode(conv(row("q", "an answer"), "chatglm"))
    (s,) = enc.samples
    a = [77, 308, 385, 79, 217, 303, 277, 99, 217, 300, 277]
    assert s.input_ids == a + [GMASK, SOP] + E("an answer") + [EOS]
    assert s.input_ids[len(a)] == GMASK and s.input_ids[len(a) + 1] == SOP
    assert s.labels[: len(a) + 1] == [-100] * (len(a) + 1)
    assert s.labels[len(a) + 1 :] == [SOP] + E("an answer") + [EOS]  # sop, answer and eos carry loss


def test_case2_three_round_session_splits_into_three_samples():
    pairs = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    for record, fmt in [
        (messages_record(pairs, system="sys"), "messages"),
        (moss_record([moss_turn(q, a) for q, a in pairs]), "moss"),
        (
            {"conversations": [{"from": f, "value": v} for q, a in pairs for f, v in (("human", q), ("gpt", a))]},
            "sharegpt",
        ),
    ]:
        enc = collator().encode(conv(record, fmt))
        assert len(enc.samples) == 3 and not enc.dropped
        for k, s in enumerate(enc.samples):
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(pairs[:k]))
            prompt += f"[Round {k}]\n问：{pairs[k][0]}\n答："
            assert s.input_ids == E(prompt) + [GMASK, SOP] + E(pairs[k][1]) + [EOS]
            assert labelled(s) == [SOP] + E(pairs[k][1]) + [EOS]  # trains answer k only


def test_chatglm_row_with_history_is_one_sample_with_rounds_numbered_from_zero():
    enc = collator().encode(conv(row("q3", "a3", [["q1", "a1"], ["q2", "a2"]]), "chatglm"))
    (s,) = enc.samples
    text = tok().decode(s.input_ids)
    assert text.startswith("[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：a2\n[Round 2]\n问：q3\n答：")
    assert labelled(s) == [SOP] + E("a3") + [EOS]


def test_case3_truncation_keeps_prompt_head_and_cuts_answer():
    c = collator(max_source_length=8, max_target_length=6, history_column=None)
    long_q, long_a = "one two three four five six seven eight nine", "alpha beta gamma delta epsilon zeta eta"
    (s,) = c.encode(conv(row(long_q, long_a), "chatglm", history_column=None)).samples
    assert len(E(long_q)) > 7 and len(E(long_a)) > 4
    assert s.input_ids == E(long_q)[:7] + [GMASK, SOP] + E(long_a)[:4] + [EOS]
    assert s.input_ids[-1] == EOS and s.truncated
    assert len(s.input_ids) == 8 + 6


def test_case4_chatglm2_style_two_rounds():
    c = collator(chatglm_style="chatglm2")
    (s,) = c.encode(conv(row("q2", "the answer", [["q1", "a1"]]), "chatglm")).samples
    prompt = "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答："
    assert s.input_ids == [GMASK, SOP] + E(prompt) + E("the answer") + [EOS]
    assert "[Round 1]\n\n问：" in tok().decode(s.input_ids) and "[Round 2]\n\n问：" in tok().decode(s.input_ids)
    assert labelled(s) == E("the answer") + [EOS]
    assert s.labels[: 2 + len(E(prompt))] == [-100] * (2 + len(E(prompt)))


def test_chatglm2_truncation_budgets():
    c = collator(chatglm_style="chatglm2", max_source_length=6, max_target_length=3)
    (s,) = c.encode(conv(row("one two three four five six", "alpha beta gamma delta"), "chatglm")).samples
    prompt = "[Round 1]\n\n问：one two three four five six\n\n答："
    assert s.input_ids == [GMASK, SOP] + E(prompt)[:4] + E("alpha beta gamma delta")[:3] + [EOS]


def test_source_prefix_and_null_history_column_give_bare_query():
    c = collator(history_column=None, source_prefix="PFX ")
    (s,) = c.encode(conv(row("q", "a", [["old", "x"]]), "chatglm", history_column=None)).samples
    assert s.input_ids == E("PFX q") + [GMASK, SOP] + E("a") + [EOS]


def test_separator_tokens_configurable():
    (s,) = collator(separator_tokens=["<s>"]).encode(conv(row("q", "a"), "chatglm")).samples
    a = E("[Round 0]\n问：q\n答：")
    assert s.input_ids == a + [BOS] + E("a") + [EOS]
    assert s.labels == [-100] * len(a) + [BOS] + E("a") + [EOS]  # loss starts at the last separator
    (s,) = collator(separator_tokens=[]).encode(conv(row("q", "a"), "chatglm")).samples
    assert s.input_ids == a + E("a") + [EOS] and labelled(s) == E("a") + [EOS]
    with pytest.raises(ConfigError, match="data.separator_tokens.*'<nope>'"):
        collator(separator_tokens=["<nope>"])


def test_empty_query_or_answer_rows_are_dropped_and_counted():
    for r in (row("", "a"), row("q", "")):
        enc = collator().encode(conv(r, "chatglm"))
        assert enc.samples == [] and enc.dropped == ["empty query or answer"]
    # an empty user message inside a session drops that round only
    enc = collator().encode(conv(messages_record([("q1", "a1"), ("", "a2"), ("q3", "a3")]), "messages"))
    assert len(enc.samples) == 2 and enc.dropped == ["empty query or answer"]


def test_drop_oldest_keeps_current_question():
    history = [[f"old question number {k}", f"old answer number {k}"] for k in range(6)]
    r = row("the current question", "the answer", history)
    seed = collator(max_source_length=70).encode(conv(r, "chatglm")).samples[0]
    assert "the current question" not in tok().decode(seed.input_ids)  # seed cuts the tail
    kept = collator(max_source_length=70, truncation="drop_oldest").encode(conv(r, "chatglm")).samples[0]
    text = tok().decode(kept.input_ids)
    assert kept.truncated and text.startswith("[Round 0]\n问：old question number")
    assert "问：the current question\n答：" in text and "old question number 0" not in text
    assert len(kept.input_ids) - len(E("the answer")) - 2 <= 70


def test_case10_lengths_and_labelled_text():
    c = collator(max_source_length=16, max_target_length=8)
    for r in (row("short", "ok"), row("a much longer question than allowed here", "and a long answer too, cut")):
        (s,) = c.encode(conv(r, "chatglm")).samples
        assert len(s.input_ids) == len(s.labels) <= 16 + 8
        assert tok().decode(labelled(s)) == "<sop>" + tok().decode(E(r["response"])[:6]) + "</s>"


def test_chatglm2_style_keeps_round_template_without_history_column():
    # ChatGLM2's main.py calls tokenizer.build_prompt(query, None), which still writes [Round 1]
    c = collator(chatglm_style="chatglm2", history_column=None)
    (s,) = c.encode(conv(row("q", "a", [["old", "x"]]), "chatglm", history_column=None)).samples
    assert s.input_ids == [GMASK, SOP] + E("[Round 1]\n\n问：q\n\n答：") + E("a") + [EOS]

"""The chat_template collator against spec §3 and check cases 9-10 (shipped ChatML tokenizer)."""

import copy

import pytest
from data_helpers import E, conv, labelled, messages_record, recipe, tid, tok

from peftchat.errors import ConfigError, DataError
from peftchat.formats.chat_template import ChatTemplateFormat as ChatTemplateCollator
from peftchat.formats.chat_template import end_of_turn_ids

IM_END = "<|im_end|>"
PAIRS = [("What is 2+2?", "It is 4."), ("And 3+3?", "That is 6.")]


def collator(tokenizer=None, **data):
    return ChatTemplateCollator(recipe(**data).data, tokenizer or tok())


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_end_of_turn_is_im_end():
    assert end_of_turn_ids(tok()) == [tid(IM_END)]


def test_case9_only_assistant_contents_and_their_end_of_turn_carry_loss():
    record = messages_record(PAIRS, system="Be exact.")
    (s,) = collator().encode(conv(record, "messages")).samples
    text = chatml("system", "Be exact.") + "".join(chatml("user", q) + chatml("assistant", a) for q, a in PAIRS)
    assert s.input_ids == E(text)
    # the labelled runs are exactly each answer + <|im_end|> (not the newline after it)
    runs, run = [], []
    for t, lab in zip(s.input_ids, s.labels):
        if lab != -100:
            assert lab == t
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    assert runs == [E(a) + [tid(IM_END)] for _, a in PAIRS]


def test_spans_match_the_templates_generation_markers():
    record = messages_record(PAIRS + [("Last one?", "Yes.")], system="S")
    (s,) = collator().encode(conv(record, "messages")).samples
    marked = tok().apply_chat_template(
        record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert marked["input_ids"] == s.input_ids
    assert [int(x != -100) for x in s.labels] == marked["assistant_masks"]


def test_last_assistant_only():
    (s,) = collator(loss_on="last_assistant").encode(conv(messages_record(PAIRS), "messages")).samples
    assert labelled(s) == E("That is 6.") + [tid(IM_END)]


def test_tool_calls_the_template_cannot_render_are_an_error_not_silent_text():
    """The shipped ChatML template writes no tool list and no tool call (tests/data/test_tool_calls.py
    trains them with a template that does)."""
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    with pytest.raises(
        DataError, match=r"^test\[0\]: the conversation has tool calls, but the chat template of .*tokenizer"
    ):
        collator().encode(conv({"messages": msgs}, "messages"))
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    record = {**messages_record(PAIRS), "tools": tools}
    with pytest.raises(DataError, match=r"has a tool list, but the chat template"):
        collator().encode(conv(record, "messages"))


def test_chatglm_row_history_gets_no_loss():
    row = {"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]}
    (s,) = collator().encode(conv(row, "chatglm")).samples
    assert labelled(s) == E("a2") + [tid(IM_END)]


def test_no_doubled_bos_and_pad_equal_to_eos():
    t = copy.deepcopy(tok())
    t.chat_template = "{{ bos_token }}" + t.chat_template  # a template that writes the BOS itself
    t.pad_token = t.eos_token
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye</s>"}]}
    (s,) = collator(t).encode(conv(record, "messages")).samples
    assert s.input_ids[0] == t.bos_token_id and s.input_ids[1] != t.bos_token_id
    assert s.input_ids.count(t.bos_token_id) == 1
    # eos (== pad) inside the answer still carries loss: labels go by position, never by id
    assert t.eos_token_id in labelled(s)
    # and no BOS is added when the template writes none
    (s,) = collator().encode(conv(record, "messages")).samples
    assert tok().bos_token_id not in s.input_ids


def test_truncation_seed_and_drop_oldest():
    pairs = [(f"question number {k}", f"answer number {k}") for k in range(5)]
    record = messages_record(pairs, system="System prompt stays.")
    (full,) = collator().encode(conv(record, "messages")).samples
    limit = len(full.input_ids) - 20
    (s,) = collator(max_length=limit).encode(conv(record, "messages")).samples
    assert s.input_ids == full.input_ids[:limit] and s.labels == full.labels[:limit] and s.truncated
    (s,) = collator(max_length=limit, truncation="drop_oldest").encode(conv(record, "messages")).samples
    text = tok().decode(s.input_ids)
    assert len(s.input_ids) <= limit and s.truncated
    assert text.startswith(chatml("system", "System prompt stays.") + chatml("user", "question number 1"))
    assert text.endswith(chatml("assistant", "answer number 4"))


def test_truncation_leaving_no_loss_drops_the_sample():
    record = messages_record([("a long question " * 10, "short")])
    enc = collator(max_length=10).encode(conv(record, "messages"))
    assert enc.samples == [] and enc.dropped == ["no loss tokens left after truncation"]


def test_tokenizer_without_template_is_a_config_error():
    t = copy.deepcopy(tok())
    t.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        collator(t)


def test_case10_lengths_and_labelled_text():
    record = messages_record(PAIRS)
    for limit in (2048, 30):
        for s in collator(max_length=limit).encode(conv(record, "messages")).samples:
            assert len(s.input_ids) == len(s.labels) <= limit
    (s,) = collator().encode(conv(record, "messages")).samples
    assert tok().decode(labelled(s)) == "".join(a + IM_END for _, a in PAIRS)

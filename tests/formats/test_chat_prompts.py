"""Chat prompts equal the training prefixes token for token; stop tokens; reply extraction.
(The assertions of the former tests/data/test_prompting.py, through the format objects.)"""

import pytest
from data_helpers import META, E, conv, messages_record, moss_record, moss_turn, recipe, tid, tok

from peftchat.errors import UserError
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format

PAIRS = [
    ("How do I boil an egg?", "Boil it for six minutes."),
    ("And a hard one?", "Ten minutes."),
    ("Thanks! Anything else?", "Cool it in cold water."),
]
HISTORY = Conversation.from_rounds(PAIRS[:2])
FIELDS = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")


def budget(r):
    return (r.decoding.max_context or r.data.max_length) - r.decoding.max_new_tokens


def chat_prompt_ids(r, history, query):
    return make_format(r.data, tok()).prompt(history, query, budget(r)).ids


def train_samples(r, record, fmt):
    return make_format(r.data, tok()).encode(conv(record, fmt, **_data(r))).samples


def _data(r):
    return {"meta_instruction": r.data.meta_instruction, "history_column": r.data.history_column}


@pytest.mark.parametrize("style", ["chatglm", "chatglm2"])
def test_chatglm_prompt_is_the_round_3_prefix(style):
    r = recipe(collator="chatglm", chatglm_style=style)
    third = train_samples(r, messages_record(PAIRS), "messages")[2]
    prompt = chat_prompt_ids(r, HISTORY, PAIRS[2][0])
    n_answer = len(E(PAIRS[2][1])) + 1  # answer + eos follow the prompt
    assert prompt == third.input_ids[:-n_answer]
    assert prompt[-1] == (tid("<sop>") if style == "chatglm" else E("答：")[-1])
    assert "[Round 2]" in tok().decode(prompt) if style == "chatglm" else "[Round 3]" in tok().decode(prompt)


def test_moss_prompt_is_the_session_prefix_up_to_turn_3s_answer():
    turns = [moss_turn(q, a) for q, a in PAIRS]
    r = recipe(collator="moss", meta_instruction=META)
    fmt = make_format(r.data, tok())
    (session,) = train_samples(r, moss_record(turns), "moss")
    history = Conversation.from_rounds(PAIRS[:2])
    history.moss_turns = [[(f, t[f]) for f in FIELDS] for t in turns[:2]]
    prompt = chat_prompt_ids(r, history, PAIRS[2][0])
    n = len(E(META)) + sum(len(E(t[f])) for t in turns[:2] for f in FIELDS) + len(E(turns[2]["Human"]))
    assert prompt == session.input_ids[:n]
    assert tok().decode(prompt).endswith("<|Human|>: Thanks! Anything else?<eoh>\n")
    # what the model is trained to write next: the rest of turn 3, ending with <eom>
    rest = session.input_ids[n:]
    assert tok().decode(rest).startswith("<|Inner Thoughts|>: None<eot>\n")
    assert fmt.parse_reply(rest).text == PAIRS[2][1]
    # the round built from that output renders back exactly as trained
    reply = fmt.parse_reply(rest)
    assert reply.text == PAIRS[2][1] and reply.fields["Tool Responses"] == turns[2]["Tool Responses"]
    after = fmt.add_round(history, PAIRS[2][0], reply)
    assert chat_prompt_ids(r, after, "q4") == session.input_ids + E("<|Human|>: q4<eoh>\n")


def test_moss_prompt_for_sessions_rendered_from_messages():
    r = recipe(collator="moss", meta_instruction="Be brief.")
    (session,) = train_samples(r, messages_record(PAIRS), "messages")
    prompt = chat_prompt_ids(r, HISTORY, PAIRS[2][0])
    assert session.input_ids[: len(prompt)] == prompt
    assert tok().decode(session.input_ids[len(prompt) :]) == f"<|MOSS|>: {PAIRS[2][1]}<eom>\n"


def test_chat_template_prompt_is_the_prefix_up_to_turn_3s_answer():
    r = recipe(collator="chat_template", meta_instruction="Be brief.")
    (sample,) = train_samples(r, messages_record(PAIRS, system="Be brief."), "messages")
    prompt = chat_prompt_ids(r, HISTORY, PAIRS[2][0])
    first_loss_of_turn3 = [i for i, x in enumerate(sample.labels) if x != -100][-len(E(PAIRS[2][1])) - 1]
    assert prompt == sample.input_ids[:first_loss_of_turn3]
    assert tok().decode(prompt).endswith("<|im_start|>assistant\n")
    generated = E(PAIRS[2][1]) + [tid("<|im_end|>")] + E("\nignored")
    assert make_format(r.data, tok()).parse_reply(generated).text == PAIRS[2][1]


def test_stop_token_ids():
    eos = tok().eos_token_id
    assert make_format(recipe(collator="chatglm").data, tok()).stop_ids == [eos]
    assert make_format(recipe(collator="moss").data, tok()).stop_ids == [tid("<eom>"), eos]
    assert make_format(recipe(collator="chat_template").data, tok()).stop_ids == [tid("<|im_end|>"), eos]


def test_chatglm_reply_and_history_budget():
    r = recipe(collator="chatglm", max_source_length=60)
    fmt = make_format(r.data, tok())
    assert fmt.parse_reply(E(" Fine, thanks.") + [tok().eos_token_id] + E("junk")).text == "Fine, thanks."
    long_history = Conversation.from_rounds([(f"question number {k}", f"answer number {k}") for k in range(10)])
    built = fmt.prompt(long_history, "the last question")
    prompt = tok().decode(built.ids)
    assert "问：the last question\n答：" in prompt and "question number 0" not in prompt
    assert prompt.startswith("[Round 0]\n")  # the kept rounds are renumbered from 0
    assert f"[Round 0]\n问：question number {built.dropped_rounds}\n" in prompt


def test_context_budget_drops_oldest_rounds_then_fails_clearly():
    r = recipe(collator="chat_template", max_length=80)
    r.decoding.max_new_tokens = 20
    long_history = Conversation.from_rounds([(f"question number {k}", f"answer number {k}") for k in range(10)])
    ids = chat_prompt_ids(r, long_history, "last")
    assert len(ids) <= 60 and "answer number 9" in tok().decode(ids) and "number 0" not in tok().decode(ids)
    with pytest.raises(UserError, match="context budget of 60"):
        chat_prompt_ids(r, Conversation([]), "word " * 100)

"""Tool-calling records (issue 36) with a tool-aware template: ShareGPT `function_call` /
`observation` + `tools`, OpenAI `messages` with `tool_calls` + `tools`, rendered by the template's
own tool syntax; turn-order rules; role maps; empty system turns and empty answers.

The template (qwen_style_tools.jinja) writes the same text as Qwen2.5's for these conversations,
plus `{% generation %}` markers, so transformers' own assistant mask checks our labels. It is
installed into a copy of the shipped tokenizer in a tmp dir."""

import json
from pathlib import Path

import pytest
from data_helpers import TOKENIZER_DIR, recipe, write_jsonl

from peftchat.cli import main
from peftchat.data.pipeline import build_datasets
from peftchat.data.readers import normalize
from peftchat.errors import DataError
from peftchat.formats.chat_template import ChatTemplateFormat
from peftchat.formats.turns import parse_tool_calls

TEMPLATE = Path(__file__).with_name("qwen_style_tools.jinja")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}},
]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def tool_tok_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    t.chat_template = TEMPLATE.read_text(encoding="utf-8")
    out = tmp_path_factory.mktemp("tool-tokenizer")
    t.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def ttok(tool_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tool_tok_dir)


def sharegpt_record(tools=json.dumps(TOOLS)):
    rec = {
        "conversations": [
            {"from": "human", "value": "Weather and time in Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps(
                    [{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "time", "arguments": {}}]
                ),
            },
            {"from": "observation", "value": "sunny, 20C; 14:05"},
            {"from": "gpt", "value": "Sunny and 20C; it is 14:05."},
            {"from": "human", "value": "Thanks!"},
            {"from": "gpt", "value": "You are welcome."},
        ]
    }
    return {**rec, "tools": tools} if tools is not None else rec


EXPECTED = [
    {"role": "user", "content": "Weather and time in Oslo?"},
    {"role": "assistant", "tool_calls": [call("weather", city="Oslo"), call("time")]},
    {"role": "tool", "content": "sunny, 20C; 14:05"},
    {"role": "assistant", "content": "Sunny and 20C; it is 14:05."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def messages_record():
    oa = lambda name, args: {
        "id": f"call_{name}",
        "type": "function",  # noqa: E731
        "function": {"name": name, "arguments": json.dumps(args)},
    }  # OpenAI: a JSON string
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": "You check the weather."},
            {"role": "user", "content": "Weather in Oslo and Bergen?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [oa("weather", {"city": "Oslo"}), oa("weather", {"city": "Bergen"})],
            },
            {"role": "tool", "tool_call_id": "call_weather", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_weather", "content": "rain"},
            {"role": "assistant", "content": "Oslo is sunny, Bergen rainy."},
        ],
    }


def encode_one(ttok, record, fmt, **data):
    conv = normalize(record, fmt, recipe(**data).data, "t.jsonl:1")
    (s,) = ChatTemplateFormat(recipe(**data).data, ttok).encode(conv).samples
    return conv, s


def reference(ttok, messages, tools):
    return ttok.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )


def test_sharegpt_tool_record_equals_apply_chat_template_with_tools(ttok):
    conv, s = encode_one(ttok, sharegpt_record(), "sharegpt")
    assert conv.messages == EXPECTED and conv.tools == TOOLS
    ref = reference(ttok, EXPECTED, TOOLS)
    assert s.input_ids == ref["input_ids"]
    # labels only on assistant tokens (the template's own generation markers), as the ids
    assert [int(x != -100) for x in s.labels] == ref["assistant_masks"]
    assert all(lab in (-100, t) for t, lab in zip(s.input_ids, s.labels))
    text = ttok.decode(s.input_ids)
    assert "<tools>" in text and '"name": "time"' in text and "<tool_response>\nsunny, 20C; 14:05" in text
    trained = ttok.decode([t for t in s.labels if t != -100])
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in trained
    assert "sunny, 20C" not in trained and "Thanks" not in trained  # no loss on tool results or the user


def test_messages_tool_record_equals_apply_chat_template_with_tools(ttok):
    conv, s = encode_one(ttok, messages_record(), "messages")
    calls = conv.messages[2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]
    assert calls[0]["id"] == "call_weather"
    ref = reference(ttok, conv.messages, TOOLS)
    assert s.input_ids == ref["input_ids"]
    assert [int(x != -100) for x in s.labels] == ref["assistant_masks"]
    assert ttok.decode(s.input_ids).startswith("<|im_start|>system\nYou check the weather.\n\n# Tools")


def test_a_per_source_tools_default_and_the_records_own_list(tmp_path, ttok, tool_tok_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [sharegpt_record(tools=None), sharegpt_record(tools=[TOOLS[0]])])
    r = recipe(train=[{"path": str(path), "format": "sharegpt", "tools": TOOLS}], cache_dir=str(tmp_path / "c"))
    bundle = build_datasets(r, ttok)
    assert bundle.train[0]["input_ids"] == reference(ttok, EXPECTED, TOOLS)["input_ids"]  # the default
    assert bundle.train[1]["input_ids"] == reference(ttok, EXPECTED, [TOOLS[0]])["input_ids"]  # its own


def test_a_template_without_tool_syntax_is_exit_2_naming_template_and_record(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [sharegpt_record()])
    rc = main(
        [
            "data",
            "inspect",
            str(Path(__file__).parents[2] / "recipes" / "demo_chat_template.yaml"),
            f"model.tokenizer={TOKENIZER_DIR}",
            f"data.train={path}",
            "data.eval_split=0",
            "data.format=sharegpt",
            f"data.cache_dir={tmp_path / 'c'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:1: the conversation has a tool list and tool calls, but the chat template of {TOKENIZER_DIR}" in err


def test_data_inspect_shows_a_tool_record_with_its_loss_tokens(tmp_path, capsys, tool_tok_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [sharegpt_record()])
    rc = main(
        [
            "data",
            "inspect",
            str(Path(__file__).parents[2] / "recipes" / "demo_chat_template.yaml"),
            f"model.tokenizer={tool_tok_dir}",
            f"data.train={path}",
            "data.eval_split=0",
            "data.format=sharegpt",
            f"data.cache_dir={tmp_path / 'c'}",
            "data.max_length=2048",
            "--index",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert '⟦<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>' in out
    assert "<tool_response>\nsunny, 20C; 14:05\n</tool_response>" in out and "⟦Sunny and 20C" in out


U = {"from": "human", "value": "q"}
A = {"from": "gpt", "value": "a"}
F = {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'}
O = {"from": "observation", "value": "sunny"}  # noqa: E741 (one letter per turn kind, like A, F, S)
S = {"from": "system", "value": "be brief"}
TURN_ORDER = [
    # (turns, index named, message, reason counted with on_error=skip)
    (
        [U, A, A],
        2,
        r"two assistant turns in a row \(conversations\[1\] and conversations\[2\]\)",
        "consecutive same-role turns",
    ),
    ([U, U, A], 1, "two user turns in a row", "consecutive same-role turns"),
    ([U, O, A], 1, "a tool result with no tool call before it", "tool result with no call before it"),
    ([U, A, O, A], 2, "a tool result with no tool call before it", "tool result with no call before it"),
    ([U, A, U], 2, "the conversation ends on a user turn", "ends on a user turn"),
    ([U, F, O], 2, "the conversation ends on a tool turn", "ends on a tool turn"),
    ([U, A, S, U, A], 2, "a system turn in the middle", "system turn in the middle"),
    ([A, U, A], 0, "the conversation must start with a user turn, found 'assistant'", "first turn not the user's"),
    ([U, F, O, U, A], 3, "a user turn right after a tool result", "tool result not answered"),
    ([U, F, U, A], 2, "a user turn right after a tool call", "tool call with no result"),
]


@pytest.mark.parametrize(
    "turns,index,message,reason", TURN_ORDER, ids=[c[3] + str(i) for i, c in enumerate(TURN_ORDER)]
)
def test_turn_order_errors_name_file_line_and_turn_or_are_counted(tmp_path, ttok, turns, index, message, reason):
    good = {"conversations": [U, A]}
    path = write_jsonl(tmp_path / "t.jsonl", [good, {"conversations": turns}, good])
    r = recipe(train=str(path), format="sharegpt", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=rf"^{path}:2: conversations\[{index}\]: {message}"):
        build_datasets(r, ttok)
    bundle = build_datasets(
        recipe(train=str(path), format="sharegpt", cache_dir=str(tmp_path / "c"), on_error="skip"), ttok
    )
    assert len(bundle.train) == 2 and bundle.report.skipped == 1
    assert bundle.report.skipped_reasons == {reason: 1}
    assert f"  skipped 1: {reason}" in bundle.report.summary()
    assert f"{path}:2: conversations[{index}]:" in bundle.report.summary()


def test_a_system_field_and_a_system_turn_name_the_turn_not_a_shifted_index():
    record = {"system": "from the field", "conversations": [S, U, A]}
    with pytest.raises(DataError, match=r"^x:1: conversations\[0\]: a system turn in the middle"):
        normalize(record, "sharegpt", recipe().data, "x:1")
    record = {"system": "s", "conversations": [U, A, U, U]}
    with pytest.raises(DataError, match=r"conversations\[3\]: two user turns"):
        normalize(record, "sharegpt", recipe().data, "x:1")


def test_other_role_spellings_only_through_data_roles():
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    with pytest.raises(DataError, match=r"conversations\[1\]\.from is 'bot'; expected one of .*data\.roles"):
        normalize(record, "sharegpt", recipe().data, "x:1")
    conv = normalize(record, "sharegpt", recipe(roles={"bot": "assistant"}).data, "x:1")
    assert conv.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    msgs = {"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"messages\[0\]\.role is 'human'"):
        normalize(msgs, "messages", recipe().data, "x:1")
    assert normalize(msgs, "messages", recipe(roles={"human": "user"}).data, "x:1").messages[0]["role"] == "user"


def test_bad_tool_structures_name_the_turn():
    bad = {"conversations": [U, {"from": "function_call", "value": "{not json"}, O, A]}
    with pytest.raises(DataError, match=r"conversations\[1\]\.value is not valid JSON"):
        normalize(bad, "sharegpt", recipe().data, "x:1")
    bad = {"conversations": [U, {"from": "function_call", "value": '{"arguments": {}}'}, O, A]}
    with pytest.raises(DataError, match=r"conversations\[1\]\.value has no function name"):
        normalize(bad, "sharegpt", recipe().data, "x:1")
    with pytest.raises(DataError, match=r"x:1: field 'tools' must be a list of tool objects"):
        normalize({"conversations": [U, A], "tools": '{"name": "x"}'}, "sharegpt", recipe().data, "x:1")


@pytest.mark.parametrize("meta", [None, "From the recipe."])
def test_an_empty_system_turn_is_no_system_turn_in_every_format(ttok, meta):
    """ShareGPT, messages and Alpaca give the same ids for an empty system turn: none, and
    data.meta_instruction (when set) takes its place."""
    records = [
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "system", "value": ""},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
        ),
        ("sharegpt", {"system": "", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        (
            "messages",
            {
                "messages": [
                    {"role": "system", "content": " "},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ),
        ("alpaca", {"system": "", "instruction": "q", "output": "a"}),
    ]
    ids = {tuple(encode_one(ttok, rec, fmt, meta_instruction=meta)[1].input_ids) for fmt, rec in records}
    assert len(ids) == 1
    text = ttok.decode(list(ids.pop()))
    assert text.startswith("<|im_start|>system\nFrom the recipe.") if meta else text.startswith("<|im_start|>user")


def test_an_empty_answer_is_reported_as_an_empty_answer(ttok):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    conv = normalize(record, "messages", recipe().data, "x:1")
    enc = ChatTemplateFormat(recipe().data, ttok).encode(conv)
    assert enc.samples == [] and enc.dropped == ["empty answer"] and enc.left_out == []


def test_chatglm_rows_of_a_tool_record_are_an_error_not_dropped_tools(ttok):
    from peftchat.formats.chatglm import ChatGLMFormat

    conv = normalize({"conversations": [U, A], "tools": TOOLS}, "sharegpt", recipe().data, "x:1")
    with pytest.raises(DataError, match="x:1: the chatglm and moss collators have no place for tool"):
        ChatGLMFormat(recipe(collator="chatglm").data, ttok).encode(conv)


def test_a_chatglm_row_with_a_tool_list_is_a_bad_record_naming_the_field():
    row = {"prompt": "q", "response": "a", "tools": TOOLS}
    with pytest.raises(DataError, match=r"^x:1: field 'tools': a chatglm row .* has no place for a tool list"):
        normalize(row, "chatglm", recipe().data, "x:1")
    assert normalize({**row, "tools": []}, "chatglm", recipe().data, "x:1").messages[-1]["content"] == "a"


def test_parse_tool_calls_reads_back_the_templates_syntax(ttok):
    conv, s = encode_one(ttok, sharegpt_record(), "sharegpt")
    first = [t for t, lab in zip(s.input_ids, s.labels) if lab != -100]
    generated = ttok.decode(first, skip_special_tokens=True).split("Sunny")[0]
    text, calls = parse_tool_calls(generated)
    assert calls == EXPECTED[1]["tool_calls"] and text == ""
    text, calls = parse_tool_calls(
        'Let me see. <tool_call>\n{"name": "time", "arguments": "{}"}\n</tool_call> <tool_call>oops</tool_call>'
    )
    assert calls == [call("time")] and text == "Let me see.  <tool_call>oops</tool_call>"


@pytest.mark.parametrize(
    "text, shown",
    [
        ("Let me check.", "Let me check."),
        ("Let me check.\n<tool", "Let me check."),  # may become a call: held back with the whitespace before it
        ("Let me check. <tool_call>\n{", "Let me check."),
        ("a < b", "a < b"),
        ("a <tool_x", "a <tool_x"),  # can no longer become `<tool_call>`
        ("<", ""),
    ],
)
def test_before_tool_call_shows_only_text_that_cannot_become_a_call(text, shown):
    from peftchat.formats.turns import before_tool_call

    assert text[: before_tool_call(text)] == shown


@pytest.mark.parametrize(
    "turns, index, says",
    [
        ([("user", "q")], None, None),
        ([("user", "q"), ("assistant", "calls"), ("tool", "r"), ("tool", "r2")], None, None),
        ([("user", "q"), ("assistant", "a")], 1, "must be a user message or the results"),
        ([("user", "q"), ("assistant", "calls")], 1, "must be a user message or the results"),
        ([("system", "s")], 0, "must be a user message or the results"),
    ],
)
def test_a_chat_request_must_end_where_the_assistant_answers(turns, index, says):
    from peftchat.formats.turns import TurnOrderError, check_turn_order

    messages = [
        {"role": r, "tool_calls": [call("time")]} if c == "calls" else {"role": r, "content": c} for r, c in turns
    ]
    where = [f"messages[{i}]" for i in range(len(messages))]
    if says is None:
        check_turn_order(messages, where, "request", awaiting_reply=True)
        return
    with pytest.raises(TurnOrderError, match=says) as e:
        check_turn_order(messages, where, "request", awaiting_reply=True)
    assert e.value.index == index

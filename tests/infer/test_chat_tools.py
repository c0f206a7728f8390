"""`peftchat chat --tools`: a tool-tuned adapter is prompted as it was trained — the session's tool
list is rendered by the template as training rendered a record's `tools`, and a reply holding a
call is kept as the assistant's `tool_calls` (issue 36)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from peftchat.cli import main
from peftchat.config import recipe_from_dict
from peftchat.data.readers import normalize
from peftchat.demo_assets import demo_tokenizer_dir
from peftchat.errors import UserError
from peftchat.formats.registry import make_format
from peftchat.infer.chat import ChatSession

TEMPLATE = Path(__file__).parents[1] / "data" / "qwen_style_tools.jinja"
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}


@pytest.fixture(scope="module")
def ttok():
    t = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    t.chat_template = TEMPLATE.read_text(encoding="utf-8")  # this copy only; the shipped files are untouched
    return t


def recipe(collator="chat_template"):
    return recipe_from_dict(
        {
            "model": {"path": "unused"},
            "data": {"train": "unused.jsonl", "collator": collator},
            "decoding": {"temperature": 0},
        }
    )


class ReplaysTraining:
    """Stands in for the model: it continues the training sequence the prompt starts, up to and
    including the next stop token; a prompt that starts no training sequence fails the test."""

    def __init__(self, sequence, stop_ids):
        self.sequence, self.stop_ids = sequence, set(stop_ids)

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, input_ids, attention_mask, generation_config, streamer=None, logits_processor=None):
        prompt = input_ids[0].tolist()
        assert self.sequence[: len(prompt)] == prompt, "the chat prompt is not what training showed"
        rest = self.sequence[len(prompt) :]
        cut = next(k for k, t in enumerate(rest) if t in self.stop_ids)
        return torch.tensor([prompt + rest[: cut + 1]])


def test_chat_with_tools_prompts_as_training_rendered_the_tool_record(ttok):
    record = {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
    }
    r = recipe()
    fmt = make_format(r.data, ttok)
    (sample,) = fmt.encode(normalize(record, "messages", r.data, "t:1")).samples
    session = ChatSession(ReplaysTraining(sample.input_ids, fmt.stop_ids), ttok, r, tools=TOOLS)
    reply = session.reply("Weather in Oslo?")
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in reply
    assert session.history.messages[-1] == {"role": "assistant", "tool_calls": [CALL]}
    # the next prompt renders the call as training rendered it, and keeps the tool list
    nxt = session.build_prompt("And tomorrow?")
    expected = ttok.apply_chat_template(
        record["messages"][:2] + [{"role": "user", "content": "And tomorrow?"}],
        tools=TOOLS,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
    )
    assert nxt == expected["input_ids"]


def test_tools_need_a_format_and_template_that_render_them(ttok, tmp_path):
    with pytest.raises(UserError, match="--tools: the moss format has no place for a tool list"):
        ChatSession(ReplaysTraining([], []), ttok, recipe("moss"), tools=TOOLS)
    shipped = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    with pytest.raises(UserError, match="--tools: the conversation has a tool list, but the chat template of"):
        ChatSession(ReplaysTraining([], []), shipped, recipe(), tools=TOOLS)


@pytest.mark.parametrize(
    "text,problem",
    [(None, "cannot read it"), ("{oops", "not valid JSON"), ('{"name": "x"}', "expected a JSON list of tool objects")],
)
def test_a_bad_tools_file_is_exit_2_before_the_model_loads(tmp_path, capsys, text, problem):
    path = tmp_path / "tools.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert main(["chat", str(tmp_path / "no-such-model"), "--tools", str(path), "--message", "hi"]) == 2
    assert f"peftchat: error: --tools {path}: {problem}" in capsys.readouterr().err


def test_eval_scores_answers_not_tool_calls_and_keeps_the_tool_list():
    from peftchat.infer.evaluate import eval_rounds

    record = {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome."},
        ],
    }
    conv = normalize(record, "messages", recipe().data, "t:1")
    ((history, query, reference),) = eval_rounds(conv)
    assert (query, reference) == ("Thanks", "Welcome.") and history.tools == TOOLS
    assert history.messages == conv.messages[:4]


# --- feeding tool results back: the model continues as training rendered the results ---------

TWO_CALLS = [
    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}},
    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Bergen"}}},
]


def _tool_record(calls, results):
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": calls},
            *({"role": "tool", "content": r} for r in results),
            {"role": "assistant", "content": "Sunny."},
        ],
    }


def _replaying_session(ttok, record):
    r = recipe()
    fmt = make_format(r.data, ttok)
    (sample,) = fmt.encode(normalize(record, "messages", r.data, "t:1")).samples
    return ChatSession(ReplaysTraining(sample.input_ids, fmt.stop_ids), ttok, r, tools=TOOLS)


def test_a_tool_result_goes_into_the_history_and_the_model_continues(ttok):
    record = _tool_record([CALL], ["sunny"])
    session = _replaying_session(ttok, record)
    session.reply("Weather in Oslo?")
    assert session.pending_calls() == [CALL]
    with pytest.raises(UserError, match="the model called weather: give the result first"):
        session.reply("Hello?")
    assert session.tool_result("sunny") == "Sunny."  # ReplaysTraining: the prompt is training's
    assert session.history.messages == record["messages"] and not session.pending_calls()
    with pytest.raises(UserError, match="the last reply called no tool"):
        session.tool_result("late")


def test_piped_tool_lines_answer_every_call_before_the_model_continues(ttok, capsys):
    import io

    from peftchat.infer.chat import chat_loop

    record = _tool_record(TWO_CALLS, ["sunny", "rain"])
    session = _replaying_session(ttok, record)
    out = io.StringIO()
    chat_loop(session, ["Weather in Oslo?", "/tool sunny", "/tool rain"], out, stream=True, interactive=False)
    assert out.getvalue().endswith("</tool_call>\nSunny.\n")  # replies only, one per line
    assert 'tool call: weather({"city": "Oslo"}); weather({"city": "Bergen"})' in capsys.readouterr().err
    assert session.history.messages == record["messages"]


def test_on_a_terminal_the_line_after_a_call_is_its_result(ttok):
    import io

    from peftchat.infer.chat import chat_loop

    record = _tool_record([CALL], ["sunny"])
    session = _replaying_session(ttok, record)
    out = io.StringIO()
    chat_loop(session, ["Weather in Oslo?", "sunny"], out, stream=False, interactive=True)
    shown = out.getvalue()
    assert '(tool call: weather({"city": "Oslo"}))' in shown and shown.endswith("Assistant: Sunny.\n")
    assert session.history.messages == record["messages"]


def test_a_messages_file_is_answered_as_serve_answers_a_request(ttok):
    from peftchat.infer.chat import _respond

    record = _tool_record([CALL], ["sunny"])
    session = _replaying_session(ttok, record)
    oa_call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    given = [
        record["messages"][0],
        {"role": "assistant", "content": None, "tool_calls": [oa_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    query = session.load_messages(given, None, "--messages m.json")
    written = []
    _respond(session, query, written.append, stream=False, interactive=False)
    assert written == ["Sunny.\n"]
    with pytest.raises(UserError, match=r"--messages m.json: messages\[1\]: a tool result with no tool call"):
        session.load_messages([given[0], given[2]], None, "--messages m.json")


@pytest.mark.parametrize(
    "text,problem", [("{oops", "not valid JSON"), ('{"x": 1}', "expected a JSON list of messages")]
)
def test_a_bad_messages_file_is_exit_2_before_the_model_loads(tmp_path, capsys, text, problem):
    path = tmp_path / "m.json"
    path.write_text(text, encoding="utf-8")
    assert main(["chat", str(tmp_path / "no-such-model"), "--messages", str(path)]) == 2
    assert f"peftchat: error: --messages {path}: {problem}" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "no-such-model"), "--messages", str(path), "--message", "hi"]) == 2
    assert "--message and --messages: give one" in capsys.readouterr().err


def test_chat_messages_end_to_end_with_a_tool_template(make_adapter, tmp_path, capsys):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(make_adapter("chat_template"), adapter)
    tok = AutoTokenizer.from_pretrained(str(adapter))
    tok.chat_template = TEMPLATE.read_text(encoding="utf-8")
    tok.save_pretrained(str(adapter))
    record = _tool_record([CALL], ["sunny"])
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"tools": TOOLS, "messages": record["messages"][:3]}), encoding="utf-8")
    assert main(["chat", str(adapter), "data.max_length=512", "--messages", str(path), "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")  # the reply (a random model: its text says nothing)
    shipped = tmp_path / "shipped.json"  # the demo's ChatML writes no tools: exit 2 naming it
    shutil.copytree(make_adapter("chat_template"), tmp_path / "plain")
    shipped.write_text(json.dumps({"tools": TOOLS, "messages": record["messages"][:1]}), encoding="utf-8")
    assert main(["chat", str(tmp_path / "plain"), "--messages", str(shipped)]) == 2
    assert "does not render them" in capsys.readouterr().err

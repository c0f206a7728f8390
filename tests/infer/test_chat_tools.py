"""`peftchat chat --tools`: a tool-tuned adapter is prompted as it was trained — the session's tool
list is rendered by the template as training rendered a record's `tools`, and a reply holding a
call is kept as the assistant's `tool_calls` (issue 36)."""

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
    return recipe_from_dict({"model": {"path": "unused"}, "data": {"train": "unused.jsonl", "collator": collator},
                             "decoding": {"temperature": 0}})


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
        rest = self.sequence[len(prompt):]
        cut = next(k for k, t in enumerate(rest) if t in self.stop_ids)
        return torch.tensor([prompt + rest[: cut + 1]])


def test_chat_with_tools_prompts_as_training_rendered_the_tool_record(ttok):
    record = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    r = recipe()
    fmt = make_format(r.data, ttok)
    (sample,) = fmt.encode(normalize(record, "messages", r.data, "t:1")).samples
    session = ChatSession(ReplaysTraining(sample.input_ids, fmt.stop_ids), ttok, r, tools=TOOLS)
    reply = session.reply("Weather in Oslo?")
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in reply
    assert session.history.messages[-1] == {"role": "assistant", "tool_calls": [CALL]}
    # the next prompt renders the call as training rendered it, and keeps the tool list
    nxt = session.build_prompt("And tomorrow?")
    expected = ttok.apply_chat_template(record["messages"][:2] + [{"role": "user", "content": "And tomorrow?"}],
                                        tools=TOOLS, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert nxt == expected["input_ids"]


def test_tools_need_a_format_and_template_that_render_them(ttok, tmp_path):
    with pytest.raises(UserError, match="--tools: the moss format has no place for a tool list"):
        ChatSession(ReplaysTraining([], []), ttok, recipe("moss"), tools=TOOLS)
    shipped = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    with pytest.raises(UserError, match="--tools: the conversation has a tool list, but the chat template of"):
        ChatSession(ReplaysTraining([], []), shipped, recipe(), tools=TOOLS)


@pytest.mark.parametrize("text,problem", [(None, "cannot read it"), ("{oops", "not valid JSON"),
                                          ('{"name": "x"}', "expected a JSON list of tool objects")])
def test_a_bad_tools_file_is_exit_2_before_the_model_loads(tmp_path, capsys, text, problem):
    path = tmp_path / "tools.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert main(["chat", str(tmp_path / "no-such-model"), "--tools", str(path), "--message", "hi"]) == 2
    assert f"peftchat: error: --tools {path}: {problem}" in capsys.readouterr().err


def test_eval_scores_answers_not_tool_calls_and_keeps_the_tool_list():
    from peftchat.infer.evaluate import eval_rounds

    record = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]}
    conv = normalize(record, "messages", recipe().data, "t:1")
    ((history, query, reference),) = eval_rounds(conv)
    assert (query, reference) == ("Thanks", "Welcome.") and history.tools == TOOLS
    assert history.messages == conv.messages[:4]

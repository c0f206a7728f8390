"""`peftchat serve` with tools (issue 36), through the official `openai` client: the request's
`tools`, assistant `tool_calls` and `tool` results are prompted with the tokens training gave the
same turns (the Qwen-style tool template installed into the tiny model's tokenizer), and a reply in
the template's `<tool_call>` syntax comes back as OpenAI `tool_calls`, streamed or not.

A random tiny model writes no tool call of its own: the reply text is forced, as MOSS's Tool
Responses body is forced (`ForcedContinuation`), right after the assistant header of the prompt."""

import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from peftchat.config import recipe_from_dict  # noqa: E402
from peftchat.data.readers import normalize  # noqa: E402
from peftchat.formats.chat_template import ChatTemplateFormat  # noqa: E402
from peftchat.formats.conversation import Conversation  # noqa: E402
from peftchat.formats.samples import encode_text  # noqa: E402
from peftchat.infer.engine import ChatEngine, ChatRequest, RequestError  # noqa: E402
from peftchat.infer.serve import create_app  # noqa: E402

NAME = "tiny-tools"
TEMPLATE = Path(__file__).parents[1] / "data" / "qwen_style_tools.jinja"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL_TEXT = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
ASK = {"role": "user", "content": "Weather in Oslo?"}


class ForcedReply(ChatTemplateFormat):
    """The chat template format, with the reply text `forced` written right after the prompt's
    assistant header (then the end of turn): what a tool-tuned model would answer."""

    forced = None

    def forced_continuations(self):
        if self.forced is None:
            return []
        prompt = self.prompt(Conversation(messages=[]), "x").ids
        header = prompt[max(k for k, t in enumerate(prompt) if t in self.tokenizer.all_special_ids) :]
        return [(header, encode_text(self.tokenizer, self.forced) + self.eot_ids[:1])]


def _recipe(collator="chat_template"):
    return recipe_from_dict(
        {
            "model": {"path": "unused"},
            "data": {"train": "unused.jsonl", "collator": collator, "max_length": 512},
            "decoding": {"temperature": 0, "max_new_tokens": 64},
        }
    )


@pytest.fixture(scope="module")
def model_and_tok(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.chat_template = TEMPLATE.read_text(encoding="utf-8")
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval(), tok


@pytest.fixture(scope="module")
def engine(model_and_tok):
    model, tok = model_and_tok
    r = _recipe()
    engine = ChatEngine(model, tok, r)
    engine.format = ForcedReply(r.data, tok)
    return engine


@pytest.fixture(scope="module")
def client(engine, uvicorn_app):
    with uvicorn_app(create_app(engine, NAME)) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def reply(engine):
    def force(text):
        engine.format.forced = text

    yield force
    engine.format.forced = None


def _training_ids(engine, record):
    """The training sample's ids of a `messages` record (tools included), by the engine's format."""
    conv = normalize(record, "messages", engine.recipe.data, "t:1")
    (sample,) = engine.format.encode(conv).samples
    return sample.input_ids


def _ask(client, messages, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0, **kw)


def test_a_tool_call_reply_comes_back_as_openai_tool_calls(client, engine, reply):
    reply(CALL_TEXT)
    resp = _ask(client, [ASK], tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    # the prompt is the training sample of the same turns, up to the assistant's call
    trained = _training_ids(
        engine,
        {
            "tools": TOOLS,
            "messages": [
                ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
                    ],
                },
            ],
        },
    )
    prompt = engine.finished[-1].prompt
    assert trained[: len(prompt)] == prompt and len(trained) > len(prompt)


def test_streamed_tool_calls_arrive_as_openai_deltas_never_as_text(client, reply):
    reply("Let me check.\n" + CALL_TEXT)
    whole = _ask(client, [ASK], tools=TOOLS).choices[0]
    chunks = list(_ask(client, [ASK], tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    text = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert text == whole.message.content == "Let me check."
    assert "<tool" not in text
    assert [(tc.index, tc.type, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "function", "weather", {"city": "Oslo"})
    ]
    assert calls[0].id.startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason == "tool_calls"


def test_tool_results_are_prompted_as_training_rendered_them(client, engine, reply):
    reply(CALL_TEXT)
    first = _ask(client, [ASK], tools=TOOLS).choices[0].message
    reply("Sunny, 20C.")
    # the client's own flow: the call message goes back as it came, then the result with its id
    messages = [
        ASK,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 20C"},
    ]
    resp = _ask(client, messages, tools=TOOLS).choices[0]
    assert (resp.message.content, resp.finish_reason, resp.message.tool_calls) == ("Sunny, 20C.", "stop", None)
    trained = _training_ids(
        engine, {"tools": TOOLS, "messages": messages + [{"role": "assistant", "content": "Sunny, 20C."}]}
    )
    prompt = engine.finished[-1].prompt
    assert trained[: len(prompt)] == prompt
    assert engine.tokenizer.decode(trained[len(prompt) :]).startswith("Sunny, 20C.")


def test_tool_choice_none_answers_in_text_and_unsupported_choices_are_400(client, reply):
    reply(CALL_TEXT)
    resp = _ask(client, [ASK], tools=TOOLS, tool_choice="none").choices[0]
    assert (resp.message.content, resp.finish_reason, resp.message.tool_calls) == (CALL_TEXT, "stop", None)
    no_tools = _ask(client, [ASK]).choices[0]  # without tools a reply is text, whatever it holds
    assert no_tools.message.content == CALL_TEXT and no_tools.message.tool_calls is None
    for choice in ("required", {"type": "function", "function": {"name": "weather"}}):
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, [ASK], tools=TOOLS, tool_choice=choice)
        assert e.value.body["param"] == "tool_choice" and "not supported" in e.value.body["message"]


@pytest.mark.parametrize(
    "messages, param, says",
    [
        ([ASK, {"role": "tool", "content": "x"}], "messages[1].role", "a tool result with no tool call before it"),
        (
            [
                ASK,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
                },
                {"role": "user", "content": "and?"},
            ],
            "messages[2].role",
            "its result must come first",
        ),
        (
            [
                ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "{oops"}}
                    ],
                },
                {"role": "tool", "content": "x"},
            ],
            "messages[1].tool_calls",
            "not valid JSON",
        ),
        ([ASK, {"role": "assistant", "content": "hi"}], "messages[1].role", "must be a user message or the results"),
    ],
)
def test_malformed_tool_turns_are_400_naming_the_message(client, messages, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, messages, tools=TOOLS)
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
    assert says in e.value.body["message"]


def test_a_format_or_template_without_tools_is_a_clear_400(model_and_tok, engine, uvicorn_app):
    from transformers import AutoTokenizer

    model, tok = model_and_tok
    history = Conversation(messages=[], origin="request", tools=TOOLS)
    moss = ChatEngine(model, AutoTokenizer.from_pretrained(tok.name_or_path), _recipe("moss"))
    with uvicorn_app(create_app(moss, NAME)) as port:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            _ask(c, [ASK], tools=TOOLS)
        assert (
            e.value.body["param"] == "tools"
            and "the moss format, which has no place for tools" in e.value.body["message"]
        )
        assert _ask(c, [ASK], max_tokens=2).choices[0].message.content is not None  # the server lives on
    plain = ChatEngine(model, AutoTokenizer.from_pretrained(tok.name_or_path), _recipe())  # ChatML without tools
    with pytest.raises(
        RequestError, match="the conversation has a tool list, but the chat template of .* does not render"
    ):
        plain.prepare(ChatRequest(history, "Weather in Oslo?"))
    assert engine.prepare(ChatRequest(history, "Weather in Oslo?")).prompt  # the tool template renders it

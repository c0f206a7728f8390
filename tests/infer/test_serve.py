"""`peftchat serve` through the official `openai` client against a real uvicorn server on
127.0.0.1 (ephemeral port, in a thread): replies equal `peftchat chat`'s at temperature 0,
streaming, usage, concurrency, disconnects, malformed and over-budget requests."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from peftchat.cli import main  # noqa: E402
from peftchat.formats.conversation import Conversation  # noqa: E402
from peftchat.infer.decoding import context_budget  # noqa: E402
from peftchat.infer.serve import create_app  # noqa: E402

NAME = "tiny-moss"
QUESTION = "番茄炒蛋怎么做？"


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter("moss")


@pytest.fixture(scope="module")
def server(adapter, uvicorn_app, slow_chat_engine):
    engine = slow_chat_engine(adapter)
    with uvicorn_app(create_app(engine, NAME)) as port:
        yield {"url": f"http://127.0.0.1:{port}/v1", "engine": engine}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key="unused", max_retries=0, timeout=60)


def _ask(client, content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kw)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_reply_equals_chat_at_temperature_0(client, server, adapter, capsys):
    resp = _ask(client, QUESTION, max_tokens=12)
    assert (
        main(
            ["chat", str(adapter), "--message", QUESTION, "--temperature", "0", "--max-new-tokens", "12", "--no-stream"]
        )
        == 0
    )
    chat_reply = capsys.readouterr().out.rstrip("\n")
    assert resp.choices[0].message.content == chat_reply
    assert chat_reply  # a non-empty reply, so the comparison says something
    engine = server["engine"]
    prompt = engine.format.prompt(Conversation.from_rounds([]), QUESTION, context_budget(engine.recipe)).ids
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == len(engine.finished[-1].generated) > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_stream_matches_non_stream(client):
    whole = _ask(client, QUESTION, max_tokens=12)
    chunks = list(_ask(client, QUESTION, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_cuts_the_reply(client):
    full = _ask(client, QUESTION, max_tokens=12).choices[0].message.content
    stop = full[3:5]
    cut = _ask(client, QUESTION, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or "" for c in _ask(client, QUESTION, max_tokens=12, stop=stop, stream=True)
    )
    assert streamed == cut.choices[0].message.content


def test_concurrent_requests_get_their_own_answers(client):
    questions = ["Hello! Who are you?", QUESTION, "What is LoRA?"]
    alone = [_ask(client, q, max_tokens=8).choices[0].message.content for q in questions]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda q: _ask(client, q, max_tokens=8).choices[0].message.content, questions * 2))
    assert together == alone * 2


def test_disconnect_mid_stream_frees_the_model(client, server):
    engine = server["engine"]
    engine.delay = 0.02  # ~200 tokens would take 4 s
    try:
        body = {
            "model": NAME,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", server["url"] + "/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the stream has begun (a MOSS reply shows only from its <|MOSS|>: field): hang up
        deadline = time.time() + 10
        while not (engine.finished and engine.finished[-1].finish_reason == "cancelled"):
            assert time.time() < deadline, (
                f"the generation went on after the client left: {[(j.finish_reason, len(j.generated), j.cancel.is_set()) for j in engine.finished]}"
            )
            time.sleep(0.05)
        assert len(engine.finished[-1].generated) < 100
    finally:
        engine.delay = 0.0
    assert engine.lock.acquire(timeout=5)  # the slot is free
    engine.lock.release()
    assert _ask(client, QUESTION, max_tokens=4).choices[0].message.content is not None


@pytest.mark.parametrize(
    "messages, where",
    [
        ([{"role": "assistant", "content": "hi"}], "messages"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]"),
        ([{"role": "wizard", "content": "a"}], "messages.0"),
        ([], "messages"),
    ],
)
def test_malformed_request_is_400_with_openai_error(client, messages, where):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=messages)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"].startswith(where)


def test_bad_json_unknown_model_and_bad_values(server, client):
    r = httpx.post(
        server["url"] + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _ask(client, "x", temperature=5)


def test_over_the_context_budget_is_a_clear_400(client, server):
    long = "番茄炒蛋怎么做？" * 200
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, long, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "context budget" in e.value.body["message"]
    history = [
        {"role": "user", "content": long[:300]},
        {"role": "assistant", "content": long[:300]},
        {"role": "user", "content": "ok?"},
    ]
    with pytest.raises(openai.BadRequestError, match="context budget"):
        client.chat.completions.create(model=NAME, messages=history, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _ask(client, "x", max_tokens=10_000)
    assert json.dumps(e.value.body)  # a JSON body, as the client parsed it

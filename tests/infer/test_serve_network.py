"""`peftchat serve` as a team runs it on a network (issue 31): the API key, the Host check, the
limits (413, 429, max_tokens, n), the event loop staying free (/health during a 20 MB parse and
during generation), disconnects, batched replies equal to sequential ones, n > 1, no exception text
in any body, the access log; and the command's exit-2 refusals and SIGTERM drain."""

import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from peftchat.cli import main  # noqa: E402
from peftchat.infer.serve import ServeOptions, create_app  # noqa: E402

NAME = "tiny-moss"
KEY = "sk-test-0123456789"
QUESTION = "番茄炒蛋怎么做？"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter("moss")


@pytest.fixture(scope="module")
def server(adapter, uvicorn_app, slow_chat_engine):
    engine = slow_chat_engine(adapter)
    options = ServeOptions(api_key=KEY, max_body_bytes=24 << 20, max_n=4, max_tokens=200)
    app = create_app(engine, NAME, options)
    with uvicorn_app(app) as port:
        yield {
            "base": f"http://127.0.0.1:{port}",
            "url": f"http://127.0.0.1:{port}/v1",
            "engine": engine,
            "scheduler": app.state.scheduler,
            "port": port,
            "options": options,
        }


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


AUTH = {"authorization": f"Bearer {KEY}"}


def _ask(client, content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kw)


def _body(content=QUESTION, **kw):
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def slow(engine, delay):
    engine.delay = delay
    try:
        yield
    finally:
        engine.delay = 0.0


def _wait_idle(scheduler, timeout=10):
    deadline = time.time() + timeout
    while scheduler.busy():
        assert time.time() < deadline, "the server kept generating for nobody"
        time.sleep(0.02)


def test_api_key_is_required_on_v1_and_health_is_open(server):
    for key in ("wrong", KEY + "x", KEY[:-1]):
        c = openai.OpenAI(base_url=server["url"], api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server["url"] + "/models").status_code == 401
    r = httpx.post(server["url"] + "/chat/completions", json=_body())
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"
    assert [m.id for m in openai.OpenAI(base_url=server["url"], api_key=KEY).models.list().data] == [NAME]


def test_host_header_rebinding_is_refused_docs_and_cors_are_off(server):
    for host in ("evil.example.com", "evil.example.com:80", "attacker.localhost.example"):
        r = httpx.get(server["base"] + "/health", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    for host in (f"localhost:{server['port']}", f"127.0.0.1:{server['port']}", "[::1]:8000"):
        assert httpx.get(server["base"] + "/health", headers={"host": host}).status_code == 200, host
    assert httpx.get(server["base"] + "/docs").status_code == 404
    assert httpx.get(server["base"] + "/openapi.json").status_code == 404
    r = httpx.options(
        server["url"] + "/chat/completions",
        headers={"origin": "http://evil.example.com", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers


def _send_raw(port, head: bytes, chunks, read_timeout=10.0) -> bytes:
    """Send a request by hand, stopping the upload as soon as the server answers (httpx would not
    read a reply before its upload ends), and return the response's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break  # the server answered before the body ended
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            data = s.recv(65536)
            if not data:
                break
            reply += data
        return reply


def _length(reply: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", reply, re.I)
    return int(found.group(1)) if found else 0


def test_a_50_mb_body_is_413_before_it_is_read(server):
    """Declared or not (chunked), a body over the limit (24 MiB here) is refused with 413; the
    server's RSS (this process) grows by under 8 MB for a declared 50 MB body and by under three
    times the limit for a chunked one."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {KEY}\r\n"
        "content-type: application/json\r\n"
    ).encode()
    before = _rss()
    mb = b"x" * (1 << 20)
    reply = _send_raw(server["port"], head + f"content-length: {50 << 20}\r\n\r\n".encode(), (mb for _ in range(50)))
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request_too_large" in reply
    assert _rss() - before < 8 << 20
    chunked = (b"%x\r\n%s\r\n" % (len(mb), mb) for _ in range(50))
    reply = _send_raw(server["port"], head + b"transfer-encoding: chunked\r\n\r\n", chunked)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert _rss() - before < 3 * (24 << 20)


def _health_latencies(base, until: threading.Event) -> list[float]:
    out = []
    with httpx.Client() as c:
        while not until.is_set():
            t = time.perf_counter()
            assert c.get(base + "/health").status_code == 200
            out.append(time.perf_counter() - t)
            time.sleep(0.01)
    return out


def _during(server, work) -> tuple[list[float], object]:
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(_health_latencies, server["base"], done)
        time.sleep(0.1)
        try:
            result = work()
        finally:
            done.set()
        return poll.result(), result


def test_health_answers_fast_while_a_20_mb_body_is_parsed(server):
    big = json.dumps(_body("长" * ((20 << 20) // 3), max_tokens=4), ensure_ascii=False).encode()
    assert len(big) > (20 << 20) - 1000
    latencies, r = _during(
        server,
        lambda: httpx.post(
            server["url"] + "/chat/completions",
            content=big,
            headers=AUTH | {"content-type": "application/json"},
            timeout=60,
        ),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(latencies) >= 3 and max(latencies) < 0.1, latencies


def test_health_answers_fast_while_generating(server, client):
    with slow(server["engine"], 0.01):
        latencies, resp = _during(server, lambda: _ask(client, QUESTION, max_tokens=150))
    assert resp.usage.completion_tokens > 20  # it generated for a while
    assert len(latencies) >= 5 and max(latencies) < 0.1, latencies


def test_full_queue_is_429_with_retry_after(server, client):
    sched = server["scheduler"]
    sched.max_batch, sched.max_queued = 1, 1
    try:
        with slow(server["engine"], 0.02), ThreadPoolExecutor(2) as pool:
            running_one = pool.submit(_ask, client, QUESTION, max_tokens=100)
            while not sched.running:
                time.sleep(0.01)
            queued = pool.submit(_ask, client, "What is LoRA?", max_tokens=2)
            while not sched.pending:
                time.sleep(0.01)
            r = httpx.post(server["url"] + "/chat/completions", json=_body(max_tokens=2), headers=AUTH)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            assert running_one.result().choices[0].message.content is not None
            assert queued.result().choices[0].message.content is not None
    finally:
        sched.max_batch, sched.max_queued = 16, 64


def test_disconnect_frees_the_slot_at_once(server, client):
    """A client that hangs up (streaming or not) stops its generation at the next token, and the
    next request starts at once (the hung-up one had ~9 s of tokens left)."""
    engine, sched = server["engine"], server["scheduler"]
    with slow(engine, 0.05):
        with httpx.stream(
            "POST",
            server["url"] + "/chat/completions",
            json=_body(max_tokens=190, stream=True),
            headers=AUTH,
            timeout=30,
        ) as r:
            next(r.iter_lines())  # the first chunk
            while not (sched.running and sched.running[0].generated):
                time.sleep(0.01)  # generating: hang up
        engine.delay = 0.0
        t = time.perf_counter()
        assert _ask(client, "What is LoRA?", max_tokens=4).choices[0].message.content is not None
        assert time.perf_counter() - t < 4
    left = engine.finished[-2]
    assert left.finish_reason == "cancelled" and len(left.generated) < 60
    with slow(engine, 0.05):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server["url"] + "/chat/completions", json=_body(max_tokens=190), headers=AUTH, timeout=1)
        _wait_idle(sched, timeout=3)
    assert engine.finished[-1].finish_reason == "cancelled" and len(engine.finished[-1].generated) < 60


def test_per_request_wall_time_ends_a_long_generation(server, client):
    server["options"].request_timeout = 1.0
    try:
        with slow(server["engine"], 0.05):
            t = time.perf_counter()
            resp = _ask(client, QUESTION, max_tokens=190)  # ~10 s of tokens
            took = time.perf_counter() - t
    finally:
        server["options"].request_timeout = 600.0
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens < 100
    assert took < 5 and server["engine"].finished[-1].timed_out


QUESTIONS = [
    "Hello! Who are you?",
    QUESTION,
    "What is LoRA?",
    "请介绍一下你自己",
    "How do I cook rice?",
    "什么是微调？",
    "Tell me a joke.",
    "1+1=?",
    "Translate 'cat' to French.",
    "今天天气怎么样？",
    "Write a haiku about autumn leaves falling on a quiet pond",
    "Why?",
    "你好",
    "Name three colors.",
    "What is the capital of France and why is it famous?",
    "再见",
]


def test_16_concurrent_clients_are_batched_and_equal_their_sequential_answers(server, client):
    sched = server["scheduler"]
    sched.max_batch = 1
    try:
        alone = [_ask(client, q, max_tokens=8).choices[0].message.content for q in QUESTIONS]
    finally:
        sched.max_batch = 16
    sched.largest_batch = 0
    with slow(server["engine"], 0.005), ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: _ask(client, q, max_tokens=8).choices[0].message.content, QUESTIONS))
    assert together == alone
    assert sched.largest_batch > 1  # they were generated together, not in a queue


def test_n_choices(server, client):
    one = _ask(client, QUESTION, max_tokens=6).choices[0].message.content
    three = _ask(client, QUESTION, max_tokens=6, n=3)
    assert [c.message.content for c in three.choices] == [one] * 3 and [c.index for c in three.choices] == [0, 1, 2]
    seeded = [
        [c.message.content for c in _ask(client, QUESTION, max_tokens=6, n=2, temperature=1.0, seed=7).choices]
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    chunks = list(_ask(client, QUESTION, max_tokens=6, n=2, stream=True))
    texts = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(2)
    ]
    assert texts == [one, one]
    with pytest.raises(openai.BadRequestError, match="n must be"):
        _ask(client, QUESTION, n=5)


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "a\\ud800b"}]}', None),
        (b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "a"}], "stop": "\\udc00"}', None),
        (
            b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "a"}], "seed": 36893488147419103232}',
            "seed",
        ),
        (
            b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "a"}], "seed": -9223372036854775809}',
            "seed",
        ),
        (b'{"model": "tiny-moss", "messages": 5}', "messages"),
        (
            b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "a"}], "temperature": "hot"}',
            "temperature",
        ),
        (b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1.5}', "max_tokens"),
        (b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "a"}], "max_tokens": 100000}', "max_tokens"),
        (b"[1, 2]", None),
        (b"\xff\xfe", None),
    ],
)
def test_bad_values_are_400_in_the_openai_shape(server, raw, param):
    r = httpx.post(
        server["url"] + "/chat/completions", content=raw, headers=AUTH | {"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert param is None or (err["param"] or "").startswith(param)
    assert "Traceback" not in r.text and "Error:" not in r.text


def test_a_failing_generation_says_internal_error_with_a_request_id(server, client, monkeypatch, caplog):
    def boom(*a, **kw):
        raise RuntimeError("secret detail /home/user/model")

    monkeypatch.setattr(server["engine"].model, "generate", boom)
    r = httpx.post(server["url"] + "/chat/completions", json=_body(max_tokens=4), headers=AUTH)
    assert r.status_code == 500
    assert r.json()["error"]["message"] == f"internal error (request id {r.headers['x-request-id']})"
    streamed = httpx.post(server["url"] + "/chat/completions", json=_body(max_tokens=4, stream=True), headers=AUTH)
    assert "internal error (request id" in streamed.text
    for text in (r.text, streamed.text):
        assert "secret" not in text and "RuntimeError" not in text
    monkeypatch.undo()
    assert _ask(client, QUESTION, max_tokens=2).choices  # the server lives on


def test_one_access_log_line_per_request_without_the_prompt(server, client, caplog):
    caplog.set_level(logging.INFO, logger="peftchat.serve")
    with caplog.at_level(logging.INFO, logger="peftchat.serve"):
        resp = _ask(client, "a secret question", max_tokens=5, stream=False)
        deadline = time.time() + 5
        while not any("/v1/chat/completions" in r.getMessage() for r in caplog.records):
            assert time.time() < deadline
            time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert "status=200" in line and f"prompt_tokens={resp.usage.prompt_tokens}" in line
    assert f"completion_tokens={resp.usage.completion_tokens}" in line
    assert re.search(r"ttft=\d+\.\d{3}s total=\d+\.\d{3}s$", line), line
    assert "secret" not in line


def test_exposure_and_port_are_checked_before_serving(adapter, capsys, monkeypatch):
    monkeypatch.delenv("PEFTCHAT_API_KEY", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cases = [["--port", "70000"], ["--port", str(port)], ["--host", "0.0.0.0", "--port", "0"]]
        for extra in cases:
            assert main(["serve", str(adapter), *extra]) == 2, extra
            err = capsys.readouterr().err
            assert err.startswith("peftchat: error: ") and err.count("\n") == 1 and "serving" not in err, err
    assert "--insecure-no-api-key" in err


def test_sigterm_drains_the_request_in_flight_then_exits_0(adapter):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PEFTCHAT_API_KEY=KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftchat.cli", "serve", str(adapter), "--port", "0", "--model-name", NAME],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in proc.stderr:
            if line.startswith("serving"):
                port = int(line.rsplit(":", 1)[1].split("/")[0])
                break
        assert port, "no 'serving' line"
        got = []
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers=AUTH,
            timeout=30,
            json=_body(max_tokens=40, stream=True),
        ) as r:
            for line in r.iter_lines():
                if not got:
                    proc.send_signal(signal.SIGTERM)
                got.append(line)
        assert "data: [DONE]" in got  # the stream in flight finished
        assert proc.wait(timeout=30) == 0
        assert any(line.startswith("request=") or "status=200" in line for line in proc.stderr.read().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()

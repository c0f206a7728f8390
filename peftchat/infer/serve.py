"""`peftchat serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn, the `serve` extra).

`GET /v1/models` and `POST /v1/chat/completions` (`messages`, `temperature`, `top_p`,
`max_tokens`, `stop`, `seed`, `stream` with `stream_options.include_usage`, `tools` with
`tool_choice` "auto" or "none"). With tools (chat_template format only), the request's tool list,
assistant `tool_calls` and `tool` results are rendered as training rendered a tool record, and a
reply in the template's `<tool_call>` syntax comes back as `tool_calls` with finish_reason
"tool_calls" (`engine` parses it; a stream holds text from `<tool_call>` on until it is parsed). Prompts are the
training prompts of the run's conversation format (see `engine`); a system message goes where the
format puts one (the chatglm format has no place for it and leaves it out, as training does); a request that omits
`temperature` / `top_p` / `max_tokens` gets the recipe's `decoding.*`. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: 400 for a malformed request or one over the
context budget, 401 without the API key, 404 for an unknown model, 413 for a body over the limit,
429 (with `Retry-After`) when the queue is full, 500 "internal error" with the request id (the
details go to the server log only). Streams are server-sent events of `chat.completion.chunk`
objects ending with `data: [DONE]`; a client that disconnects, streaming or not, cancels its
generation. `n > 1` gives n choices. `GET /health` answers without a key (load balancers).

The event loop only moves bytes: the body is parsed and validated, and the prompt built and
tokenized, in worker threads; generation runs in the scheduler's thread (`batching`), which
batches concurrent requests. `serve_guard` checks the Host header, the key and the body size
before a handler runs and writes the access log.
"""

# No `from __future__ import annotations`: FastAPI reads the handler's parameter annotation, a
# class built inside create_app, at run time.
import asyncio
import ipaddress
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from peftchat.errors import UserError
from peftchat.infer.batching import QueueFull, Scheduler
from peftchat.infer.engine import ChatEngine, ChatRequest, Job, RequestError
from peftchat.infer.loading import load_chat_model, say
from peftchat.infer.messages import openai_tool_calls, split_messages
from peftchat.infer.serve_guard import BodyTooLarge, Guard, error_body, log
from peftchat.infer.serve_parse import BodyParser, models

MISSING_EXTRA = "peftchat serve needs FastAPI and uvicorn: pip install 'peftchat[serve]'"


API_KEY_ENV = "PEFTCHAT_API_KEY"
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


@dataclass
class ServeOptions:
    """The server's limits and safety switches (the `serve` command's flags; README "Serve it
    for a team" lists the defaults)."""

    api_key: Optional[str] = None
    allowed_hosts: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    docs: bool = False
    max_body_bytes: int = 8 << 20
    max_tokens: int = 4096  # cap of a request's max_tokens (the context less the prompt caps it too)
    max_n: int = 8
    max_queued: int = 64  # jobs waiting for a batch (a request of n choices counts n)
    max_batch: int = 16  # rows generated together; 1 serves one request at a time
    request_timeout: float = 600.0  # seconds from arrival to the last token
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight
    parse_slots: int = 4  # bodies read and parsed at once: memory stays under parse_slots × max_body


class ModelNotFound(RequestError):
    pass


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: Optional[str] = None,
    code: Optional[str] = None,
    headers: Optional[dict] = None,
):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=error_body(message, type_, param, code), headers=headers)


def _internal_error(rid: str):
    return _error(500, f"internal error (request id {rid})", "server_error")


def to_chat_request(body) -> ChatRequest:
    """A validated body → the engine's request: messages checked and split by `messages` (the
    rules training data follows, ending where the assistant answers), the tool list and whether
    the reply is read back as tool calls (`tool_choice` "auto", the default with tools; "none"
    keeps the tools in the prompt, as training showed them, and returns the reply as text, as vLLM
    does; "required" and a named function would need constrained decoding: refused)."""
    choice = body.tool_choice
    if choice is not None and choice not in ("auto", "none"):
        shown = choice if isinstance(choice, str) else f"a named function ({choice.function.name!r})"
        raise RequestError(
            f'tool_choice {shown} is not supported by this server (it cannot force a tool call); use "auto" or "none"',
            "tool_choice",
        )
    tools = [t.model_dump() for t in body.tools] if body.tools else None
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    history, query = split_messages(messages, tools)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise RequestError("stop takes at most 4 sequences", "stop")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return ChatRequest(
        history,
        query,
        max_tokens,
        body.temperature,
        body.top_p,
        stop,
        body.seed,
        parse_tools=bool(tools) and choice != "none",
    )


class RequestParser:
    """A validated body's fields → the request's jobs (prompt built and tokenized): runs in a
    worker thread, never on the event loop (`serve_parse` parsed the bytes)."""

    def __init__(self, engine: ChatEngine, model_name: str, options: ServeOptions) -> None:
        self.engine, self.model_name, self.options = engine, model_name, options
        self.model = models()
        self.groups = itertools.count()
        # No token decodes to more characters than this: a prompt longer than context × it cannot
        # fit, and is refused without tokenizing megabytes.
        vocab = engine.tokenizer.convert_ids_to_tokens(list(range(len(engine.tokenizer))))
        self.max_chars = engine.context * (max((len(t) for t in vocab if t), default=1) + 1)

    def __call__(self, fields: dict) -> tuple[list[Job], bool, bool]:
        """(the request's jobs, one per choice; stream?; include usage in the stream?)"""
        body = self.model.model_validate(fields)
        if body.model != self.model_name:
            raise ModelNotFound(
                f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )
        self._check_ranges(body)
        job = self.engine.prepare(to_chat_request(body))
        job.deadline = time.monotonic() + self.options.request_timeout
        group = next(self.groups)
        job.group = group
        jobs = [job] + [job.fork(self.engine.format.reply_stream(), group) for _ in range(body.n - 1)]
        return jobs, body.stream, bool(body.stream_options and body.stream_options.include_usage)

    def _check_ranges(self, body) -> None:
        o = self.options
        if not 1 <= body.n <= o.max_n:
            raise RequestError(f"n must be between 1 and {o.max_n} (this server's --max-n)", "n")
        if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
            raise RequestError("seed must be between -2**63 and 2**64 - 1", "seed")
        for key in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, key)
            if value is not None and value > o.max_tokens:
                raise RequestError(f"{key} {value} is over this server's cap of {o.max_tokens} (--max-tokens-cap)", key)


def _usage(jobs: list[Job]) -> dict:
    n = sum(len(j.generated) for j in jobs)
    return {"prompt_tokens": len(jobs[0].prompt), "completion_tokens": n, "total_tokens": len(jobs[0].prompt) + n}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _post(loop, events: asyncio.Queue, job: Job, item) -> None:
    """Hand an event from the generating thread to the request's coroutine."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, item)
    except RuntimeError:  # the event loop is gone (server shutting down)
        job.cancel.set()


def _wire(jobs: list[Job], stream: bool) -> asyncio.Queue:
    """Events (index, "text" | "done", text) of `jobs` on one queue; text only when streaming."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        if stream:
            # (mypy cannot infer a lambda with default-bound arguments)
            job.on_text = lambda text, i=i, job=job: _post(loop, events, job, (i, "text", text))  # type: ignore[misc]
        job.on_done = lambda i=i, job=job: _post(loop, events, job, (i, "done", None))  # type: ignore[misc]
    return events


def _record(state: dict, jobs: list[Job]) -> None:
    """Token counts and time to first token for the access log."""
    state["completion_tokens"] = sum(len(j.generated) for j in jobs)
    firsts = [j.first_token_at for j in jobs if j.first_token_at is not None]
    if firsts:
        state["first_token_at"] = min(firsts)


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _wait_for(jobs: list[Job], events: asyncio.Queue, receive) -> bool:
    """Wait until every job is done (True) or the client hangs up (False: the jobs are cancelled)."""
    left = len(jobs)
    gone = asyncio.ensure_future(_until_disconnect(receive))
    try:
        while left:
            got = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
            if got not in done:
                got.cancel()
                return False
            left -= 1
        return True
    finally:
        gone.cancel()
        for job in jobs:
            job.cancel.set()


def create_app(engine: ChatEngine, model_name: str, options: Optional[ServeOptions] = None):
    """The ASGI app serving `engine` under the model id `model_name`; its scheduler is
    `app.state.scheduler` (stopped when the app shuts down)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    options = options or ServeOptions()
    parse = RequestParser(engine, model_name, options)
    read = BodyParser(parse.max_chars)
    scheduler = Scheduler(engine, max_batch=options.max_batch, max_queued=options.max_queued)
    parse_slots = asyncio.Semaphore(options.parse_slots)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(None, read.warm_up)
        yield
        scheduler.stop()
        read.close()

    docs = options.docs
    app = FastAPI(
        title="peftchat",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    created = int(time.time())

    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": scheduler.busy()}

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "peftchat"}],
        }

    _add_chat_completions(app, scheduler, read, parse, parse_slots, model_name, options)

    _add_middleware(app, options)
    return app


def _add_error_handlers(app) -> None:
    """Errors as OpenAI-style JSON; a server-side failure shows only its request id."""
    from fastapi import Request
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code >= 500:
            return _internal_error(request.scope["state"]["request_id"])
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # details go to the log (uvicorn's traceback)
        return _internal_error(request.scope["state"]["request_id"])


def _add_chat_completions(
    app,
    scheduler: Scheduler,
    read: BodyParser,
    parse: RequestParser,
    parse_slots: asyncio.Semaphore,
    model_name: str,
    options: ServeOptions,
) -> None:
    """POST /v1/chat/completions: parse (bounded), queue on the scheduler, answer whole or streamed."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state = request.scope["state"]
        async with parse_slots:  # bounds the bodies held in memory at once
            parsed = await _read_request(request, read, parse, options.max_body_bytes)
        if not isinstance(parsed, tuple):
            return parsed  # an error response
        jobs, stream, include_usage = parsed
        events = _wire(jobs, stream)
        try:
            scheduler.submit(jobs)
        except QueueFull:
            return _error(
                429,
                "the server is busy: too many requests are waiting; retry shortly",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        state["prompt_tokens"] = len(jobs[0].prompt)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            return StreamingResponse(
                _stream(jobs, events, cid, model_name, include_usage, state), media_type="text/event-stream"
            )
        answered = await _wait_for(jobs, events, request.receive)
        _record(state, jobs)
        if not answered:
            return _error(499, "the client closed the request")  # nobody reads it; the log does
        return _reply(jobs, cid, model_name, state)


def _add_middleware(app, options: ServeOptions) -> None:
    """The key, Host and body-size guard on every request; CORS only when origins are given."""
    from fastapi.middleware.cors import CORSMiddleware

    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(
        Guard, api_key=options.api_key, allowed_hosts=options.allowed_hosts, max_body_bytes=options.max_body_bytes
    )


async def _read_request(request, read: BodyParser, parse: RequestParser, max_body: int):
    """The request's (jobs, stream, include_usage), or the error response to send instead."""
    from starlette.concurrency import run_in_threadpool

    try:
        raw = await request.body()
    except BodyTooLarge:
        return _error(
            413, f"the request body is over this server's limit of {max_body} bytes", code="request_too_large"
        )
    try:
        return await run_in_threadpool(parse, await read(raw))
    except RequestError as e:
        return _error(404 if isinstance(e, ModelNotFound) else 400, str(e), param=e.param, code=e.code)


def _reply(jobs: list[Job], cid: str, model_name: str, state: dict):
    if any(j.failed for j in jobs):
        return _internal_error(state["request_id"])
    if all(j.timed_out and not j.generated for j in jobs):
        return _error(
            503,
            "the request waited longer than this server's --request-timeout; retry later",
            "server_error",
            code="timeout",
            headers={"Retry-After": "1"},
        )
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": i, "message": _message(j), "finish_reason": j.finish_reason} for i, j in enumerate(jobs)],
        "usage": _usage(jobs),
    }


def _message(job: Job) -> dict:
    """A choice's message: OpenAI's content is null when the reply is calls only."""
    if not job.tool_calls:
        return {"role": "assistant", "content": job.text}
    return {"role": "assistant", "content": job.text or None, "tool_calls": openai_tool_calls(job.tool_calls)}


async def _stream(jobs: list[Job], events: asyncio.Queue, cid: str, model_name: str, include_usage: bool, state: dict):
    """SSE chunks of `jobs` (one per choice) as they are generated; leaving early (a client
    disconnect cancels this generator) cancels the jobs, which leave their batch at the next token."""

    def chunk(i: int, delta: dict, finish_reason: Optional[str] = None) -> str:
        return _sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": i, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    try:
        for i in range(len(jobs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        left = len(jobs)
        while left:
            i, kind, value = await events.get()
            if kind == "text":
                yield chunk(i, {"content": value})
                continue
            left -= 1
            if jobs[i].failed:
                yield _sse(error_body(f"internal error (request id {state['request_id']})", "server_error"))
                break
            # The calls come whole, once the reply is parsed (the text from `<tool_call>` on was held
            # back): a call is never streamed as content and then taken back. One delta per call,
            # its arguments in one piece, is what OpenAI's clients accumulate as its split deltas.
            for k, call in enumerate(openai_tool_calls(jobs[i].tool_calls)):
                yield chunk(i, {"tool_calls": [{"index": k, **call}]})
            yield chunk(i, {}, jobs[i].finish_reason)
        if include_usage:
            yield _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model_name,
                    "choices": [],
                    "usage": _usage(jobs),
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel.set()
        _record(state, jobs)


def default_model_name(source: str) -> str:
    path = Path(source).expanduser().resolve()
    return path.stem if path.is_file() else path.name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: Optional[str], insecure: bool) -> None:
    """Refuse a non-loopback bind without a key unless `insecure` says the user means it; say one
    warning line when it is allowed."""
    if _is_loopback(host):
        return
    if api_key:
        say(f"peftchat: warning: serving on {host}, reachable from the network; every /v1 request needs the API key")
    elif insecure:
        say(
            f"peftchat: warning: serving on {host} WITHOUT an API key (--insecure-no-api-key): anyone who reaches it may use it"
        )
    else:
        raise UserError(
            f"--host {host} is reachable from the network: give an API key (--api-key or the "
            f"{API_KEY_ENV} environment variable), or pass --insecure-no-api-key if you mean it"
        )


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError naming why not (before the model loads)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:  # socket.gaierror is an OSError too
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("peftchat serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_serve(
    source: str,
    overrides: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: Optional[str] = None,
    options: Optional[ServeOptions] = None,
    insecure_no_api_key: bool = False,
) -> int:
    """Load the model of `source` (recipe, adapter dir or merged dir) and serve it until Ctrl-C or
    SIGTERM (which drain the requests in flight for up to `options.drain_timeout` s)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    options = options or ServeOptions()
    options.api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(host, options.api_key, insecure_no_api_key)
    sock = listen(host, port)
    model, tokenizer, recipe = load_chat_model(source, overrides)
    name = model_name or default_model_name(source)
    app = create_app(ChatEngine(model, tokenizer, recipe), name, options)
    _log_to_stderr()
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        # uvicorn annotates int but uses it as asyncio.timeout's seconds, a float
        timeout_graceful_shutdown=options.drain_timeout,  # type: ignore[arg-type]
        limit_concurrency=options.max_queued + options.max_batch + 64,
    )
    bound = sock.getsockname()
    say(f"serving '{name}' ({recipe.data.collator} format) on http://{host}:{bound[1]}/v1")
    for sig in (signal.SIGTERM, signal.SIGINT):
        # uvicorn drains, then raises the signal again for the handler it found: a no-op one lets
        # the process end with exit code 0 after a clean drain.
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    say("stopped")
    return 0

"""`peftchat serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn, the `serve` extra).

`GET /v1/models` and `POST /v1/chat/completions` (`messages`, `temperature`, `top_p`,
`max_tokens`, `stop`, `seed`, `stream` with `stream_options.include_usage`). Prompts are the
training prompts of the run's conversation format (see `engine`); a system message goes where the
format puts one (the chatglm format has no place for it and leaves it out, as training does); a request that omits
`temperature` / `top_p` / `max_tokens` gets the recipe's `decoding.*`. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: 400 for a malformed request or one over the
context budget, 404 for an unknown model. Streams are server-sent events of `chat.completion.chunk`
objects ending with `data: [DONE]`; a client that disconnects cancels its generation.
"""

# No `from __future__ import annotations`: FastAPI reads the handler's parameter annotation, a
# class built inside create_app, at run time.
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional, Union

from peftchat.errors import UserError
from peftchat.formats.conversation import Conversation
from peftchat.infer.engine import ChatEngine, ChatRequest, Job, RequestError
from peftchat.infer.loading import load_chat_model, say

MISSING_EXTRA = "peftchat serve needs FastAPI and uvicorn: pip install 'peftchat[serve]'"


def _error(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[str] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _models():
    """The request body models (pydantic), built lazily so the module imports without FastAPI."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[TextPart]]

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class ChatCompletionRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")  # e.g. `user`, `logprobs=false`: harmless to drop
        model: str
        messages: list[Message] = Field(min_length=1)
        temperature: Optional[float] = None
        top_p: Optional[float] = None
        max_tokens: Optional[int] = None
        max_completion_tokens: Optional[int] = None
        stop: Union[str, list[str], None] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        seed: Optional[int] = None
        n: int = 1

    return ChatCompletionRequest


def to_chat_request(body) -> ChatRequest:
    """Messages → (history `Conversation`, query) for the format (RequestError when they do not
    form system? (user assistant)* user)."""
    rounds: list[tuple[str, str]] = []
    system, pending = None, None
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i == 0:
            system = m.text()
        elif role == "user" and pending is None:
            pending = m.text()
        elif role == "assistant" and pending is not None:
            rounds.append((pending, m.text()))
            pending = None
        else:
            raise RequestError(f"messages[{i}] has role '{m.role}'; expected an optional first system message, "
                               "then user and assistant messages in turn, ending with a user message",
                               f"messages[{i}].role")
    if pending is None:
        raise RequestError("the last message must be a user message", "messages")
    if body.n != 1:
        raise RequestError("only n=1 is supported", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise RequestError("stop takes at most 4 sequences", "stop")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    history = Conversation.from_rounds(rounds, system=system, origin="request")
    return ChatRequest(history, pending, max_tokens, body.temperature, body.top_p, stop, body.seed)


def _usage(job: Job) -> dict:
    n = len(job.generated)
    return {"prompt_tokens": len(job.prompt), "completion_tokens": n, "total_tokens": len(job.prompt) + n}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: ChatEngine, model_name: str):
    """The FastAPI app serving `engine` under the model id `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    ChatCompletionRequest = _models()
    app = FastAPI(title="peftchat", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"invalid request: {loc + ': ' if loc else ''}{first.get('msg')}", param=loc or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "peftchat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):  # type: ignore[valid-type]
        if body.model != model_name:
            return _error(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                          param="model", code="model_not_found")
        try:
            job = engine.prepare(to_chat_request(body))
        except RequestError as e:
            return _error(400, str(e), param=e.param, code=e.code)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if not body.stream:
            try:
                await asyncio.to_thread(engine.run, job, lambda text: None)
            except Exception as e:  # a bug, not the client's fault: say so in the API's shape
                return _error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                                 "finish_reason": job.finish_reason}],
                    "usage": _usage(job)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, job, cid, model_name, include_usage), media_type="text/event-stream")

    return app


async def _stream(engine: ChatEngine, job: Job, cid: str, model_name: str, include_usage: bool):
    """SSE chunks of `job` as it is generated; leaving early (a client disconnect cancels this
    generator) sets the job's cancel event, which stops generation at the next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            job.cancel.set()

    def work() -> None:
        try:
            engine.run(job, lambda text: post(("text", text)))
            post(("done", None))
        except Exception as e:
            post(("error", e))

    def chunk(delta: dict, finish_reason: Optional[str] = None) -> str:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    threading.Thread(target=work, name=f"generate-{cid}", daemon=True).start()
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "error":
                yield _sse({"error": {"message": f"generation failed: {type(value).__name__}: {value}",
                                      "type": "server_error", "param": None, "code": None}})
                break
            else:
                yield chunk({}, job.finish_reason)
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model_name, "choices": [], "usage": _usage(job)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()


def default_model_name(source: str) -> str:
    path = Path(source).expanduser().resolve()
    return path.stem if path.is_file() else path.name


def run_serve(source: str, overrides: list[str], host: str = "127.0.0.1", port: int = 8000,
              model_name: Optional[str] = None) -> int:
    """Load the model of `source` (recipe, adapter dir or merged dir) and serve it until Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    model, tokenizer, recipe = load_chat_model(source, overrides)
    name = model_name or default_model_name(source)
    app = create_app(ChatEngine(model, tokenizer, recipe), name)
    say(f"serving '{name}' ({recipe.data.collator} format) on http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0

"""Request bytes → validated fields, without holding up the server.

Parsing JSON (the stdlib's or pydantic's) is one C call that holds the GIL from start to end: a
20 MB body stalls every thread of the process for a quarter of a second or more, worker thread or
not, so `/health` and every stream would stall too. Bodies over `IN_PROCESS_BYTES` are therefore
parsed in a helper process (one, started with the server); what comes back is small, since a body
whose messages cannot fit the model's context is refused there. Small bodies parse in a thread.
The pydantic models are built lazily, so this module imports without FastAPI.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Literal, Optional, Union


IN_PROCESS_BYTES = 256 << 10  # parses in a few ms


@functools.lru_cache(maxsize=None)
def models():
    """The request body model (pydantic)."""
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


def _validation_message(exc) -> tuple[str, Optional[str]]:
    """A pydantic ValidationError as one message and the parameter it names."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})", None
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return f"invalid request: {loc + ': ' if loc else ''}{first.get('msg')}", loc or None


def _unicode_error(texts: list[str], where: str) -> Optional[tuple]:
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return ("error", f"{where.format(i)} is not valid Unicode (a lone surrogate)", where.format(i), None)
    return None


def parse_body(raw: bytes, max_chars: int) -> tuple:
    """("ok", fields) or ("error", message, param, code) — plain tuples, as they cross processes."""
    from pydantic import ValidationError

    try:
        body = models().model_validate_json(raw)
    except ValidationError as e:
        return ("error", *_validation_message(e), None)
    texts = [m.text() for m in body.messages]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bad = _unicode_error(texts, "messages[{}].content") or _unicode_error(stops, "stop")
    if bad:
        return bad
    if sum(len(t) for t in texts) > max_chars:
        return ("error", "the messages are far over the model's context", "messages", "context_length_exceeded")
    return ("ok", body.model_dump())


class BodyParser:
    """`await parser(raw)` → the validated fields of a body (RequestError when it is not one)."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.pool: Optional[ProcessPoolExecutor] = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:  # spawn: forking a process that holds a model and threads is unsafe
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self.pool

    async def __call__(self, raw: bytes) -> dict:
        from peftchat.infer.engine import RequestError  # here: the helper process need not import it

        loop = asyncio.get_running_loop()
        if len(raw) <= IN_PROCESS_BYTES:
            result = await loop.run_in_executor(None, parse_body, raw, self.max_chars)
        else:
            try:
                result = await loop.run_in_executor(self._pool(), parse_body, raw, self.max_chars)
            except BrokenProcessPool:  # the helper died (e.g. killed for memory): start a new one next time
                self.pool = None
                raise
        if result[0] == "error":
            raise RequestError(result[1], result[2], result[3])
        return result[1]

    def warm_up(self) -> None:
        """Start the helper process now, not on the first large request."""
        self._pool().submit(parse_body, b"{}", 0).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

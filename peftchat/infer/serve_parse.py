"""Request bytes → validated fields, without holding up the server.

Parsing JSON (the stdlib's or pydantic's) is one C call that holds the GIL from start to end: a
20 MB body stalls every thread of the process for a quarter of a second or more, worker thread or
not, so `/health` and every stream would stall too. Bodies over `IN_PROCESS_BYTES` are therefore
parsed in a helper process (one, started with the server); what comes back is small, since a body
whose messages cannot fit the model's context is refused there. Small bodies parse in a thread.
The helper is a plain `python -c` child speaking length-prefixed frames on its stdin/stdout, not a
multiprocessing pool: "spawn" re-imports the parent's `__main__`, which re-runs any script that
builds a server at import time, and "fork" copies a process holding a model and threads.
The pydantic models are built lazily, so this module imports without FastAPI.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal, Optional, Union

IN_PROCESS_BYTES = 256 << 10  # parses in a few ms


@functools.cache
def models():
    """The request body model (pydantic)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class FunctionCall(BaseModel):
        name: str
        arguments: Union[str, dict[str, Any]]  # OpenAI sends a JSON string; `formats.turns` parses it

    class ToolCall(BaseModel):
        id: Optional[str] = None
        type: Literal["function"] = "function"
        function: FunctionCall

    class Message(BaseModel):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: Union[str, list[TextPart], None] = None  # None: an assistant turn of tool calls only
        tool_calls: Optional[list[ToolCall]] = None
        tool_call_id: Optional[str] = None
        name: Optional[str] = None

        def text(self) -> str:
            if self.content is None:
                return ""
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class FunctionDef(BaseModel):
        model_config = ConfigDict(extra="allow")  # description, parameters, strict: the template's to show
        name: str = Field(min_length=1)

    class ToolDef(BaseModel):
        model_config = ConfigDict(extra="allow")
        type: Literal["function"]
        function: FunctionDef

    class NamedFunction(BaseModel):
        name: str

    class NamedToolChoice(BaseModel):
        type: Literal["function"]
        function: NamedFunction

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
        tools: Optional[list[ToolDef]] = None
        tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None

    return ChatCompletionRequest


def _validation_message(exc) -> tuple[str, Optional[str]]:
    """A pydantic ValidationError as one message and the parameter it names."""
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
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
    # tool calls and tool lists reach the prompt too: counted against the context, checked as text
    calls = [
        c.function.arguments if isinstance(c.function.arguments, str) else json.dumps(c.function.arguments)
        for m in body.messages
        for c in m.tool_calls or []
    ]
    tools = [json.dumps(t.model_dump(), ensure_ascii=False) for t in body.tools or []]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bad = (
        _unicode_error(texts, "messages[{}].content")
        or _unicode_error(stops, "stop")
        or _unicode_error(calls, "a tool call's arguments")
        or _unicode_error(tools, "tools[{}]")
    )
    if bad:
        return bad
    if sum(len(t) for t in texts + calls + tools) > max_chars:
        return ("error", "the messages are far over the model's context", "messages", "context_length_exceeded")
    return ("ok", body.model_dump())


def _read_frame(stream) -> Optional[bytes]:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    return stream.read(size)


def _write_frame(stream, data: bytes, prefix: bytes = b"") -> None:
    """A frame of `prefix + data`, written without joining them: copying megabytes holds the GIL."""
    stream.write(struct.pack(">I", len(prefix) + len(data)) + prefix)
    stream.flush()
    view = memoryview(data)
    while view:  # a raw pipe write may take part of it
        view = view[os.write(stream.fileno(), view) :]


def helper_main() -> None:
    """The helper process: frames of (max_chars, body) in, frames of parse_body's JSON out."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while (frame := _read_frame(inp)) is not None:
        (max_chars,) = struct.unpack(">Q", frame[:8])
        _write_frame(out, json.dumps(parse_body(frame[8:], max_chars)).encode())


class BodyParser:
    """`await parser(raw)` → the validated fields of a body (RequestError when it is not one)."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.proc: Optional[subprocess.Popen] = None
        self.lock = threading.Lock()  # one body at a time through the helper

    def _helper(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            root = str(Path(__file__).resolve().parents[2])  # this peftchat, installed or not
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from peftchat.infer.serve_parse import helper_main; helper_main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
        return self.proc

    def _in_helper(self, raw: bytes) -> tuple:
        with self.lock:
            proc = self._helper()
            try:
                _write_frame(proc.stdin, raw, prefix=struct.pack(">Q", self.max_chars))
                reply = _read_frame(proc.stdout)
            except OSError:
                reply = None
            if reply is None:  # it died (e.g. killed for memory): a new one next time
                proc.kill()
                raise RuntimeError("the request parser process died")
            return tuple(json.loads(reply))

    async def __call__(self, raw: bytes) -> dict:
        from peftchat.infer.engine import RequestError  # here: the helper process need not import it

        parse = (
            self._in_helper if len(raw) > IN_PROCESS_BYTES else functools.partial(parse_body, max_chars=self.max_chars)
        )
        result = await asyncio.get_running_loop().run_in_executor(None, parse, raw)
        if result[0] == "error":
            raise RequestError(result[1], result[2], result[3])
        return result[1]

    def warm_up(self) -> None:
        """Start the helper process now, not on the first large request."""
        self._in_helper(b"{}")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

"""What every HTTP request of `peftchat serve` passes first: a pure ASGI middleware.

It gives each request an id (the `x-request-id` header, the access log, 5xx bodies), refuses a
Host header that is neither an IP address nor an allowed name (a web page reaching a loopback
server by DNS rebinding sends its own domain), asks `/v1/*` for the API key (`Authorization:
Bearer KEY`, compared in constant time) before a byte of the body is read, answers 413 to a
declared Content-Length over the limit and counts the bytes of a body sent without one (the
handler's read raises `BodyTooLarge` at the limit, so memory never holds more), and writes one
access-log line per request: id, method, path, status, prompt and completion tokens, time to first
token and total time — never the prompt. Written as raw ASGI rather than Starlette's
BaseHTTPMiddleware, which would buffer bodies and break streaming disconnects.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from typing import Iterable, Optional

log = logging.getLogger("peftchat.serve")


class BodyTooLarge(Exception):
    """The request body went past the server's limit while being read."""


def error_body(
    message: str, type_: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def send_json(send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


def host_allowed(host_header: str, allowed: set[str]) -> bool:
    """An IP literal (no DNS involved, so no rebinding), `localhost`, a name in `allowed`, or
    anything when `allowed` holds `*`."""
    if "*" in allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host == "localhost" or host in allowed


class Guard:
    def __init__(
        self, app, api_key: Optional[str] = None, allowed_hosts: Iterable[str] = (), max_body_bytes: int = 8 << 20
    ) -> None:
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.allowed = {h.lower() for h in allowed_hosts}
        self.max_body = max_body_bytes

    def _refusal(self, scope) -> Optional[tuple[int, dict]]:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.allowed):
            return 400, error_body(
                f"the Host header '{host[:100]}' is not one this server answers to; "
                "start serve with --allowed-host NAME to allow it",
                code="invalid_host",
            )
        if self.key and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                return 401, error_body(
                    "invalid or missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"
                )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, error_body("the Content-Length header is not a number")
            if int(length) > self.max_body:
                return 413, self._too_large()
        return None

    def _too_large(self) -> dict:
        return error_body(
            f"the request body is over this server's limit of {self.max_body} bytes", code="request_too_large"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state.update(request_id=rid, t0=t0)
        status = [0]
        seen = [0]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise BodyTooLarge()
            return message

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await send_json(send_with_id, *refusal)
                return
            await self.app(scope, counted_receive, send_with_id)
        finally:
            self._log(scope, state, status[0] or 500, t0)

    @staticmethod
    def _log(scope, state: dict, status: int, t0: float) -> None:
        ttft = state.get("first_token_at")
        log.info(
            "request=%s %s %s status=%d prompt_tokens=%s completion_tokens=%s ttft=%s total=%.3fs",
            state["request_id"],
            scope["method"],
            scope["path"],
            status,
            state.get("prompt_tokens", "-"),
            state.get("completion_tokens", "-"),
            f"{ttft - t0:.3f}s" if ttft else "-",
            time.monotonic() - t0,
        )

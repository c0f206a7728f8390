"""Turn-order rules and tool-calling structures: the one place that decides which sequences of
turns are a conversation, and what a tool list, a tool call and a tool result look like.

Normalized shapes (what `Conversation.messages` / `.tools` hold and chat templates receive, as
transformers documents for `apply_chat_template(..., tools=...)`):

* a tool list: ``[{...}, ...]``, each entry an object as the record gave it (OpenAI's
  ``{"type": "function", "function": {...}}`` or a bare ``{"name", "description", "parameters"}``);
* an assistant tool call: ``{"role": "assistant", "tool_calls": [{"type": "function",
  "function": {"name": str, "arguments": dict}}, ...]}`` (arguments given as a JSON string, as
  OpenAI sends them, are parsed: templates write them with ``tojson``);
* a tool result: ``{"role": "tool", "content": str}``.

Turn order (`check_turn_order`), the same for every record format: an optional system turn first
(an empty one is no system turn: `data.meta_instruction` applies instead), then a user turn; user
and assistant turns alternate; tool results follow an assistant tool call (several results may
follow one turn of several calls) and are answered by the assistant; the last turn is the
assistant's. Anything else is a `TurnOrderError` naming the turn, which `data.on_error: skip`
counts by its `reason`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from peftchat.errors import DataError


class TurnOrderError(DataError):
    """A record whose turns are not in a trainable order; `reason` is its count key in the data report."""

    def __init__(self, message: str, reason: str, index: Optional[int] = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.index = index  # the turn it names (the server's error `param`)


def _json_value(value: Any, origin: str, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{origin}: {where} is not valid JSON ({e.msg} at column {e.colno})") from None


def tools_from(value: Any, origin: str, where: str = "field 'tools'") -> Optional[list[dict[str, Any]]]:
    """A record's tool list (a list, or a JSON string of one, as LLaMA-Factory's ShareGPT files
    hold it); None when there is none (absent, empty)."""
    if value is None or value == "":
        return None
    tools = _json_value(value, origin, where)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(
            f"{origin}: {where} must be a list of tool objects (or a JSON string of one), got {tools!r:.60}"
        )
    return tools or None


def tool_call(call: Any, origin: str, where: str) -> dict[str, Any]:
    """One call in the normalized shape, from OpenAI's ``{type, function: {name, arguments}}`` or a
    bare ``{name, arguments}`` (ShareGPT's `function_call` value)."""
    if not isinstance(call, dict):
        raise DataError(f"{origin}: {where} must be an object {{name, arguments}}, got {call!r:.60}")
    extra = {k: v for k, v in call.items() if k not in ("function", "type", "name", "arguments") and v is not None}
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(f'{origin}: {where} has no function name (expected {{"name": ..., "arguments": {{...}}}})')
    arguments = _json_value(function.get("arguments", {}), origin, f"{where}.arguments")
    if not isinstance(arguments, dict):
        raise DataError(
            f"{origin}: {where}.arguments must be an object (or a JSON string of one), got {arguments!r:.60}"
        )
    return {**extra, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_calls_from(value: Any, origin: str, where: str) -> list[dict[str, Any]]:
    """An assistant turn's calls: OpenAI's `tool_calls` list, or a ShareGPT `function_call` value
    (a JSON object or a JSON list of objects, for several calls in one turn)."""
    calls = _json_value(value, origin, where)
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise DataError(f"{origin}: {where} holds no tool call")
    return [tool_call(c, origin, f"{where}[{k}]" if len(calls) > 1 else where) for k, c in enumerate(calls)]


def without_empty_system(messages: list[dict[str, Any]], where: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """An empty (or blank) system turn is no system turn, in every format (`data.meta_instruction`
    then applies)."""
    if messages and messages[0]["role"] == "system" and not (messages[0].get("content") or "").strip():
        return messages[1:], where[1:]
    return messages, where


def check_turn_order(
    messages: list[dict[str, Any]], where: list[str], origin: str, awaiting_reply: bool = False
) -> None:
    """Raise `TurnOrderError` naming the first turn out of order (`where[i]` names turn i as the
    record spells it, e.g. ``conversations[3]``). `awaiting_reply`: a chat request, which ends
    where the assistant is to answer (a user turn, or the results of its last calls) instead."""

    def bad(i: int, problem: str, reason: str) -> TurnOrderError:
        return TurnOrderError(f"{origin}: {where[i]}: {problem}", reason, i)

    for i, m in enumerate(messages):
        role, prev = m["role"], messages[i - 1] if i else None
        if role == "system":
            if i:
                raise bad(
                    i,
                    "a system turn in the middle (only the first turn may be the system's)",
                    "system turn in the middle",
                )
        elif prev is None or prev["role"] == "system":
            if role != "user":
                raise bad(
                    i, f"the conversation must start with a user turn, found {role!r}", "first turn not the user's"
                )
        elif role == "tool":
            if not (prev["role"] == "tool" or prev.get("tool_calls")):
                raise bad(i, "a tool result with no tool call before it", "tool result with no call before it")
        elif role == prev["role"]:
            raise bad(i, f"two {role} turns in a row ({where[i - 1]} and {where[i]})", "consecutive same-role turns")
        elif role == "user" and prev["role"] == "tool":
            raise bad(
                i,
                "a user turn right after a tool result (the assistant must answer it first)",
                "tool result not answered",
            )
        elif role == "user" and prev.get("tool_calls"):
            raise bad(i, "a user turn right after a tool call (its result must come first)", "tool call with no result")
    if awaiting_reply:
        if messages and messages[-1]["role"] not in ("user", "tool"):
            raise bad(
                len(messages) - 1,
                f"the last message is the {messages[-1]['role']}'s; it must be a user "
                "message or the results of the assistant's tool calls",
                "nothing to answer",
            )
        return
    if messages and messages[-1]["role"] != "assistant":
        role = messages[-1]["role"]
        raise bad(
            len(messages) - 1,
            f"the conversation ends on a {role} turn; it must end with the assistant's",
            f"ends on a {role} turn",
        )


# The tool-call syntax of Qwen2.5/Hermes-style templates (`<tool_call>{json}</tool_call>`), the one
# most tool-aware templates on the hub write.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def before_tool_call(text: str) -> int:
    """How much of a reply being generated is surely text, not a call: up to the first
    `TOOL_CALL_OPEN`, less a tail that may still grow into one and the whitespace before it (which
    the parsed reply strips); a streaming server holds the rest back until the reply is parsed."""
    cut = text.find(TOOL_CALL_OPEN)
    if cut < 0:
        cut = len(text)
        for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(TOOL_CALL_OPEN[:k]):
                cut -= k
                break
    return len(text[:cut].rstrip())


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside the calls, the calls) of generated text in the `<tool_call>{"name": ...,
    "arguments": {...}}</tool_call>` syntax; a block that is not a valid call stays in the text.
    For `chat` (and the server's OpenAI `tool_calls` reply)."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for match in TOOL_CALL_RE.finditer(text):
        try:
            call = tool_call(json.loads(match.group(1)), "generated text", "tool_call")
        except (json.JSONDecodeError, DataError):
            continue
        kept.append(text[pos : match.start()])
        pos = match.end()
        calls.append(call)
    kept.append(text[pos:])
    return "".join(kept).strip(), calls

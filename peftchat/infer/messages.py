"""OpenAI chat messages awaiting a reply (a `serve` request's, a `chat --messages` file's) → the
history a format renders and the turn the reply answers; and tool calls back into OpenAI's shape.

The messages are checked and shaped by the code that shapes training records (`formats.turns`:
`tool_calls_from`, `without_empty_system`, `check_turn_order`), so a request holding the turns of
a training record is prompted with that record's tokens. The turn to answer is the last user
message, or the `tool` results that follow the assistant's last calls (the format then renders
them after the call, as training rendered results).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional, Union

from peftchat.errors import DataError
from peftchat.formats.conversation import Conversation
from peftchat.formats.turns import TurnOrderError, check_turn_order, tool_calls_from, tools_from, without_empty_system
from peftchat.infer.engine import RequestError

Query = Union[str, list[dict[str, Any]]]


def _text(content: Any, where: str) -> Optional[str]:
    """A message's content as text: a string, or OpenAI text parts joined (None when absent)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _message(m: Any, i: int, origin: str) -> dict[str, Any]:
    """One message in the normalized shape (`formats.turns`); RequestError naming it when it is not one."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError(f"{where} must be an object with a 'role'", where)
    role = "system" if m["role"] == "developer" else m["role"]
    if role not in ("system", "user", "assistant", "tool"):
        raise RequestError(
            f"{where}.role is {m['role']!r}; expected system, developer, user, assistant or tool", f"{where}.role"
        )
    out: dict[str, Any] = {"role": role}
    text = _text(m.get("content"), where)
    if m.get("tool_calls"):
        if role != "assistant":
            raise RequestError(f"{where}.tool_calls: only an assistant message makes tool calls", f"{where}.tool_calls")
        try:
            out["tool_calls"] = tool_calls_from(m["tool_calls"], origin, f"{where}.tool_calls")
        except DataError as e:
            raise RequestError(str(e).removeprefix(f"{origin}: "), f"{where}.tool_calls") from None
    elif text is None:
        raise RequestError(f"{where} has no content", f"{where}.content")
    if text is not None:
        out["content"] = text
    # kept for the templates that write them (Mistral's tool_call_id); Qwen's ignores them
    out.update({k: m[k] for k in ("tool_call_id", "name") if role == "tool" and isinstance(m.get(k), str)})
    return out


def split_messages(messages: list[Any], tools: Any = None, origin: str = "request") -> tuple[Conversation, Query]:
    """(the history with its system message and `tools`, the turn to answer): RequestError,
    naming the message, when the messages are not a conversation awaiting the assistant."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    try:
        tool_list = tools_from(tools, origin, "tools")
    except DataError as e:
        raise RequestError(str(e).removeprefix(f"{origin}: "), "tools") from None
    turns = [_message(m, i, origin) for i, m in enumerate(messages)]
    turns, where = without_empty_system(turns, [f"messages[{i}]" for i in range(len(turns))])
    try:
        check_turn_order(turns, where, origin, awaiting_reply=True)
    except TurnOrderError as e:
        param = f"{where[e.index]}.role" if e.index is not None and e.index < len(where) else "messages"
        raise RequestError(str(e).removeprefix(f"{origin}: "), param) from None
    if not turns:
        raise RequestError("the messages hold no user message", "messages")
    if turns[-1]["role"] == "user":
        query: Query = turns[-1]["content"]
        history = turns[:-1]
    else:  # the results of the last calls
        first = len(turns)
        while turns[first - 1]["role"] == "tool":
            first -= 1
        query, history = turns[first:], turns[:first]
    return Conversation(messages=history, origin=origin, tools=tool_list), query


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parsed calls (`formats.turns.parse_tool_calls`) in OpenAI's reply shape: an id each (the
    client sends it back with the result), `arguments` as a JSON string."""
    return [
        {
            "id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False),
            },
        }
        for c in calls
    ]

"""Raw record readers: turn one raw record (a dict from `datasets`) into a `Conversation`, by its
record format (`data.format`; the conversation formats of `data.collator` are `peftchat.formats`).

Record formats (`data.format`):

* ``moss``: ``meta_instruction``, ``num_turns``, ``chat.turn_1 … turn_N``, each turn holding
  ``Human``, ``Inner Thoughts``, ``Commands``, ``Tool Responses``, ``MOSS`` (the last three
  optional). Field values are kept verbatim: they carry their own markup (``<|Human|>: …<eoh>\\n``).
* ``chatglm``: one row = query, answer and an optional history ``[[q, a], ...]`` under the column
  names ``data.prompt_column`` / ``response_column`` / ``history_column``. The history rounds are
  context only: the row trains its last answer, as in ChatGLM-6B.
* ``messages``: OpenAI style ``{"messages": [{"role": system|user|assistant|tool, "content"}]}``.
  ``content`` may also be a list of OpenAI content parts; the text parts are joined with a newline
  (as vLLM does) and any other part (an image, audio) is a bad record. An assistant message may
  carry ``"train": false`` (a bool): it stays in the context but the collators put no loss on it,
  and ``tool_calls``; the record may carry ``tools``.
* ``sharegpt``: ``{"conversations": [{"from": human|gpt|system|function_call|observation, "value"}],
  "system"?: str, "tools"?: list or JSON string}`` (LLaMA-Factory's shape): a ``function_call``
  value is a JSON call ``{"name", "arguments"}`` (or a list of them), an ``observation`` a tool result.
* tools (``messages`` and ``sharegpt``): a record's ``tools`` list reaches the chat template as
  ``tools=``; an assistant message's ``tool_calls`` (OpenAI's) are its calls; ``tool`` messages are
  results. Turn order and tool structures are checked in one place, `peftchat.formats.turns`.
  Role spellings other than the format's own are accepted only through ``data.roles``.
* ``alpaca``: ``instruction``, optional ``input`` (appended to the instruction after a newline, as
  Alpaca and LLaMA-Factory do), ``output``, optional ``system`` and ``history`` ``[[q, a], ...]``
  (earlier rounds, trained like the last one: history is part of the conversation here).
* ``preference``: chosen/rejected pairs (TRL's ``prompt``/``chosen``/``rejected``, plain or as
  messages, or ShareGPT ``conversations`` + ``chosen`` + ``rejected``; `pair_sides`). Under
  ``training.objective`` dpo/orpo/simpo `peftchat.data.preference` encodes both sides; otherwise a
  pair normalizes to its chosen conversation (SFT on the chosen replies).
* ``auto``: picked from the keys of the first record of each file or dataset (`detect_format`).

`fields_read` names the top-level fields each format reads: the loader keeps only those, so columns
a format ignores never decide whether a file loads.

A record that cannot be a conversation raises `DataError("<origin>: <problem>")`, where the origin
is ``file:line`` for JSON Lines (1-based) or ``source[index]`` otherwise. A chatglm row with an empty
query or answer is well-formed but yields nothing: it comes back with `dropped` set, as ChatGLM-6B
skips such rows, and the data report counts it.

The loader that reads files into records is `peftchat.data.sources`; it imports this module, never
the other way round.
"""

from __future__ import annotations

from typing import Any

from peftchat.config import DataConfig
from peftchat.errors import DataError
from peftchat.formats.conversation import Conversation
from peftchat.formats.moss import MOSS_ENDS, MOSS_FIELDS
from peftchat.formats.moss import strip_markup as _strip_markup
from peftchat.formats.turns import check_turn_order, tool_calls_from, tools_from, without_empty_system

FORMATS = ("moss", "chatglm", "messages", "sharegpt", "alpaca", "preference")

MOSS_REQUIRED = ("Human", "MOSS")

# The role spellings each format knows; any other needs an entry in `data.roles` (so a file gives
# the same turns as in other tools unless the recipe says otherwise). ShareGPT's are LLaMA-Factory's
# (`function_call` = an assistant tool call, `observation` = a tool result) plus OpenAI's names.
MESSAGE_ROLES: dict[str, str] = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES: dict[str, str] = {
    **MESSAGE_ROLES,
    "human": "user",
    "gpt": "assistant",
    "function_call": "function_call",
    "observation": "tool",
}


def detect_format(record: dict[str, Any], cfg: DataConfig, origin: str) -> str:
    """The format of `record`, judged from its keys (the `auto` format)."""
    keys = {k for k, v in record.items() if v is not None}
    if "chosen" in keys and "rejected" in keys:  # pairs (peftchat.data.preference), in any of their shapes
        return "preference"
    if "chat" in keys and ("num_turns" in keys or "meta_instruction" in keys):
        return "moss"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if cfg.prompt_column in keys and cfg.response_column in keys:  # first: the recipe named these columns
        return "chatglm"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    raise DataError(
        f"{origin}: cannot tell the data format from the keys {sorted(keys)}; expected 'chat' + "
        f"'num_turns' (moss), 'messages', 'conversations' (sharegpt), 'instruction' + 'output' "
        f"(alpaca) or '{cfg.prompt_column}' + '{cfg.response_column}' (chatglm); set data.format"
    )


def fields_read(fmt: str, cfg: DataConfig) -> tuple[str, ...]:
    """The top-level fields of a record that `normalize(record, fmt, ...)` reads."""
    if fmt == "moss":
        return ("meta_instruction", "num_turns", "chat")
    if fmt == "chatglm":
        return tuple(c for c in (cfg.prompt_column, cfg.response_column, cfg.history_column, "tools") if c)
    if fmt == "messages":
        return ("messages", "tools")
    if fmt == "sharegpt":
        return ("conversations", "system", "tools")
    if fmt == "alpaca":
        return ALPACA_FIELDS
    if fmt == "preference":
        return PAIR_FIELDS
    raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


def prune(record: dict[str, Any], fmt: str, cfg: DataConfig) -> dict[str, Any]:
    """`record` without the fields `fmt` does not read (and without null fields)."""
    return {k: record[k] for k in fields_read(fmt, cfg) if record.get(k) is not None}


def normalize(record: dict[str, Any], fmt: str, cfg: DataConfig, origin: str) -> Conversation:
    """Turn one raw record of format `fmt` into a Conversation (DataError when it is bad)."""
    if fmt == "moss":
        return _from_moss(record, cfg, origin)
    if fmt == "chatglm":
        return _from_chatglm(record, cfg, origin)
    if fmt == "messages":
        return _from_messages(record, cfg, origin)
    if fmt == "sharegpt":
        return _from_sharegpt(record, cfg, origin)
    if fmt == "alpaca":
        return _from_alpaca(record, origin)
    if fmt == "preference":  # outside a preference objective: the chosen side trains (SFT on the chosen replies)
        side_format, chosen, _ = pair_sides(record, origin)
        return normalize(chosen, side_format, cfg, origin)
    raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _bad(origin: str, problem: str) -> DataError:
    return DataError(f"{origin}: {problem}")


def _from_moss(record: dict[str, Any], cfg: DataConfig, origin: str) -> Conversation:
    chat = record.get("chat")
    if not isinstance(chat, dict):
        raise _bad(origin, "missing field 'chat' (an object of turn_1 … turn_N)")
    num_turns = record.get("num_turns")
    present = sorted((k for k, v in chat.items() if v is not None), key=lambda k: (len(k), k))  # turn_2 before turn_10
    if num_turns is None:
        raise _bad(origin, "missing field 'num_turns'")
    try:
        n = int(num_turns)
    except (TypeError, ValueError):
        raise _bad(origin, f"'num_turns' must be a number, got {num_turns!r}") from None
    expected = [f"turn_{k}" for k in range(1, n + 1)]
    if n < 1 or present != expected:
        raise _bad(origin, f"num_turns is {num_turns} but 'chat' holds {present or 'no turns'}")
    meta = record.get("meta_instruction")
    if meta is None:
        meta = cfg.meta_instruction
    if meta is not None and not isinstance(meta, str):
        raise _bad(origin, f"'meta_instruction' must be a string, got {type(meta).__name__}")

    turns: list[list[tuple[str, str]]] = []
    messages: list[dict[str, Any]] = [{"role": "system", "content": meta}] if meta else []
    for name in expected:
        turn = chat[name]
        if not isinstance(turn, dict):
            raise _bad(origin, f"chat.{name} must be an object of fields, got {type(turn).__name__}")
        unknown = [k for k, v in turn.items() if v is not None and k not in MOSS_FIELDS]
        if unknown:
            raise _bad(origin, f"chat.{name} has unknown field {unknown[0]!r}; expected {', '.join(MOSS_FIELDS)}")
        fields: list[tuple[str, str]] = []
        for key, marker in MOSS_FIELDS.items():
            value = turn.get(key)
            if value is None:
                if key in MOSS_REQUIRED:
                    raise _bad(origin, f"chat.{name} is missing field {key!r}")
                continue
            if not isinstance(value, str):
                raise _bad(origin, f"chat.{name}.{key} must be a string, got {type(value).__name__}")
            if not value.startswith(marker):
                raise _bad(origin, f"chat.{name}.{key} must start with {marker!r}, got {value[:30]!r}")
            if key == "Tool Responses" and "<eor>" not in value:
                raise _bad(origin, f"chat.{name}.{key} must end with '<eor>'")
            fields.append((key, value))
        user = _strip_markup(dict(fields)["Human"], MOSS_FIELDS["Human"], MOSS_ENDS["Human"])
        answer = _strip_markup(dict(fields)["MOSS"], MOSS_FIELDS["MOSS"], MOSS_ENDS["MOSS"])
        turns.append(fields)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return Conversation(messages=messages, origin=origin, moss_turns=turns)


def _from_chatglm(record: dict[str, Any], cfg: DataConfig, origin: str) -> Conversation:
    cols = {"query": cfg.prompt_column, "answer": cfg.response_column}
    values: dict[str, str] = {}
    for what, col in cols.items():
        value = record.get(col)
        if value is None:
            raise _bad(origin, f"missing field {col!r} (data.{'prompt' if what == 'query' else 'response'}_column)")
        if not isinstance(value, str):
            raise _bad(origin, f"field {col!r} must be a string, got {type(value).__name__}")
        values[what] = value
    if tools_from(record.get("tools"), origin) and "tools" not in cols.values():
        raise _bad(
            origin,
            "field 'tools': a chatglm row (query, answer, history) has no place for a tool list "
            "(use the messages or sharegpt format with data.collator=chat_template)",
        )
    history = record.get(cfg.history_column) if cfg.history_column else None
    pairs: list[tuple[str, str]] = []
    if history is not None:
        if not isinstance(history, list):
            raise _bad(origin, f"field {cfg.history_column!r} must be a list of [query, answer] pairs")
        for k, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise _bad(origin, f"{cfg.history_column}[{k}] must be a [query, answer] pair of strings, got {pair!r}")
            pairs.append((pair[0], pair[1]))
    messages: list[dict[str, Any]] = []
    for q, a in [*pairs, (values["query"], values["answer"])]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    # ChatGLM-6B: `if examples[prompt_column][i] and examples[response_column][i]` — others skipped.
    dropped = None if values["query"] and values["answer"] else "empty query or answer"
    return Conversation(messages=messages, origin=origin, context_rounds=len(pairs), dropped=dropped)


def _message(
    role: str, content: Any, extras: dict[str, Any], origin: str, where: str, content_key: str
) -> dict[str, Any]:
    """One turn, checked and normalized (`turns` module): a `function_call` turn becomes an
    assistant message with `tool_calls`; keys with a None value are dropped."""
    text = _text_content(content, origin, f"{where}.{content_key}")
    out = {k: v for k, v in extras.items() if v is not None}
    train = out.get("train")
    if train is not None and (not isinstance(train, bool) or role not in ("assistant", "function_call")):
        raise _bad(
            origin, f"{where}.train must be true or false, on an assistant message only; got {train!r} on {role!r}"
        )
    if role == "function_call":
        if text is None:
            raise _bad(origin, f"{where} is missing '{content_key}'")
        out["tool_calls"] = tool_calls_from(text, origin, f"{where}.{content_key}")
        role, text = "assistant", None
    elif "tool_calls" in out:
        if role != "assistant":
            raise _bad(origin, f"{where}.tool_calls: only an assistant turn makes tool calls, not a {role!r} one")
        out["tool_calls"] = tool_calls_from(out["tool_calls"], origin, f"{where}.tool_calls")
    if text is None and role != "assistant":
        raise _bad(origin, f"{where} is missing '{content_key}'")
    if text is None and not out.get("tool_calls"):
        text = ""  # an assistant turn with neither text nor a call: an empty answer
    return {"role": role, **({"content": text} if text is not None else {}), **out}


def _role(spelling: Any, builtin: dict[str, str], cfg: DataConfig, origin: str, where: str) -> str:
    """The role a turn's spelling stands for: the format's documented names, else `data.roles`."""
    roles = {**builtin, **(cfg.roles or {})}
    role = roles.get(spelling) if isinstance(spelling, str) else None
    if role is None:
        raise _bad(
            origin,
            f"{where} is {spelling!r}; expected one of {', '.join(builtin)} "
            "(map other spellings to one of these in data.roles)",
        )
    return role


def _conversation(
    messages: list[dict[str, Any]], where: list[str], origin: str, tools: list[dict[str, Any]] | None = None
) -> Conversation:
    """The conversation of checked turns, in an order every format can train (`check_turn_order`)."""
    messages, where = without_empty_system(messages, where)
    check_turn_order(messages, where, origin)
    return Conversation(messages=messages, origin=origin, tools=tools)


def _text_content(content: Any, origin: str, where: str) -> str | None:
    """A message's content as text: a string as is, OpenAI content parts' text joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(origin, f"{where} must be a string or a list of content parts, got {type(content).__name__}")
    texts: list[str] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"a {kind!r} part" if kind is not None else repr(part)[:40]
            raise _bad(
                origin, f'{where}[{k}] is {what}; only text parts ({{"type": "text", "text": ...}}) are supported'
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(origin, f"{where}[{k}].text must be a string, got {type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


def _from_messages(record: dict[str, Any], cfg: DataConfig, origin: str) -> Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _bad(origin, "missing field 'messages' (a list of {role, content} objects)")
    if not messages:
        raise _bad(origin, "'messages' is empty")
    out, where = [], []
    for i, m in enumerate(messages):
        where.append(f"messages[{i}]")
        role = _role(m.get("role"), MESSAGE_ROLES, cfg, origin, f"messages[{i}].role")
        extras = {k: v for k, v in m.items() if k not in ("role", "content")}
        out.append(_message(role, m.get("content"), extras, origin, where[-1], "content"))
    return _conversation(out, where, origin, tools_from(record.get("tools"), origin))


def _from_sharegpt(record: dict[str, Any], cfg: DataConfig, origin: str) -> Conversation:
    convs = record.get("conversations")
    if not isinstance(convs, list) or not all(isinstance(m, dict) for m in convs):
        raise _bad(origin, "missing field 'conversations' (a list of {from, value} objects)")
    if not convs:
        raise _bad(origin, "'conversations' is empty")
    messages: list[dict[str, Any]] = []
    where: list[str] = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise _bad(origin, f"field 'system' must be a string, got {type(system).__name__}")
        messages.append({"role": "system", "content": system})
        where.append("system")
    for i, turn in enumerate(convs):
        where.append(f"conversations[{i}]")
        role = _role(turn.get("from"), SHAREGPT_ROLES, cfg, origin, f"conversations[{i}].from")
        if turn.get("value") is None:
            raise _bad(origin, f"conversations[{i}] is missing 'value'")
        messages.append(_message(role, turn["value"], {}, origin, where[-1], "value"))
    return _conversation(messages, where, origin, tools_from(record.get("tools"), origin))


ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


def _from_alpaca(record: dict[str, Any], origin: str) -> Conversation:
    values: dict[str, str] = {}
    for key in ("instruction", "input", "output", "system"):
        value = record.get(key)
        if value is None and key in ("instruction", "output"):
            raise _bad(origin, f"missing field {key!r} (alpaca: instruction, input, output)")
        if value is not None and not isinstance(value, str):
            raise _bad(origin, f"field {key!r} must be a string, got {type(value).__name__}")
        values[key] = value or ""
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        raise _bad(origin, "field 'history' must be a list of [query, answer] pairs")
    messages: list[dict[str, Any]] = [{"role": "system", "content": values["system"]}]
    where = ["system"]
    for k, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _bad(origin, f"history[{k}] must be a [query, answer] pair of strings, got {pair!r}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        where += [f"history[{k}][0]", f"history[{k}][1]"]
    query = "\n".join(t for t in (values["instruction"], values["input"]) if t)
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": values["output"]}]
    return _conversation(messages, where + ["instruction", "output"], origin)


# ------------------------------------------------------------------------------ preference pairs
# The record shapes of chosen/rejected pairs (the encoding and batching: `peftchat.data.preference`).

PAIR_FIELDS = ("prompt", "chosen", "rejected", "conversations", "messages", "system", "tools")


def _reply(value: Any, origin: str, key: str) -> dict[str, Any]:
    """A reply field as one assistant message (text, a message dict, or a list ending in one)."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict):
            raise _bad(origin, f"'{key}' must be a text, a message or a non-empty list of messages")
        value = value[-1]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        if "from" in value:  # ShareGPT's {from, value}
            return {"role": "assistant", "content": value.get("value")}
        return {**value, "role": value.get("role", "assistant")}
    raise _bad(origin, f"'{key}' must be a text, a message or a list of messages, got {type(value).__name__}")


def _implicit_prompt(record: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    """TRL's implicit prompt: the messages `chosen` and `rejected` share before their last."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)) or len(chosen) < 2:
        raise _bad(
            origin,
            "a preference record without 'prompt', 'conversations' or 'messages' needs "
            "'chosen' and 'rejected' as whole conversations (lists of messages)",
        )
    if chosen[:-1] != rejected[:-1]:
        raise _bad(origin, "'chosen' and 'rejected' must share every message but the last (TRL's implicit prompt)")
    return chosen[:-1]


def pair_sides(record: dict[str, Any], origin: str) -> tuple[str, dict, dict]:
    """(record format, chosen-side record, rejected-side record), each a whole conversation."""
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise _bad(origin, f"missing field '{key}' (a preference pair needs 'chosen' and 'rejected')")
    chosen, rejected = _reply(record["chosen"], origin, "chosen"), _reply(record["rejected"], origin, "rejected")
    if "conversations" in record:
        extra = {k: record[k] for k in ("system", "tools") if record.get(k) is not None}
        turns = list(record["conversations"]) if isinstance(record["conversations"], list) else record["conversations"]
        if not isinstance(turns, list):
            raise _bad(origin, "'conversations' must be a list of {from, value} objects")

        def side(m: dict) -> dict:
            return {**extra, "conversations": turns + [{"from": "gpt", "value": m.get("content")}]}

        return "sharegpt", side(chosen), side(rejected)
    prompt = record.get("prompt", record.get("messages"))
    if prompt is None:
        prompt = _implicit_prompt(record, origin)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise _bad(origin, f"'prompt' must be a text or a list of messages, got {type(prompt).__name__}")
    extra = {"tools": record["tools"]} if record.get("tools") is not None else {}
    return "messages", {**extra, "messages": prompt + [chosen]}, {**extra, "messages": prompt + [rejected]}

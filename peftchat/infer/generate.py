"""`peftchat generate`: batched generation over a JSONL file of prompts.

Input rows, one JSON object a line, in any of these forms:

* `{"prompt": "...", "history": [[q, a], ...]}` (ChatGLM rows; `history` optional, also as
  `[{"user": q, "assistant": a}, ...]`), or `{"query": ..., "history": ...}`;
* `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` ending with a user
  message; a leading system message replaces the recipe's `data.meta_instruction` (a format
  without system messages leaves it out, as in training, and says so).

Each prompt is built by the recipe's conversation format, as in chat. Prompts are batched longest first
(less padding) and LEFT-padded, so every row's new tokens start at the same position; output rows
`{"prompt": ..., "reply": ...}` (plus the input's `id`, when it has one) are written in input order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from peftchat.errors import DataError, UserError
from peftchat.formats.base import ConversationFormat
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import context_budget, generation_config, logits_processors
from peftchat.infer.engine import pad_left
from peftchat.infer.loading import load_chat_model, say
from peftchat.paths import atomic_output


@dataclass
class Request:
    line: int
    query: str
    history: Conversation  # finished rounds, with the row's system message when it has one
    id: Any = None


def _history(value: Any, where: str) -> Conversation:
    rounds = []
    for i, item in enumerate(value or []):
        if isinstance(item, dict) and isinstance(item.get("user"), str) and isinstance(item.get("assistant"), str):
            rounds.append((item["user"], item["assistant"]))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            rounds.append((item[0], item[1]))
        else:
            raise DataError(f'{where}: history[{i}] must be [query, answer] or {{"user", "assistant"}}')
    return Conversation.from_rounds(rounds, origin=where)


def _from_messages(messages: Any, where: str) -> tuple[Conversation, str]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    history: list[tuple[str, str]] = []
    pending, system = None, None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with a string 'content'")
        role = m.get("role")
        if role == "system" and i == 0:
            system = m["content"]
        elif role == "user" and pending is None:
            pending = m["content"]
        elif role == "assistant" and pending is not None:
            history.append((pending, m["content"]))
            pending = None
        else:
            raise DataError(
                f"{where}: messages[{i}] has role {role!r}; expected user and assistant turns in "
                f"alternation after an optional first system message"
            )
    if pending is None:
        raise DataError(f"{where}: the last message must be a user message")
    return Conversation.from_rounds(history, system=system, origin=where), pending


def read_requests(path: str | os.PathLike) -> list[Request]:
    """Parse the input JSONL; a bad line raises DataError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--in {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    requests = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        except RecursionError:  # json recurses once per nesting level
            raise DataError(f"{where}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        query: Optional[str]
        if "messages" in row:
            history, query = _from_messages(row["messages"], where)
        else:
            query = row.get("prompt", row.get("query"))
            if not isinstance(query, str):
                raise DataError(f"{where}: needs a string 'prompt' (or 'query'), or 'messages'")
            history = _history(row.get("history"), where)
        requests.append(Request(lineno, query, history, row.get("id")))
    return requests


def generate_replies(
    model,
    tokenizer,
    recipe,
    prompts: list[list[int]],
    batch_size: int = 8,
    progress: Optional[Any] = None,
    fmt: Optional[ConversationFormat] = None,
) -> list[str]:
    """Replies to `prompts` (token ids), in their order, generated in left-padded batches."""
    import torch

    fmt = fmt if fmt is not None else make_format(recipe.data, tokenizer)
    config = generation_config(recipe, tokenizer, fmt.stop_ids)
    forced = logits_processors(fmt)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[Optional[str]] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention = pad_left([prompts[i] for i in rows], config.pad_token_id)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                logits_processor=forced,
            )
        for row, i in enumerate(rows):
            replies[i] = fmt.parse_reply(out[row, input_ids.shape[1] :].tolist()).text
        if progress is not None:
            progress.update(len(rows))
    return replies  # type: ignore[return-value]


def run_generate(
    source: str, inp: str, out: str, overrides: list[str], batch_size: int = 8, force: bool = False
) -> int:
    """Generate a reply for every row of `inp` with the model of `source` (recipe, adapter dir or
    merged model dir) and write `{"prompt", "reply"}` rows to `out` in input order (written whole
    beside it and renamed into place; an existing `out` only with `force`)."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    requests = read_requests(inp)  # bad input fails before the model is loaded
    model, tokenizer, recipe = load_chat_model(source, overrides)
    torch.manual_seed(recipe.training.seed)
    fmt = make_format(recipe.data, tokenizer)
    prompts = []
    for r in requests:
        if r.history.system is not None and not fmt.has_system:
            say(f"{inp}:{r.line}: the {fmt.name} format has no system message; left it out, as training does")
        try:
            prompt = fmt.prompt(r.history, r.query, context_budget(recipe))
        except UserError as e:
            raise type(e)(f"{inp}:{r.line}: {e}") from None
        if prompt.dropped_rounds:
            say(
                f"{inp}:{r.line}: dropped the {prompt.dropped_rounds} oldest history round(s) to fit the context budget"
            )
        prompts.append(prompt.ids)
    with tqdm(total=len(prompts), unit="prompt", desc="generating") as bar:
        replies = generate_replies(model, tokenizer, recipe, prompts, batch_size=batch_size, progress=bar, fmt=fmt)
    out_path = Path(out)
    with atomic_output(out_path, "--out", force) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r, reply in zip(requests, replies):
            row = ({"id": r.id} if r.id is not None else {}) | {"prompt": r.query, "reply": reply}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    say(f"{len(replies)} replies written to {out_path}")
    return 0

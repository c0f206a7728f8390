"""`peftchat chat`: multi-turn chat in the terminal, after MOSS's `moss_cli_demo.py`.

Each prompt is built by the recipe's conversation format (`peftchat.formats`), the code that made
the training samples, so the model sees at chat time exactly the token layout it was trained on.
Replies stream as they are generated and stop at the format's stop tokens. `clear` resets the
history (the system message / meta instruction stays: it is part of every prompt), `stop` ends the
session. The history is kept within the context budget by dropping the oldest rounds.

`--tools FILE.json` (chat_template format) gives the session a tool list, rendered by the template
as training rendered a record's `tools`; a reply holding calls in the template's `<tool_call>` syntax
is kept in the history as the assistant's `tool_calls`, as training showed such turns. peftchat runs
no tools: the calls are shown parsed, and the user gives each call's result (on a terminal at a
`Tool result for NAME:` prompt; in any session as a `/tool RESULT` line); once every call of the
reply has its result, the results go into the history as `tool` messages and the model continues,
prompted as training rendered results. `--messages FILE.json` answers a whole conversation given as
OpenAI messages (with `tools`, `tool_calls`, `tool` results), the way `serve` answers a request.

On a terminal there is a banner and a `User:` prompt; otherwise every stdin line is one user turn
and stdout carries only the replies, one after another, so sessions can be scripted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TextIO, Union

from peftchat.config import Recipe
from peftchat.errors import UserError
from peftchat.formats.base import ConversationFormat, ReplyStream
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import context_budget, generation_config, logits_processors
from peftchat.infer.loading import load_chat_model, say

CLEAR, STOP, TOOL = "clear", "stop", "/tool"


class ReplyStreamer:
    """A transformers generation streamer that writes the reply as it grows, through the
    format's incremental `ReplyStream` (a MOSS answer sits behind `<|Inner Thoughts|>`/`<|Commands|>`
    lines, a chat template's behind nothing): each token costs a small decode, never a re-render."""

    def __init__(self, stream: ReplyStream, write: Callable[[str], object]):
        self.stream = stream
        self.write = write
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        piece = self.stream.push(int(t) for t in value.reshape(-1).tolist())
        if piece:
            self.write(piece)

    def end(self) -> None:
        pass

    def finish(self, reply: str) -> None:
        """Write whatever the final reply adds to what was streamed."""
        rest = self.stream.finish(reply)
        if rest:
            self.write(rest)


class ChatSession:
    """A conversation with one model: the history (a `Conversation` of finished rounds), prompt
    building by the recipe's conversation format, generation."""

    def __init__(
        self,
        model,
        tokenizer,
        recipe: Recipe,
        system: Optional[str] = None,
        fmt: Optional[ConversationFormat] = None,
        tools: Optional[list[dict[str, Any]]] = None,
    ):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.format = fmt if fmt is not None else make_format(recipe.data, tokenizer)
        if system is not None and not self.format.has_system:
            raise UserError(
                f"--system: the {self.format.name} format has no system message "
                "(training never showed one; data.source_prefix is its counterpart)"
            )
        self.system = system
        self.tools = tools or None
        if self.tools:
            self._check_tools(self.format, Conversation([], origin="--tools", tools=self.tools))
        self.stop_ids = self.format.stop_ids
        self.generation_config = generation_config(recipe, tokenizer, self.stop_ids)
        self.logits_processor = logits_processors(self.format)
        self.budget = context_budget(recipe)
        self.history = self._empty()
        self.results: list[dict[str, Any]] = []  # results given so far for the last reply's calls
        self.device = next(model.parameters()).device
        torch.manual_seed(recipe.training.seed)  # sampled replies repeat for the same inputs

    @staticmethod
    def _check_tools(fmt: ConversationFormat, conv: Conversation) -> None:
        if not fmt.has_tools:
            raise UserError(
                f"{conv.origin}: the {fmt.name} format has no place for a tool list or tool calls "
                "(training never showed one; use data.collator=chat_template)"
            )
        fmt.check_tools(conv)  # type: ignore[attr-defined]  # has_tools: ChatTemplateFormat

    def _empty(self) -> Conversation:
        """A history with no rounds: the --system message only (else the format adds its default)."""
        empty = Conversation.from_rounds([], system=self.system, origin="chat")
        empty.tools = self.tools
        return empty

    def clear(self) -> None:
        self.history = self._empty()
        self.results = []

    def pending_calls(self) -> list[dict[str, Any]]:
        """The calls of the last reply still waiting for their results (`tool_result`)."""
        last = self.history.messages[-1] if self.history.messages else {}
        return (last.get("tool_calls") or [])[len(self.results) :] if last.get("role") == "assistant" else []

    def tool_result(self, content: str, write: Optional[Callable[[str], object]] = None) -> Optional[str]:
        """Give the next pending call its result; once every call has one, the model continues
        (the reply is returned, and streamed through `write`); None while results are missing."""
        if not self.pending_calls():
            raise UserError("a tool result, but the last reply called no tool (a '/tool' line answers a tool call)")
        self.results.append({"role": "tool", "content": content})
        if self.pending_calls():
            return None
        results, self.results = self.results, []
        return self.reply(results, write)

    def load_messages(self, messages: Any, tools: Any, origin: str) -> Union[str, list[dict[str, Any]]]:
        """Take OpenAI `messages` (`--messages`; checked as `serve` checks a request) as the
        history; returns its turn to answer (a user message or tool results)."""
        from peftchat.infer.messages import split_messages

        try:
            history, query = split_messages(messages, tools or self.tools, origin)
        except UserError as e:
            raise UserError(f"{origin}: {e}") from None
        if self.system is not None and history.system is not None:
            raise UserError(f"{origin}: the messages have a system message; leave out --system")
        if self.system is not None:
            history.messages.insert(0, {"role": "system", "content": self.system})
        if history.tools or not isinstance(query, str) or any(m.get("tool_calls") for m in history.messages):
            self._check_tools(self.format, history)
        self.history, self.results = history, []
        return query

    def build_prompt(self, query: Union[str, list[dict[str, Any]]]) -> list[int]:
        """The training prompt for `query` after the history that fits the context budget; the
        rounds left out are gone for good, so later turns do not bring them back."""
        # a tool-result list (not a str) only reaches ChatTemplateFormat (has_tools)
        prompt = self.format.prompt(self.history, query, self.budget)  # type: ignore[arg-type]
        if prompt.dropped_rounds:
            self.history = self.history.without_oldest_rounds(prompt.dropped_rounds)
            say(
                f"(left out the {prompt.dropped_rounds} oldest round(s) of the history "
                "to stay within the context budget)"
            )
        return prompt.ids

    def reply(self, query: Union[str, list[dict[str, Any]]], write: Optional[Callable[[str], object]] = None) -> str:
        """Generate the answer to `query` (a user message, or the results of the last reply's
        calls), add the round to the history and return the reply. With `write`, the reply is
        streamed through it as it is generated (and completed)."""
        import torch

        if isinstance(query, str) and self.pending_calls():
            names = ", ".join(c["function"]["name"] for c in self.pending_calls())
            raise UserError(f"the model called {names}: give the result first ('/tool RESULT'), or 'clear'")

        prompt = self.build_prompt(query)
        streamer = ReplyStreamer(self.format.reply_stream(), write) if write is not None else None
        input_ids = torch.tensor([prompt], device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self.generation_config,
                logits_processor=self.logits_processor,
                streamer=streamer,
            )
        # A MOSS reply keeps what the model generated around its answer (inner thoughts, commands),
        # so the next prompt shows the model its own turn as training rendered such turns.
        reply = self.format.parse_reply(out[0, len(prompt) :].tolist())
        if streamer is not None:
            streamer.finish(reply.text)
        # a tool-result list (not a str) only reaches ChatTemplateFormat (has_tools)
        self.history = self.format.add_round(self.history, query, reply)  # type: ignore[arg-type]
        return reply.text


def _user_turns(
    stdin: TextIO, interactive: bool, stdout: TextIO, label: Callable[[], str] = lambda: "User: "
) -> Iterable[str]:
    """User turns: `input()` with a prompt (`label()`) on a terminal, else one stdin line each."""
    if interactive:
        while True:
            try:
                yield input("\n" + label())
            except EOFError:
                stdout.write("\n")
                return
    else:
        for line in stdin:
            yield line.rstrip("\r\n")


def _calls_text(calls: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})" for c in calls
    )


def _respond(
    session: ChatSession,
    query: Union[str, list[dict[str, Any]]],
    write: Callable[[str], object],
    stream: bool,
    interactive: bool,
) -> None:
    """Answer one turn: a user message, a tool result (a `/tool RESULT` line; on a terminal any
    line while calls wait for results) or, from `--messages`, tool result messages. Calls in
    the reply are shown parsed: on a terminal before the result prompts, else on stderr."""
    result: Optional[str] = None
    if isinstance(query, str):
        if query == TOOL or query.startswith(TOOL + " "):
            result = query[len(TOOL) :].strip()
        elif interactive and session.pending_calls():
            result = query
    if result is not None and len(session.pending_calls()) != 1:
        session.tool_result(result)  # more results to come (or a UserError: no call to answer)
        return
    if interactive:
        write("Assistant: ")
    out = write if stream else None
    text = session.tool_result(result, out) if result is not None else session.reply(query, out)
    write("\n" if stream else f"{text}\n")
    calls = session.pending_calls()
    if calls and interactive:
        write(f"(tool call: {_calls_text(calls)})\n")
    elif calls:
        say(f"tool call: {_calls_text(calls)}; give each result as a line '{TOOL} RESULT'")


def chat_loop(session: ChatSession, turns: Iterable[str], stdout: TextIO, stream: bool, interactive: bool) -> None:
    """Answer each turn; `clear` resets the history, `stop` ends; blank lines are skipped."""

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    for turn in turns:
        query = turn.strip()
        if not query:
            continue
        if "\ufffd" in query:
            say("note: bytes of that message that are not valid text were replaced by U+FFFD")
        if query == STOP:
            break
        if query == CLEAR:
            session.clear()
            if interactive:
                write("(history cleared)\n")
            continue
        try:
            _respond(session, query, write, stream, interactive)
        except UserError as e:  # e.g. a message longer than the context budget
            if not interactive:
                raise
            write("\n")
            say(f"error: {e}")


def read_messages(path: str) -> tuple[Any, Any]:
    """(messages, tools) of `--messages FILE.json`: a JSON list of OpenAI messages, or an object
    with `messages` and optional `tools` (a `messages` training record less its last answer)."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--messages {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--messages {path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        return data["messages"], data.get("tools")
    if isinstance(data, list):
        return data, None
    raise UserError(f"--messages {path}: expected a JSON list of messages, or an object with 'messages' (and 'tools')")


def read_tools(path: str) -> list[dict[str, Any]]:
    """The tool list of `--tools FILE.json`: a JSON list of tool objects (OpenAI's or bare)."""
    try:
        tools = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--tools {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--tools {path}: not valid JSON ({e})") from None
    if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"--tools {path}: expected a JSON list of tool objects")
    return tools


def run_chat(
    source: str,
    overrides: list[str],
    message: Optional[str] = None,
    stream: bool = True,
    system: Optional[str] = None,
    tools: Optional[str] = None,
    messages: Optional[str] = None,
) -> int:
    """Chat with the model of `source` (recipe, adapter dir or merged model dir). `overrides`
    are `key=value` recipe overrides (sampling flags arrive as `decoding.*=`). `message`: answer
    this one message and return. `system`: the session's system message (default: the format's,
    i.e. `data.meta_instruction`, as in training). `tools`: a `--tools` JSON file. `messages`: a
    `--messages` JSON file, whose conversation is answered once. Returns the exit code."""
    tool_list = read_tools(tools) if tools is not None else None  # before the slow model load
    given = read_messages(messages) if messages is not None else None
    # Bytes that are not valid in stdin's encoding (a pasted Latin-1 line, say) become U+FFFD
    # instead of ending the session with a UnicodeDecodeError.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    model, tokenizer, recipe = load_chat_model(source, overrides)
    session = ChatSession(model, tokenizer, recipe, system=system, tools=tool_list)
    if given is not None:
        query = session.load_messages(*given, origin=f"--messages {messages}")
        _respond(session, query, lambda text: (sys.stdout.write(text), sys.stdout.flush()), stream, False)
        return 0
    interactive = message is None and sys.stdin.isatty()
    if message is not None:
        turns: Iterable[str] = [message]
    else:
        if interactive:
            d = recipe.decoding
            sampling = (
                "greedy" if d.temperature <= 0 else f"temperature {d.temperature}, top_k {d.top_k}, top_p {d.top_p}"
            )
            print(
                f"peftchat chat: {os.fspath(source)} ({recipe.data.collator} format, {sampling})\n"
                f"Type a message; 'clear' resets the history, 'stop' (or Ctrl-D) quits."
                + (f" A tool call waits for its result ('{TOOL} RESULT' gives one)." if tool_list else ""),
                flush=True,
            )

        def label() -> str:
            calls = session.pending_calls()
            return f"Tool result for {calls[0]['function']['name']}: " if calls else "User: "

        turns = _user_turns(sys.stdin, interactive, sys.stdout, label)
    chat_loop(session, turns, sys.stdout, stream=stream, interactive=interactive)
    return 0

"""`peftchat chat`: multi-turn chat in the terminal, after MOSS's `moss_cli_demo.py`.

Each prompt is built by the recipe's conversation format (`peftchat.formats`), the code that made
the training samples, so the model sees at chat time exactly the token layout it was trained on.
Replies stream as they are generated and stop at the format's stop tokens. `clear` resets the
history (the system message / meta instruction stays: it is part of every prompt), `stop` ends the
session. The history is kept within the context budget by dropping the oldest rounds.

`--tools FILE.json` (chat_template format) gives the session a tool list, rendered by the template
as training rendered a record's `tools`; a reply holding calls in the template's `<tool_call>` syntax
is kept in the history as the assistant's `tool_calls`, as training showed such turns. peftchat runs
no tools: the calls are printed as the model wrote them.

On a terminal there is a banner and a `User:` prompt; otherwise every stdin line is one user turn
and stdout carries only the replies, one after another, so sessions can be scripted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TextIO

from peftchat.config import Recipe
from peftchat.errors import UserError
from peftchat.formats.base import ConversationFormat, ReplyStream
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import context_budget, generation_config, logits_processors
from peftchat.infer.loading import load_chat_model, say

CLEAR, STOP = "clear", "stop"


class ReplyStreamer:
    """A transformers generation streamer that writes the reply as it grows, through the
    format's incremental `ReplyStream` (a MOSS answer sits behind `<|Inner Thoughts|>`/`<|Commands|>`
    lines, a chat template's behind nothing): each token costs a small decode, never a re-render."""

    def __init__(self, stream: ReplyStream, write: Callable[[str], None]):
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

    def __init__(self, model, tokenizer, recipe: Recipe, system: Optional[str] = None,
                 fmt: Optional[ConversationFormat] = None, tools: Optional[list[dict[str, Any]]] = None):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.format = fmt if fmt is not None else make_format(recipe.data, tokenizer)
        if system is not None and not self.format.has_system:
            raise UserError(f"--system: the {self.format.name} format has no system message "
                            "(training never showed one; data.source_prefix is its counterpart)")
        self.system = system
        self.tools = tools or None
        if self.tools:
            check_tools = getattr(self.format, "check_tools", None)
            if check_tools is None:
                raise UserError(f"--tools: the {self.format.name} format has no place for a tool list "
                                "(training never showed one; use data.collator=chat_template)")
            check_tools(Conversation([], origin="--tools", tools=self.tools))
        self.stop_ids = self.format.stop_ids
        self.generation_config = generation_config(recipe, tokenizer, self.stop_ids)
        self.logits_processor = logits_processors(self.format)
        self.budget = context_budget(recipe)
        self.history = self._empty()
        self.device = next(model.parameters()).device
        torch.manual_seed(recipe.training.seed)  # sampled replies repeat for the same inputs

    def _empty(self) -> Conversation:
        """A history with no rounds: the --system message only (else the format adds its default)."""
        empty = Conversation.from_rounds([], system=self.system, origin="chat")
        empty.tools = self.tools
        return empty

    def clear(self) -> None:
        self.history = self._empty()

    def build_prompt(self, query: str) -> list[int]:
        """The training prompt for `query` after the history that fits the context budget; the
        rounds left out are gone for good, so later turns do not bring them back."""
        prompt = self.format.prompt(self.history, query, self.budget)
        if prompt.dropped_rounds:
            self.history = self.history.without_oldest_rounds(prompt.dropped_rounds)
            say(f"(left out the {prompt.dropped_rounds} oldest round(s) of the history "
                "to stay within the context budget)")
        return prompt.ids

    def reply(self, query: str, write: Optional[Callable[[str], None]] = None) -> str:
        """Generate the answer to `query`, add the round to the history and return the reply.
        With `write`, the reply is streamed through it as it is generated (and completed)."""
        import torch

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
        reply = self.format.parse_reply(out[0, len(prompt):].tolist())
        if streamer is not None:
            streamer.finish(reply.text)
        self.history = self.format.add_round(self.history, query, reply)
        return reply.text


def _user_turns(stdin: TextIO, interactive: bool, stdout: TextIO) -> Iterable[str]:
    """User turns: `input()` with a prompt on a terminal, else one stdin line each."""
    if interactive:
        while True:
            try:
                yield input("\nUser: ")
            except EOFError:
                stdout.write("\n")
                return
    else:
        for line in stdin:
            yield line.rstrip("\r\n")


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
        if interactive:
            write("Assistant: ")
        try:
            if stream:
                session.reply(query, write=write)
                write("\n")
            else:
                write(session.reply(query) + "\n")
        except UserError as e:  # e.g. a message longer than the context budget
            if not interactive:
                raise
            write("\n")
            say(f"error: {e}")


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


def run_chat(source: str, overrides: list[str], message: Optional[str] = None, stream: bool = True,
             system: Optional[str] = None, tools: Optional[str] = None) -> int:
    """Chat with the model of `source` (recipe, adapter dir or merged model dir). `overrides`
    are `key=value` recipe overrides (sampling flags arrive as `decoding.*=`). `message`: answer
    this one message and return. `system`: the session's system message (default: the format's,
    i.e. `data.meta_instruction`, as in training). `tools`: a `--tools` JSON file. Returns the exit code."""
    tool_list = read_tools(tools) if tools is not None else None  # before the slow model load
    # Bytes that are not valid in stdin's encoding (a pasted Latin-1 line, say) become U+FFFD
    # instead of ending the session with a UnicodeDecodeError.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    model, tokenizer, recipe = load_chat_model(source, overrides)
    session = ChatSession(model, tokenizer, recipe, system=system, tools=tool_list)
    interactive = message is None and sys.stdin.isatty()
    if message is not None:
        turns: Iterable[str] = [message]
    else:
        if interactive:
            d = recipe.decoding
            sampling = "greedy" if d.temperature <= 0 else f"temperature {d.temperature}, top_k {d.top_k}, top_p {d.top_p}"
            print(f"peftchat chat: {os.fspath(source)} ({recipe.data.collator} format, {sampling})\n"
                  f"Type a message; 'clear' resets the history, 'stop' (or Ctrl-D) quits.", flush=True)
        turns = _user_turns(sys.stdin, interactive, sys.stdout)
    chat_loop(session, turns, sys.stdout, stream=stream, interactive=interactive)
    return 0

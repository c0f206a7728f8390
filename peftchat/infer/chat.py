"""`peftchat chat`: multi-turn chat in the terminal, after MOSS's `moss_cli_demo.py`.

Each prompt is built by the training prompt code (`chat_prompt_ids`), so the model sees at chat
time exactly the token layout its collator trained it on. Replies stream as they are generated
and stop at the format's stop tokens. `clear` resets the history (the meta instruction stays: it
is part of every prompt), `stop` ends the session. The history is kept within the context budget
by dropping the oldest rounds.

On a terminal there is a banner and a `User:` prompt; otherwise every stdin line is one user turn
and stdout carries only the replies, one after another, so sessions can be scripted.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Optional, TextIO

from peftchat.config import Recipe
from peftchat.data.formats import MOSS_FIELDS
from peftchat.data.prompting import extract_reply, history_round, stop_token_ids
from peftchat.errors import UserError
from peftchat.infer.decoding import fit_prompt, generation_config
from peftchat.infer.loading import load_chat_model, say

CLEAR, STOP = "clear", "stop"


class ReplyStreamer:
    """A transformers generation streamer that writes the reply as it grows.

    transformers' TextStreamer decodes the raw tokens; a reply is what the format's
    `extract_reply` makes of them (a MOSS answer sits behind `<|Inner Thoughts|>`/`<|Commands|>`
    lines), so each step re-extracts the reply from all tokens so far and writes what was added.
    Text ending in U+FFFD (a character split across tokens) waits for the next token.
    """

    def __init__(self, extract: Callable[[list[int]], str], write: Callable[[str], None]):
        self.extract = extract
        self.write = write
        self.ids: list[int] = []
        self.shown = ""
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.extract(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        if len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text

    def end(self) -> None:
        pass

    def finish(self, reply: str) -> None:
        """Write whatever the final reply adds to what was streamed."""
        if reply.startswith(self.shown):
            self.write(reply[len(self.shown):])
        else:  # extraction changed its mind about earlier text: show the final reply whole
            self.write("\n" + reply)


class ChatSession:
    """A conversation with one model: history of finished rounds, prompt building, generation."""

    def __init__(self, model, tokenizer, recipe: Recipe):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.stop_ids = stop_token_ids(recipe, tokenizer)
        self.generation_config = generation_config(recipe, tokenizer, self.stop_ids)
        self.history: list[dict] = []
        self.device = next(model.parameters()).device
        torch.manual_seed(recipe.training.seed)  # sampled replies repeat for the same inputs

    def clear(self) -> None:
        self.history = []

    def build_prompt(self, query: str) -> list[int]:
        """The training prompt for `query` after the history that fits the context budget."""
        ids, dropped = fit_prompt(self.recipe, self.tokenizer, self.history, query)
        if dropped:
            say(f"(left out the {dropped} oldest round(s) of the history to stay within the context budget)")
        return ids

    def partial_reply(self, ids: list[int]) -> str:
        """The reply so far, for streaming. A MOSS model may first write its inner thoughts,
        commands and tool results; its reply starts at the `<|MOSS|>:` field, so nothing shows
        before that marker (extract_reply would show the other fields until then)."""
        if self.recipe.data.collator == "moss" and \
                MOSS_FIELDS["MOSS"] not in self.tokenizer.decode(ids, skip_special_tokens=False):
            return ""
        return extract_reply(self.recipe, self.tokenizer, ids)

    def reply(self, query: str, write: Optional[Callable[[str], None]] = None) -> str:
        """Generate the answer to `query`, add the round to the history and return the reply.
        With `write`, the reply is streamed through it as it is generated (and completed)."""
        import torch

        prompt = self.build_prompt(query)
        streamer = ReplyStreamer(self.partial_reply, write) if write is not None else None
        input_ids = torch.tensor([prompt], device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self.generation_config,
                streamer=streamer,
            )
        # The round keeps what a MOSS model generated around its answer (inner thoughts, commands),
        # so the next prompt shows the model its own turn as training rendered such turns.
        round_ = history_round(self.recipe, self.tokenizer, query, out[0, len(prompt):].tolist())
        if streamer is not None:
            streamer.finish(round_["assistant"])
        self.history.append(round_)
        return round_["assistant"]


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


def run_chat(source: str, overrides: list[str], message: Optional[str] = None, stream: bool = True) -> int:
    """Chat with the model of `source` (recipe, adapter dir or merged model dir). `overrides`
    are `key=value` recipe overrides (sampling flags arrive as `decoding.*=`). `message`: answer
    this one message and return. Returns the exit code."""
    # Bytes that are not valid in stdin's encoding (a pasted Latin-1 line, say) become U+FFFD
    # instead of ending the session with a UnicodeDecodeError.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    model, tokenizer, recipe = load_chat_model(source, overrides)
    session = ChatSession(model, tokenizer, recipe)
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

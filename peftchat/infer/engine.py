"""One model answering chat requests token by token, several at once in a batch, cancellable.

The server's `ChatEngine` builds each prompt with the recipe's conversation format (`peftchat.formats`,
made once per engine), the code `peftchat chat` uses, so at temperature 0 its reply equals chat's.
`run_batch` generates a batch of jobs (LEFT-padded prompts with an attention mask, as `peftchat
generate` batches) in one `model.generate` under a lock; every new piece of a job's reply text goes
to its `on_text` callback — decoded incrementally by the format's `ReplyStream`, so a token costs a
small decode, never a re-decode of the whole reply. A job whose `cancel` event is set (a client
that went away), that reached its own `max_tokens`, a stop string or its deadline leaves the batch
at the next token; when no job is left the generation ends. Which jobs may share a batch is
`peftchat.infer.batching`'s business. A job with `parse_tools` (a request with tools) never hands
out text from a `<tool_call>` on: the finished reply is parsed (`formats.turns.parse_tool_calls`)
into `tool_calls` and the text around them, so a call never reaches a client as text.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from peftchat.config import Recipe
from peftchat.errors import DataError, UserError
from peftchat.formats.base import ReplyStream
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format
from peftchat.formats.turns import before_tool_call, parse_tool_calls
from peftchat.infer.decoding import context_budget, generation_config, logits_processors


class RequestError(UserError):
    """A request the engine cannot serve as asked (an HTTP 400)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class ChatRequest:
    history: Conversation  # the finished rounds before `query`, with the request's system message and tools
    query: Union[str, list[dict[str, Any]]]  # a user message, or the results of the history's last tool calls
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    parse_tools: bool = False  # read tool calls back from the reply (tools given, tool_choice "auto")


@dataclass
class Job:
    """A prepared request: its prompt, decoding recipe and progress."""

    prompt: list[int]
    recipe: Recipe
    stop: list[str]
    seed: Optional[int]
    stream: ReplyStream  # the reply text as the generated ids arrive
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the reply so far, cut at a stop string
    shown: int = 0  # characters of `text` handed out
    searched: int = 0  # `text` before this index holds no stop string
    finish_reason: Optional[str] = None
    on_text: Callable[[str], None] = lambda text: None  # called in the generating thread
    on_done: Callable[[], None] = lambda: None  # called once, when the job is finished
    group: int = 0  # jobs of one request (n > 1) share it: a seeded sampled request batches only with itself
    deadline: float = float("inf")  # time.monotonic() past which the job stops (finish_reason "length")
    timed_out: bool = False
    failed: bool = False  # the generation raised (the server log has why)
    closed: bool = False  # left the batch: no more tokens are taken for it
    started_at: Optional[float] = None  # time.monotonic() when its batch began
    first_token_at: Optional[float] = None
    parse_tools: bool = False  # hold back text from a `<tool_call>` on, parse the calls when finished
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # the finished reply's calls (`formats.turns`)

    @property
    def max_new_tokens(self) -> int:
        return self.recipe.decoding.max_new_tokens

    def fork(self, stream: ReplyStream, group: int) -> Job:
        """A fresh job for the same prompt and settings (another of a request's `n` choices)."""
        return Job(
            prompt=self.prompt,
            recipe=self.recipe,
            stop=self.stop,
            seed=self.seed,
            stream=stream,
            deadline=self.deadline,
            group=group,
            parse_tools=self.parse_tools,
        )


def _cut_at_stop(text: str, stops: list[str], start: int = 0) -> tuple[str, bool]:
    """`text` up to the first stop string found at or after `start`, and whether one was found."""
    cuts = [at for s in stops if s and (at := text.find(s, start)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown while it may still grow into a stop string: hold back the
    longest tail that is a proper prefix of some stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return len(text) - hold


class ChatEngine:
    def __init__(self, model, tokenizer, recipe: Recipe):
        self.model = model
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.format = make_format(recipe.data, tokenizer)
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.context = recipe.decoding.max_context or recipe.data.max_length
        self.finished: list[Job] = []  # the last jobs, newest last (tests and diagnostics)

    def _decoding(self, request: ChatRequest) -> Recipe:
        """The recipe with the request's sampling settings (RequestError when out of range)."""
        recipe = copy.deepcopy(self.recipe)
        d = recipe.decoding
        if request.max_tokens is not None:
            if request.max_tokens < 1:
                raise RequestError("max_tokens must be at least 1", "max_tokens")
            d.max_new_tokens = request.max_tokens
        if d.max_new_tokens >= self.context:
            raise RequestError(
                f"max_tokens {d.max_new_tokens} leaves no room for the prompt in the context of {self.context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        if request.temperature is not None:
            if not 0 <= request.temperature <= 2:
                raise RequestError("temperature must be between 0 and 2", "temperature")
            d.temperature = request.temperature
        if request.top_p is not None:
            if not 0 < request.top_p <= 1:
                raise RequestError("top_p must be in (0, 1]", "top_p")
            d.top_p = request.top_p
        return recipe

    def prepare(self, request: ChatRequest) -> Job:
        """Validate `request` against the model's context and build its prompt (RequestError)."""
        recipe = self._decoding(request)
        budget = context_budget(recipe)  # as `peftchat chat` budgets its prompts
        self._check_tools(request)
        try:
            # a tool-result list (not a str) only reaches ChatTemplateFormat (has_tools)
            prompt = self.format.prompt(request.history, request.query, budget)  # type: ignore[arg-type]
        except DataError as e:  # the chat template refuses the conversation
            raise RequestError(str(e), "messages") from None
        except UserError as e:
            raise RequestError(
                f"this request is over the context budget: {e}", "messages", "context_length_exceeded"
            ) from None
        # Chat leaves out old rounds to fit; an API client sent them to be read.
        if prompt.dropped_rounds > 0:
            raise RequestError(
                f"the messages do not fit the context budget of {budget} prompt tokens "
                f"({self.context} context tokens minus max_tokens {recipe.decoding.max_new_tokens}); send fewer "
                f"or shorter messages or a smaller max_tokens",
                "messages",
                "context_length_exceeded",
            )
        return Job(
            prompt=prompt.ids,
            recipe=recipe,
            stop=[s for s in request.stop if s],
            seed=request.seed,
            stream=self.format.reply_stream(),
            parse_tools=request.parse_tools,
        )

    def _check_tools(self, request: ChatRequest) -> None:
        """A 400 for tools the format or its template cannot render: the model would otherwise
        answer a prompt without them, which is not how it was trained."""
        history = request.history
        uses = (
            bool(history.tools)
            or not isinstance(request.query, str)
            or any(m.get("tool_calls") or m["role"] == "tool" for m in history.messages)
        )
        if not uses:
            return
        param = "tools" if history.tools else "messages"
        if not self.format.has_tools:
            raise RequestError(
                f"this model was trained with the {self.format.name} format, which has no place for "
                "tools, tool calls or tool results (only data.collator=chat_template renders them)",
                param,
            )
        try:
            self.format.check_tools(history)  # type: ignore[attr-defined]  # has_tools: ChatTemplateFormat
        except DataError as e:
            raise RequestError(str(e).removeprefix("request: "), param) from None

    def run(self, job: Job, on_text: Callable[[str], None]) -> Job:
        """Generate `job` alone (waiting for the model first); `on_text` gets each new piece of
        reply text, in the generating thread. Returns the job with `finish_reason` set: "stop",
        "length" or "cancelled"."""
        job.on_text = on_text
        self.run_batch([job])
        return job

    def run_batch(self, jobs: list[Job]) -> None:
        """Generate `jobs` together, in one left-padded batch: they must share their sampling
        settings (all but `max_tokens`, stop strings and deadline, which are per job), and a
        seeded sampled job must come alone or with its own forks (the seed is the RNG's for the
        whole batch). Every job ends with `finish_reason` set and its `on_done` called."""
        import torch

        live = []
        for job in jobs:
            if job.cancel.is_set() or time.monotonic() > job.deadline:  # gone or too late while queued
                job.timed_out = not job.cancel.is_set()
                job.finish_reason = "cancelled" if job.cancel.is_set() else "length"
                self._done(job)
            else:
                live.append(job)
        if not live:
            return
        try:
            with self.lock:
                lead = live[0]
                if lead.seed is not None:
                    torch.manual_seed(lead.seed)
                recipe = copy.deepcopy(lead.recipe)
                recipe.decoding.max_new_tokens = max(j.max_new_tokens for j in live)
                config = generation_config(recipe, self.tokenizer, self.format.stop_ids)
                input_ids, attention = pad_left([j.prompt for j in live], config.pad_token_id)
                now = time.monotonic()
                for job in live:
                    job.started_at = now
                with torch.no_grad():
                    self.model.generate(
                        input_ids=input_ids.to(self.device),
                        attention_mask=attention.to(self.device),
                        generation_config=config,
                        streamer=_BatchStreamer(self, live),
                        logits_processor=logits_processors(self.format),
                        stopping_criteria=_rows_done(live),
                    )
            for job in live:
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                else:
                    self._finish(job, job.on_text)
        finally:
            for job in live:
                if job.finish_reason is None:  # an exception ended the batch
                    job.failed, job.finish_reason = True, "error"
                self._done(job)

    def _done(self, job: Job) -> Job:
        job.closed = True
        self.finished = self.finished[-15:] + [job]
        job.on_done()
        return job

    def _take(self, job: Job, token: int) -> None:
        """One new token of `job` (in a batch): hand out its text and close the job when it is
        done (end of reply, stop string, its own max_tokens, cancelled, past its deadline)."""
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        job.generated.append(token)
        self._advance(job, [token], job.on_text)
        if time.monotonic() > job.deadline:
            job.timed_out = True
        if (
            job.finish_reason == "stop"
            or job.stream.stopped
            or len(job.generated) >= job.max_new_tokens
            or job.cancel.is_set()
            or job.timed_out
        ):
            job.closed = True

    def _advance(self, job: Job, new_ids: list[int], on_text: Callable[[str], None]) -> None:
        """Feed the newly generated ids to the job's reply stream, cut the reply at a stop string
        and hand out what is new, holding back a tail that may still become a stop string."""
        if job.finish_reason == "stop":
            return
        piece = job.stream.push(new_ids)
        if job.stream.stopped:
            job.finish_reason = "stop"
        if piece:
            longest = max((len(s) for s in job.stop), default=0)
            start = max(job.searched - longest + 1, 0)  # a stop string may straddle the old end
            job.text, hit_stop_string = _cut_at_stop(job.text + piece, job.stop, start)
            job.searched = len(job.text)
            if hit_stop_string:
                job.finish_reason = "stop"
            visible = len(job.text) if hit_stop_string else _safe_length(job.text, job.stop)
            if job.parse_tools:  # a call is shown as `tool_calls` once the reply is parsed, never as text
                visible = min(visible, before_tool_call(job.text))
            self._show(job, visible, on_text)

    def _finish(self, job: Job, on_text: Callable[[str], None]) -> None:
        """The final reply (the format's parse of all generated ids) cut at a stop string: hand
        out the rest of it."""
        text = self.format.parse_reply(job.generated).text
        text, hit_stop_string = _cut_at_stop(text, job.stop)
        if hit_stop_string or job.stream.stopped:
            job.finish_reason = "stop"
        job.finish_reason = job.finish_reason or "length"
        if job.parse_tools:
            text, job.tool_calls = parse_tool_calls(text)
            if job.tool_calls and job.finish_reason == "stop":
                job.finish_reason = "tool_calls"
        if not text.startswith(job.text[: job.shown]):
            job.text = text  # the parse differs from what was streamed: the whole reply is the final one
            return
        job.text = text
        self._show(job, len(text), on_text)

    @staticmethod
    def _show(job: Job, visible: int, on_text: Callable[[str], None]) -> None:
        if visible > job.shown:
            on_text(job.text[job.shown : visible])
            job.shown = visible


def pad_left(batch: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) of `batch`, LEFT-padded so that every row's new tokens start
    at the same position."""
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    return input_ids, attention


class _BatchStreamer:
    """transformers' streamer protocol: put() gets the prompt first, then each step's new token
    of every row (a finished row's is padding, which a closed job ignores)."""

    def __init__(self, engine: ChatEngine, jobs: list[Job]) -> None:
        self.engine, self.jobs, self.prompt_seen = engine, jobs, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if not job.closed:
                self.engine._take(job, int(token))

    def end(self) -> None:
        pass


def _rows_done(jobs: list[Job]):
    """A stopping criterion per row: a closed or cancelled job leaves the batch at once (its row
    is padded from then on) and the generation ends when none is left."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [j.closed or j.cancel.is_set() for j in jobs]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([RowsDone()])

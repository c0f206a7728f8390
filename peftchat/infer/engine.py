"""One model answering chat requests one at a time, token by token, cancellable.

The server's `ChatEngine` builds each prompt with the recipe's conversation format (`peftchat.formats`,
made once per engine), the code `peftchat chat` uses, so at temperature 0 its reply equals chat's.
Requests queue on a lock (one model, one generation at a time); each runs `model.generate` in its
own thread, hands every new piece of reply text to a callback — decoded incrementally by the
format's `ReplyStream`, so a token costs a small decode, never a re-decode of the whole reply —
and stops at the next token when its `cancel` event is set (a client that went away), so a
disconnected client frees the model within one token.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from peftchat.config import Recipe
from peftchat.errors import UserError
from peftchat.formats.base import ReplyStream
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import context_budget, generation_config, logits_processors


class RequestError(UserError):
    """A request the engine cannot serve as asked (an HTTP 400)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class ChatRequest:
    history: Conversation  # the finished rounds before `query`, with the request's system message
    query: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None


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


def _cut_at_stop(text: str, stops: list[str], start: int = 0) -> tuple[str, bool]:
    """`text` up to the first stop string found at or after `start`, and whether one was found."""
    cuts = [at for s in stops if s and (at := text.find(s, start)) >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


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
            raise RequestError(f"max_tokens {d.max_new_tokens} leaves no room for the prompt in the context "
                               f"of {self.context} tokens", "max_tokens", "context_length_exceeded")
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
        try:
            prompt = self.format.prompt(request.history, request.query, budget)
        except UserError as e:
            raise RequestError(f"this request is over the context budget: {e}", "messages",
                               "context_length_exceeded") from None
        # Chat leaves out old rounds to fit; an API client sent them to be read.
        if prompt.dropped_rounds > 0:
            raise RequestError(
                f"the messages do not fit the context budget of {budget} prompt tokens "
                f"({self.context} context tokens minus max_tokens {recipe.decoding.max_new_tokens}); send fewer "
                f"or shorter messages or a smaller max_tokens", "messages", "context_length_exceeded")
        return Job(prompt=prompt.ids, recipe=recipe, stop=[s for s in request.stop if s], seed=request.seed,
                   stream=self.format.reply_stream())

    def run(self, job: Job, on_text: Callable[[str], None]) -> Job:
        """Generate `job` (waiting for the model first); `on_text` gets each new piece of reply
        text, in the generating thread. Returns the job with `finish_reason` set: "stop",
        "length" or "cancelled"."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        engine = self

        class Streamer:  # transformers calls put() with the prompt first, then each new token
            prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                ids = [int(t) for t in value.reshape(-1).tolist()]
                job.generated.extend(ids)
                engine._advance(job, ids, on_text)

            def end(self) -> None:
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = job.cancel.is_set() or job.finish_reason == "stop"
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        with self.lock:
            if job.cancel.is_set():  # the client left while queued
                job.finish_reason = "cancelled"
                return self._done(job)
            if job.seed is not None:
                torch.manual_seed(job.seed)
            config = generation_config(job.recipe, self.tokenizer, self.format.stop_ids)
            input_ids = torch.tensor([job.prompt], device=self.device)
            with torch.no_grad():
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=config, streamer=Streamer(),
                                    logits_processor=logits_processors(self.format),
                                    stopping_criteria=StoppingCriteriaList([Stop()]))
        if job.cancel.is_set():
            job.finish_reason = "cancelled"
        else:
            self._finish(job, on_text)
        return self._done(job)

    def _done(self, job: Job) -> Job:
        self.finished = self.finished[-15:] + [job]
        return job

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
            self._show(job, visible, on_text)

    def _finish(self, job: Job, on_text: Callable[[str], None]) -> None:
        """The final reply (the format's parse of all generated ids) cut at a stop string: hand
        out the rest of it."""
        text = self.format.parse_reply(job.generated).text
        text, hit_stop_string = _cut_at_stop(text, job.stop)
        if hit_stop_string or job.stream.stopped:
            job.finish_reason = "stop"
        job.finish_reason = job.finish_reason or "length"
        if not text.startswith(job.text[:job.shown]):
            job.text = text  # the parse differs from what was streamed: the whole reply is the final one
            return
        job.text = text
        self._show(job, len(text), on_text)

    @staticmethod
    def _show(job: Job, visible: int, on_text: Callable[[str], None]) -> None:
        if visible > job.shown:
            on_text(job.text[job.shown:visible])
            job.shown = visible

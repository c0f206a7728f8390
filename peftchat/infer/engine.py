"""One model answering chat requests one at a time, token by token, cancellable.

The server's `ChatEngine` builds each prompt with the training prompt code (through `bridge`), so at
temperature 0 its reply equals `peftchat chat`'s. Requests queue on a lock (one model, one
generation at a time); each runs `model.generate` in its own thread, hands every new piece of reply
text to a callback, and stops at the next token when its `cancel` event is set (a client that went
away) — so a disconnected client frees the model within one token.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from peftchat.config import Recipe
from peftchat.errors import UserError
from peftchat.infer import bridge


class RequestError(UserError):
    """A request the engine cannot serve as asked (an HTTP 400)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class ChatRequest:
    history: list[dict]
    query: str
    system: Optional[str] = None
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
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the reply so far, cut at a stop string
    shown: int = 0  # characters of `text` handed out
    finish_reason: Optional[str] = None


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
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
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.context = recipe.decoding.max_context or recipe.data.max_length
        self.stop_token_ids = set(bridge.stop_ids(recipe, tokenizer))
        self.finished: list[Job] = []  # the last jobs, newest last (tests and diagnostics)

    def prepare(self, request: ChatRequest) -> Job:
        """Validate `request` against the model's context and build its prompt (RequestError)."""
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
        try:
            ids = bridge.prompt_ids(recipe, self.tokenizer, request.history, request.query, request.system)
            # The prompt code leaves out old rounds to fit; an API client sent them to be read.
            fits = bridge.prompt_ids(recipe, self.tokenizer, request.history[1:], request.query, request.system) != ids \
                if request.history and bridge.history_used(recipe) else True
        except UserError as e:
            raise RequestError(f"this request is over the context budget: {e}", "messages",
                               "context_length_exceeded") from None
        if not fits:
            raise RequestError(
                f"the messages do not fit the context budget of {self.context - d.max_new_tokens} prompt tokens "
                f"({self.context} context tokens minus max_tokens {d.max_new_tokens}); send fewer or shorter "
                f"messages or a smaller max_tokens", "messages", "context_length_exceeded")
        return Job(prompt=ids, recipe=recipe, stop=[s for s in request.stop if s], seed=request.seed)

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
                job.generated.extend(int(t) for t in value.reshape(-1).tolist())
                engine._advance(job, on_text, final=False)

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
            config = bridge.generation_config(job.recipe, self.tokenizer)
            input_ids = torch.tensor([job.prompt], device=self.device)
            with torch.no_grad():
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=config, streamer=Streamer(),
                                    stopping_criteria=StoppingCriteriaList([Stop()]))
        if job.cancel.is_set():
            job.finish_reason = "cancelled"
        else:
            self._advance(job, on_text, final=True)
        return self._done(job)

    def _done(self, job: Job) -> Job:
        self.finished = self.finished[-15:] + [job]
        return job

    def _advance(self, job: Job, on_text: Callable[[str], None], final: bool) -> None:
        """Recompute the reply from all generated ids, cut it at a stop string, and hand out what
        is new (holding back a tail that may become a stop string, until the end)."""
        if job.finish_reason == "stop" and not final:
            return
        hit_stop_token = any(t in self.stop_token_ids for t in job.generated)
        text = bridge.reply_text(job.recipe, self.tokenizer, job.generated, partial=not final)
        text, hit_stop_string = _cut_at_stop(text, job.stop)
        if hit_stop_string or hit_stop_token:
            job.finish_reason = "stop"
        if text.endswith("\ufffd") and not final:  # a character split across tokens
            return
        if not text.startswith(job.text[:job.shown]):
            if final:  # extraction changed its mind about shown text: the whole reply is the final one
                job.text = text
                job.finish_reason = job.finish_reason or "length"
            return
        job.text = text
        visible = len(text) if (final or hit_stop_string) else _safe_length(text, job.stop)
        if visible > job.shown:
            on_text(text[job.shown:visible])
            job.shown = visible
        if final and job.finish_reason is None:
            job.finish_reason = "length"

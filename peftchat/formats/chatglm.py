"""The `chatglm` format: ChatGLM-6B / ChatGLM2-6B round splitting (spec §1).

One sample per trained round. A chatglm row (query, answer, history) is one sample whose history
is context; a multi-turn session of another format (moss, messages, sharegpt) is split into one
sample per round, round k holding rounds 0..k-1 as history — the rows ChatGLM-6B's README asks
users to write by hand. An assistant message marked ``"train": false`` makes no sample (its round
stays history for the later ones).

System message: ChatGLM's ``[Round]`` prompt has no place for one (ChatGLM-6B's ptuning scripts
put instructions in ``source_prefix``, and `data.source_prefix` is that key here). A session's
system message / meta instruction is therefore not used, and the data report counts it under
"left out"; `peftchat chat --system` is refused for this format.

ChatGLM-6B style (default), S = max_source_length, T = max_target_length, seps = separator tokens
(default ``[gMASK] <sop>``)::

    prompt = prefix + "[Round 0]\\n问：q0\\n答：a0\\n" … + "[Round n]\\n问：q\\n答："
    a = E(prompt)[: S - 1];  b = E(answer)[: T - 2]
    ids = a + seps + b + [eos];  labels = -100 on the first len(a) + 1 positions

ChatGLM2 style: rounds numbered from 1 with blank lines, ``a = seps + E(prompt)[: S - 2]``,
``b = E(answer)[: T]``, ``ids = a + b + [eos]``, labels -100 on all of `a`.

With other than two separator tokens the budgets generalize so that ``len(ids) <= S + T`` (6B style:
the last separator counts toward the target, the others toward the source; the loss starts at the
last separator) and ``len(ids) <= S + T + 1`` (ChatGLM2 style: all separators count toward S).

Loss (`data.loss_on`): ``auto`` / ``all_assistant`` / ``assistant`` (the default: ChatGLM's own) put
loss on each trained round's answer, one sample per round; ``last_assistant`` makes a sample of the
last trained round only (the earlier ones are its history); ``all`` is refused: the prompt is
context by ChatGLM's design.

`data.history_column: null` means no history: the 6B-style prompt is the bare query (ChatGLM-6B's
AdvertiseGen setup); the ChatGLM2 style still writes ``[Round 1]`` as ChatGLM2's own
``tokenizer.build_prompt(query, None)`` does.

Truncation: ``seed`` cuts as above (keeps the head of the prompt, so a long history can push the
question out); ``drop_oldest`` first drops whole oldest history rounds until the prompt fits, so the
current question survives, then cuts what is still too long as ``seed`` does. Chat prompts always
use ``drop_oldest`` (cutting the prompt's tail at inference would cut the question); the model
then generates the answer and eos.
"""

from __future__ import annotations

from typing import Optional

from peftchat.config import DataConfig
from peftchat.errors import ConfigError
from peftchat.formats.base import ChatPrompt, ConversationFormat, fewest_to_drop
from peftchat.formats.conversation import Conversation
from peftchat.formats.samples import IGNORE_INDEX, Encoded, Sample, encode_text, token_id

SYSTEM_LEFT_OUT = "system message (the chatglm prompt has no place for one; see data.source_prefix)"


def default_separators(tokenizer) -> list[str]:
    """[gMASK] <sop> when the tokenizer has both, else its bos token, else none."""
    vocab = tokenizer.get_vocab()
    if "[gMASK]" in vocab and "<sop>" in vocab:
        return ["[gMASK]", "<sop>"]
    if tokenizer.bos_token is not None:
        return [tokenizer.bos_token]
    return []


def prompt_text(cfg: DataConfig, history: list[tuple[str, str]], query: str) -> str:
    """The ChatGLM prompt text (with `source_prefix`) for `query` after `history` rounds."""
    if cfg.chatglm_style == "chatglm2":
        hist = history if cfg.history_column else []
        body = "".join(f"[Round {k + 1}]\n\n问：{q}\n\n答：{a}\n\n" for k, (q, a) in enumerate(hist))
        body += f"[Round {len(hist) + 1}]\n\n问：{query}\n\n答："
    elif cfg.history_column is None:
        body = query
    else:
        body = "".join(f"[Round {k}]\n问：{q}\n答：{a}\n" for k, (q, a) in enumerate(history))
        body += f"[Round {len(history)}]\n问：{query}\n答："
    return cfg.source_prefix + body


class ChatGLMFormat(ConversationFormat):
    name = "chatglm"
    has_system = False
    loss_on_values = ("auto", "all_assistant", "assistant", "last_assistant")
    loss_on_refusal = (
        "a chatglm sample is one round whose prompt (question and history) is context by "
        "ChatGLM's design, so there is no user turn to put loss on"
    )

    def __init__(self, cfg: DataConfig, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the chatglm collator needs a tokenizer with an eos token")
        super().__init__(cfg, tokenizer)
        self.eos = int(tokenizer.eos_token_id)
        names = cfg.separator_tokens if cfg.separator_tokens is not None else default_separators(tokenizer)
        self.seps = [token_id(tokenizer, t, "data.separator_tokens") for t in names]
        m = len(self.seps)
        S, T = cfg.max_source_length, cfg.max_target_length
        if cfg.chatglm_style == "chatglm2":
            self.source_budget, self.target_budget = S - m, T
        else:  # ChatGLM-6B: gMASK in the source (S-1), sop and eos in the target (T-2)
            self.source_budget = S - max(m - 1, 0)
            self.target_budget = T - (2 if m else 1)
        if self.source_budget < 1 or self.target_budget < 1:
            raise ConfigError(
                f"'data.max_source_length' ({S}) / 'data.max_target_length' ({T}) leave no room "
                f"next to {m} separator token(s) and eos"
            )

    @classmethod
    def sample_limit(cls, cfg: DataConfig) -> int:
        return cfg.max_source_length + cfg.max_target_length + (1 if cfg.chatglm_style == "chatglm2" else 0)

    def _stop_ids(self) -> list[int]:
        return self._eos()

    def context_ids(
        self, history: list[tuple[str, str]], query: str, drop_oldest: Optional[bool] = None
    ) -> tuple[list[int], bool, int]:
        """Ids of the context in front of the answer — for the 6B style `a + seps`, for ChatGLM2
        `seps + a` —, whether history rounds or prompt tokens were cut to fit, and how many oldest
        history rounds were left out. `drop_oldest` defaults to `data.truncation == drop_oldest`."""
        if self.cfg.history_column is None:  # no history in the prompt at all
            history = []
        if drop_oldest is None:
            drop_oldest = self.cfg.truncation == "drop_oldest"
        texts: dict[int, list[int]] = {}

        def ids_from(s: int) -> list[int]:
            if s not in texts:
                texts[s] = encode_text(self.tokenizer, prompt_text(self.cfg, history[s:], query))
            return texts[s]

        start = 0
        if drop_oldest:
            found = fewest_to_drop(len(history), lambda s: len(ids_from(s)) <= self.source_budget)
            start = len(history) if found is None else found
        a = ids_from(start)
        truncated = start > 0
        if len(a) > self.source_budget:
            a, truncated = a[: self.source_budget], True
        context = self.seps + a if self.cfg.chatglm_style == "chatglm2" else a + self.seps
        return context, truncated, start

    def encode_round(self, history: list[tuple[str, str]], query: str, answer: str) -> Sample:
        context, truncated, _ = self.context_ids(history, query)
        b = encode_text(self.tokenizer, answer)
        if len(b) > self.target_budget:
            b, truncated = b[: self.target_budget], True
        ids = context + b + [self.eos]
        if self.cfg.chatglm_style == "chatglm2" or not self.seps:
            n_context = len(context)
        else:  # ChatGLM-6B: the loss starts at the last separator (<sop>, the "bos" of the answer)
            n_context = len(context) - 1
        labels = [IGNORE_INDEX] * n_context + ids[n_context:]
        return Sample(ids, labels, truncated)

    def encode(self, conv: Conversation) -> Encoded:
        if conv.dropped:
            return Encoded(dropped=[conv.dropped])
        rounds = conv.rounds()
        assistants = [m for m in conv.messages if m["role"] == "assistant"]
        out = Encoded(left_out=[SYSTEM_LEFT_OUT] if conv.system else [])
        trained = []
        for k in range(conv.context_rounds, len(rounds)):
            query, answer = rounds[k]
            if not query or not answer:
                out.dropped.append("empty query or answer")
                continue
            if assistants[k].get("train", True) is not False:
                trained.append(k)
        if self.cfg.loss_on == "last_assistant":  # the earlier rounds stay in its history only
            trained = trained[-1:]
        out.samples += [self.encode_round(rounds[:k], *rounds[k]) for k in trained]
        return out

    def prompt(self, history: Conversation, query: str, budget: Optional[int] = None) -> ChatPrompt:
        """The training context of `query`'s round; the prompt's own budget is S (`budget` unused)."""
        ids, _, dropped = self.context_ids(history.rounds(), query, drop_oldest=True)
        return ChatPrompt(ids, dropped)

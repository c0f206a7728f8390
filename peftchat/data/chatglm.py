"""The `chatglm` collator: ChatGLM-6B / ChatGLM2-6B round splitting (spec §1).

One sample per trained round. A chatglm row (query, answer, history) is one sample whose history
is context; a multi-turn session of another format (moss, messages, sharegpt) is split into one
sample per round, round k holding rounds 0..k-1 as history — the rows ChatGLM-6B's README asks
users to write by hand. The system message / meta instruction of such sessions is not used (the
`[Round]` prompt has no place for it; `data.source_prefix` is ChatGLM's counterpart).

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

`data.history_column: null` means no history: the 6B-style prompt is the bare query (ChatGLM-6B's
AdvertiseGen setup); the ChatGLM2 style still writes ``[Round 1]`` as ChatGLM2's own
``tokenizer.build_prompt(query, None)`` does.

Truncation: ``seed`` cuts as above (keeps the head of the prompt, so a long history can push the
question out); ``drop_oldest`` first drops whole oldest history rounds until the prompt fits, so the
current question survives, then cuts what is still too long as ``seed`` does.
"""

from __future__ import annotations

from peftchat.config import DataConfig
from peftchat.data.formats import Conversation
from peftchat.data.samples import IGNORE_INDEX, Encoded, Sample, encode_text, token_id
from peftchat.errors import ConfigError


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


class ChatGLMCollator:
    def __init__(self, cfg: DataConfig, tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ConfigError("the chatglm collator needs a tokenizer with an eos token")
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

    def prompt_ids(self, history: list[tuple[str, str]], query: str) -> tuple[list[int], bool]:
        """Ids of the context in front of the answer — for the 6B style `a + seps`, for ChatGLM2
        `seps + a` — and whether history rounds or prompt tokens were cut to fit."""
        truncated = False
        if self.cfg.history_column is None:  # no history in the prompt at all
            history = []
        if self.cfg.truncation == "drop_oldest":
            while history and len(encode_text(self.tokenizer, prompt_text(self.cfg, history, query))) > self.source_budget:
                history = history[1:]
                truncated = True
        a = encode_text(self.tokenizer, prompt_text(self.cfg, history, query))
        if len(a) > self.source_budget:
            a, truncated = a[: self.source_budget], True
        if self.cfg.chatglm_style == "chatglm2":
            return self.seps + a, truncated
        return a + self.seps, truncated

    def encode_round(self, history: list[tuple[str, str]], query: str, answer: str) -> Sample:
        context, truncated = self.prompt_ids(history, query)
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
        out = Encoded()
        for k in range(conv.context_rounds, len(rounds)):
            query, answer = rounds[k]
            if not query or not answer:
                out.dropped.append("empty query or answer")
                continue
            out.samples.append(self.encode_round(rounds[:k], query, answer))
        return out

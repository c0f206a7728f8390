"""The `moss` format: one sequence per session, as MOSS's `finetune_moss.py` SFTDataset (spec §2).

::

    ids = E(meta_instruction)                   # no BOS/EOS anywhere; no loss on it
    for each turn: E(field) for each field, each encoded alone, concatenated
        Tool Responses: no loss on the body, i.e. the tokens after "<|Results|>:" and before the
        trailing "<eor>\\n" (the marker and the end keep their loss)
        a turn that would make len(ids) > data.max_length stops the session there
    labels = ids, -100 on the meta instruction and the tool-response bodies

Everything else carries loss, the Human turns included, as in MOSS: that is ``data.loss_on: auto``
(the default) and ``all``. ``all_assistant`` / ``assistant`` leave the Human fields out too (loss on
the fields the model writes: inner thoughts, commands, the tool-response marker and end, the MOSS
reply); ``last_assistant`` keeps that loss on the last turn still carrying loss after truncation
only, the earlier turns becoming context. The tool-response body is
found from the tokenizer's offset mapping (tokens lying wholly between the marker and `<eor>`),
which reproduces MOSS's `[start + 5, end - 2)` for MOSS's own tokenizer without assuming how many
tokens the marker takes. A token straddling the marker boundary keeps its loss. A turn whose
assistant message is marked ``"train": false`` keeps its Human field's loss; the fields the model
wrote (inner thoughts, commands, tool responses, MOSS) get none.

Sessions of other formats (messages, sharegpt, chatglm rows) are rendered into MOSS markup, two
fields a turn: ``<|Human|>: q<eoh>\\n`` and ``<|MOSS|>: a<eom>\\n``; their meta instruction is the
system message, else `data.meta_instruction`, else empty. The history rounds of a chatglm row are
context: no loss. Tool messages have no MOSS rendering here (DataError; use chat_template).

Truncation: ``seed`` keeps the turns that fit from the start and drops the first one that does
not and all after it (counted as truncated; a session whose first turn does not fit yields no
sample and is counted as dropped). ``drop_oldest`` keeps the longest run of *last* turns that fits,
so the final question and answer survive.

Chat (moss_cli_demo): meta instruction + each past turn (Human, raw fields, MOSS; each field
encoded alone) + ``<|Human|>: {query}<eoh>\\n``. Unlike moss_cli_demo (which appends ``<eoh>``
without the newline) the newline is kept, as in training. The model then writes the rest of the
turn as it was trained — for MOSS records ``<|Inner Thoughts|>: …<eot>\\n<|Commands|>: …<eoc>\\n
<|Results|>: …<eor>\\n<|MOSS|>: …<eom>``, for sessions rendered from other formats just
``<|MOSS|>: …<eom>`` — and stops at ``<eom>``. The reply is the text of the MOSS field; the other
fields it wrote are kept in the history (`Reply.fields`) so the next prompt shows its turn as
training rendered such turns. Oldest turns are left out, in one pass over per-turn token counts,
to fit the budget.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from peftchat.formats.base import ChatPrompt, ConversationFormat, Reply, ReplyStream, SessionFormat, too_long
from peftchat.formats.conversation import Conversation
from peftchat.formats.samples import IGNORE_INDEX, Encoded, Sample, encode_text, has_loss, token_id

Span = tuple[int, int]
# MOSS turn fields in the order MOSS writes them, with the marker each value must start with.
MOSS_FIELDS: dict[str, str] = {
    "Human": "<|Human|>:",
    "Inner Thoughts": "<|Inner Thoughts|>:",
    "Commands": "<|Commands|>:",
    "Tool Responses": "<|Results|>:",
    "MOSS": "<|MOSS|>:",
}
MOSS_ENDS = {"Human": "<eoh>", "MOSS": "<eom>"}
RAW_FIELDS = ("Inner Thoughts", "Commands", "Tool Responses")  # what the model writes before its reply
RESULTS_MARKER = MOSS_FIELDS["Tool Responses"]  # "<|Results|>:"
RESULTS_END = "<eor>"
MOSS_STOP = MOSS_ENDS["MOSS"]


def human_field(query: str) -> str:
    return f"<|Human|>: {query}<eoh>\n"


def moss_field(answer: str) -> str:
    return f"<|MOSS|>: {answer}<eom>\n"


def strip_markup(value: str, marker: str, end: str) -> str:
    """The text inside a MOSS field: after `marker` (and one space), before `end` (and newline)."""
    text = value[len(marker) :]
    if text.startswith(" "):
        text = text[1:]
    text = text.rstrip("\n")
    if text.endswith(end):
        text = text[: -len(end)]
    return text


def split_fields(text: str) -> dict[str, str]:
    """Split generated MOSS text into its fields: {field name: raw value with markup}."""
    markers = sorted(((text.find(m), name) for name, m in MOSS_FIELDS.items() if m in text), key=lambda x: x[0])
    out: dict[str, str] = {}
    for k, (pos, name) in enumerate(markers):
        end = markers[k + 1][0] if k + 1 < len(markers) else len(text)
        out[name] = text[pos:end]
    return out


class MossFormat(SessionFormat):
    name = "moss"
    loss_on_values = ("auto", "all", "all_assistant", "assistant", "last_assistant")

    def _stop_ids(self) -> list[int]:
        return [token_id(self.tokenizer, MOSS_STOP, "moss stop token")] + self._eos()

    def forced_continuations(self) -> list[tuple[list[int], list[int]]]:
        """After the model opens its Tool Responses field, the system writes the body: in MOSS a
        plugin's output, and "None" when no plugin ran — always the case in peftchat, which runs
        no tools. Training masks that body (spec §2), so the model never learned to write it:
        left to itself it wanders off there (seen on the CPU demo: the answer started inside the
        Results field and mixed two training answers)."""
        trigger = encode_text(self.tokenizer, RESULTS_MARKER)
        full = encode_text(self.tokenizer, f"{RESULTS_MARKER} None<eor>\n")
        if full[: len(trigger)] != trigger or len(full) == len(trigger):
            return []  # a tokenizer that merges the marker with what follows: nothing safe to force
        return [(trigger, full[len(trigger) :])]

    # --- rendering -------------------------------------------------------------------------
    def meta_instruction(self, conv: Conversation) -> str:
        return conv.system if conv.system is not None else (self.cfg.meta_instruction or "")

    @staticmethod
    def turn_fields(conv: Conversation) -> list[list[tuple[str, str]]]:
        """Each turn's (field, raw value) pairs: verbatim for MOSS records, rendered otherwise."""
        if conv.moss_turns is not None:
            return conv.moss_turns
        return [[("Human", human_field(q)), ("MOSS", moss_field(a))] for q, a in conv.rounds()]

    # --- encoding --------------------------------------------------------------------------
    def _tool_body(self, value: str, ids: list[int]) -> Span:
        """Token span [lo, hi) of a tool response's body, relative to the field's own ids."""
        start = value.find(RESULTS_MARKER) + len(RESULTS_MARKER)
        end = value.rfind(RESULTS_END)
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(value, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            inside = [k for k, (s, e) in enumerate(offsets) if s >= start and e <= end and e > s]
            return (inside[0], inside[-1] + 1) if inside else (0, 0)
        # A slow tokenizer has no offsets: count the tokens of the text around the body.
        lo = len(encode_text(self.tokenizer, value[:start]))
        hi = len(ids) - len(encode_text(self.tokenizer, value[end:]))
        return (lo, hi) if hi > lo else (0, 0)

    def encode_turn(
        self, fields: list[tuple[str, str]], context: bool = False, trained: bool = True, human_loss: bool = True
    ) -> tuple[list[int], list[Span]]:
        """Ids of one turn (each field encoded alone) and its no-loss spans, relative to the turn.
        `context`: no loss at all; `trained=False`: no loss on the fields the model wrote;
        `human_loss=False`: none on the Human field (data.loss_on other than auto / all)."""
        ids: list[int] = []
        no_loss: list[Span] = []
        for name, value in fields:
            field_ids = encode_text(self.tokenizer, value)
            if (name == "Human" and not human_loss) or (not trained and name != "Human"):
                no_loss.append((len(ids), len(ids) + len(field_ids)))
            elif name == "Tool Responses":
                lo, hi = self._tool_body(value, field_ids)
                if hi > lo:
                    no_loss.append((len(ids) + lo, len(ids) + hi))
            ids += field_ids
        if context:
            no_loss = [(0, len(ids))]
        return ids, no_loss

    def _trained_turns(self, conv: Conversation) -> list[bool]:
        return [m.get("train", True) is not False for m in conv.messages if m["role"] == "assistant"]

    def _encode(self, conv: Conversation) -> Encoded:
        if conv.dropped:
            return Encoded(dropped=[conv.dropped])
        meta_ids = encode_text(self.tokenizer, self.meta_instruction(conv))
        fields = self.turn_fields(conv)
        trained = self._trained_turns(conv)
        human_loss = self.cfg.loss_on in ("auto", "all")
        turns = [
            self.encode_turn(
                f,
                context=k < conv.context_rounds,
                trained=trained[k] if k < len(trained) else True,
                human_loss=human_loss,
            )
            for k, f in enumerate(fields)
        ]
        limit = self.cfg.max_length
        if self.cfg.truncation == "drop_oldest":
            first, total = len(turns), len(meta_ids)
            while first > 0 and total + len(turns[first - 1][0]) <= limit:
                first -= 1
                total += len(turns[first][0])
            kept = turns[first:]
        else:  # seed: MOSS stops at the first turn that does not fit
            kept, total = [], len(meta_ids)
            for turn_ids, spans in turns:
                if total + len(turn_ids) > limit:
                    break
                kept.append((turn_ids, spans))
                total += len(turn_ids)
        if not kept:
            return Encoded(dropped=["no turn fits in data.max_length"])
        if self.cfg.loss_on == "last_assistant":
            kept = _last_trained_only(kept)
        ids = list(meta_ids)
        no_loss: list[Span] = [(0, len(meta_ids))]
        for turn_ids, spans in kept:
            no_loss += [(len(ids) + lo, len(ids) + hi) for lo, hi in spans]
            ids += turn_ids
        labels = list(ids)
        for lo, hi in no_loss:
            labels[lo:hi] = [IGNORE_INDEX] * (hi - lo)
        if not has_loss(labels):
            return Encoded(dropped=["no loss tokens"])
        return Encoded(samples=[Sample(ids, labels, truncated=len(kept) < len(turns))])

    # --- chat ------------------------------------------------------------------------------
    def prompt(self, history: Conversation, query: str, budget: Optional[int] = None) -> ChatPrompt:
        budget = self.cfg.max_length if budget is None else budget
        meta = encode_text(self.tokenizer, self.meta_instruction(history))
        turns = [self.encode_turn(f)[0] for f in self.turn_fields(history)]
        asked = encode_text(self.tokenizer, human_field(query))
        total = len(meta) + sum(map(len, turns)) + len(asked)
        dropped = 0
        while dropped < len(turns) and total > budget:  # one pass over per-turn counts
            total -= len(turns[dropped])
            dropped += 1
        if total > budget:
            raise too_long(total, budget)
        return ChatPrompt(meta + [t for turn in turns[dropped:] for t in turn] + asked, dropped)

    def parse_reply(self, generated_ids) -> Reply:
        text = self.tokenizer.decode(self.cut_at_stop(generated_ids), skip_special_tokens=False)
        fields = split_fields(text)
        raw = {k: v if v.endswith("\n") else v + "\n" for k, v in fields.items() if k in RAW_FIELDS}
        if "MOSS" in fields:
            reply = strip_markup(fields["MOSS"], MOSS_FIELDS["MOSS"], MOSS_STOP)
            reply = self.tokenizer.decode(encode_text(self.tokenizer, reply), skip_special_tokens=True).strip()
        else:
            reply = self.tokenizer.decode(self.cut_at_stop(generated_ids), skip_special_tokens=True).strip()
        return Reply(reply, raw)

    def add_round(self, history: Conversation, query: str, reply: Reply) -> Conversation:
        """The history plus this turn; the fields the model wrote around its answer are kept."""
        turn = [
            ("Human", human_field(query)),
            *((n, reply.fields[n]) for n in RAW_FIELDS if n in reply.fields),
            ("MOSS", moss_field(reply.text)),
        ]
        if history.moss_turns is None and reply.fields:  # from now on the turns are kept verbatim
            history = dataclasses.replace(history, moss_turns=self.turn_fields(history))
        return history.with_round(query, reply.text, turn)

    def reply_stream(self) -> ReplyStream:
        return MossReplyStream(self)


def _last_trained_only(turns: list[tuple[list[int], list[Span]]]) -> list[tuple[list[int], list[Span]]]:
    """data.loss_on: last_assistant — of the turns kept after truncation, only the last one that
    still carries loss keeps it; the earlier ones become context (the whole turn without loss)."""

    def has_loss_left(turn_ids: list[int], spans: list[Span]) -> bool:
        masked = sum(hi - lo for lo, hi in spans)  # spans of one turn never overlap
        return masked < len(turn_ids)

    last = max((k for k, (ids, spans) in enumerate(turns) if has_loss_left(ids, spans)), default=None)
    return [(ids, spans if k == last else [(0, len(ids))]) for k, (ids, spans) in enumerate(turns)]


class MossReplyStream(ReplyStream):
    """The reply is the MOSS field: nothing shows before `<|MOSS|>:` (the model may first write
    its inner thoughts, commands and tool results), and the `<eom>` end is not shown."""

    skip_special_tokens = False  # the field markers are special tokens

    def __init__(self, fmt: ConversationFormat) -> None:
        super().__init__(fmt)
        self._start: Optional[int] = None
        self._end: Optional[int] = None
        self._searched = 0  # `text` before this index holds neither marker (searches resume here)

    def _find(self, what: str) -> int:
        at = self.text.find(what, max(self._searched - len(what), 0))
        self._searched = len(self.text)
        return at

    def window(self) -> tuple[Optional[int], Optional[int]]:
        if self._start is None:
            at = self._find(MOSS_FIELDS["MOSS"])
            if at < 0:
                return None, None
            self._start = self._searched = at + len(MOSS_FIELDS["MOSS"])
        if self._end is None:
            at = self._find(MOSS_STOP)
            self._end = at if at >= 0 else None
        return self._start, self._end

"""The `moss` collator: one sequence per session, as MOSS's `finetune_moss.py` SFTDataset (spec §2).

::

    ids = E(meta_instruction)                   # no BOS/EOS anywhere; no loss on it
    for each turn: E(field) for each field, each encoded alone, concatenated
        Tool Responses: no loss on the body, i.e. the tokens after "<|Results|>:" and before the
        trailing "<eor>\\n" (the marker and the end keep their loss)
        a turn that would make len(ids) > data.max_length stops the session there
    labels = ids, -100 on the meta instruction and the tool-response bodies

Everything else carries loss, the Human turns included, as in MOSS. The tool-response body is
found from the tokenizer's offset mapping (tokens lying wholly between the marker and `<eor>`),
which reproduces MOSS's `[start + 5, end - 2)` for MOSS's own tokenizer without assuming how many
tokens the marker takes. A token straddling the marker boundary keeps its loss.

Sessions of other formats (messages, sharegpt, chatglm rows) are rendered into MOSS markup, two
fields a turn: ``<|Human|>: q<eoh>\\n`` and ``<|MOSS|>: a<eom>\\n``; their meta instruction is the
system message, else `data.meta_instruction`, else empty. The history rounds of a chatglm row are
context: no loss. Tool messages have no MOSS rendering here (DataError; use chat_template).

Truncation: ``seed`` keeps the turns that fit from the start and drops the first one that does
not and all after it (counted as truncated; a session whose first turn does not fit yields no
sample and is counted as dropped). ``drop_oldest`` keeps the longest run of *last* turns that fits,
so the final question and answer survive.
"""

from __future__ import annotations

from peftchat.config import DataConfig
from peftchat.data.formats import MOSS_FIELDS, Conversation
from peftchat.data.samples import IGNORE_INDEX, Encoded, Sample, encode_text, has_loss

Span = tuple[int, int]
RESULTS_MARKER = MOSS_FIELDS["Tool Responses"]  # "<|Results|>:"
RESULTS_END = "<eor>"


def human_field(query: str) -> str:
    return f"<|Human|>: {query}<eoh>\n"


def moss_field(answer: str) -> str:
    return f"<|MOSS|>: {answer}<eom>\n"


class MossCollator:
    def __init__(self, cfg: DataConfig, tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

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

    def encode_turn(self, fields: list[tuple[str, str]], context: bool = False) -> tuple[list[int], list[Span]]:
        """Ids of one turn (each field encoded alone) and its no-loss spans, relative to the turn."""
        ids: list[int] = []
        no_loss: list[Span] = []
        for name, value in fields:
            field_ids = encode_text(self.tokenizer, value)
            if name == "Tool Responses":
                lo, hi = self._tool_body(value, field_ids)
                if hi > lo:
                    no_loss.append((len(ids) + lo, len(ids) + hi))
            ids += field_ids
        if context:
            no_loss = [(0, len(ids))]
        return ids, no_loss

    def encode(self, conv: Conversation) -> Encoded:
        if conv.dropped:
            return Encoded(dropped=[conv.dropped])
        meta_ids = encode_text(self.tokenizer, self.meta_instruction(conv))
        turns = [
            self.encode_turn(fields, context=k < conv.context_rounds)
            for k, fields in enumerate(self.turn_fields(conv))
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

    def prompt_ids(self, meta: str, history: list[list[tuple[str, str]]], query: str) -> list[int]:
        """Meta instruction + past turns (each field encoded alone, as trained) + the Human field."""
        ids = encode_text(self.tokenizer, meta)
        for fields in history:
            ids += self.encode_turn(fields)[0]
        return ids + encode_text(self.tokenizer, human_field(query))

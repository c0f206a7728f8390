"""The moss collator against spec §2 and check cases 5-7, 10 (shipped demo tokenizer)."""

from data_helpers import META, E, conv, labelled, messages_record, moss_record, moss_turn, recipe, tok

from peftchat.formats.moss import MossFormat as MossCollator

FIELDS = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")


def collator(**data):
    return MossCollator(recipe(**data).data, tok())


def turn_ids(turn: dict) -> list[int]:
    return [t for f in FIELDS for t in E(turn[f])]  # each field encoded alone


def test_case5_one_plain_turn():
    turn = moss_turn("hello there", "hi, how can I help?")
    (s,) = collator().encode(conv(moss_record([turn]), "moss")).samples
    meta = E(META)
    assert s.input_ids == meta + turn_ids(turn)  # no BOS, no EOS
    assert s.labels[: len(meta)] == [-100] * len(meta)
    body = E("<|Results|>: None<eor>\n")  # the "None" tool body is masked even in a plain turn
    start = len(meta) + len(E(turn["Human"]) + E(turn["Inner Thoughts"]) + E(turn["Commands"]))
    masked = {start + 2}  # <|Results|> ':' [' None'] <eor> '\n'
    assert [tok().decode([t]) for t in body] == ["<|Results|>", ":", " None", "<eor>", "\n"]
    for i in range(len(meta), len(s.input_ids)):
        assert s.labels[i] == (-100 if i in masked else s.input_ids[i])


def test_case6_tool_turn_masks_only_meta_and_tool_bodies():
    t1 = moss_turn("what is 2+3?", "It is 5.", tool='Calculator("2+3") => 5')
    t2 = moss_turn("search cats", "Cats are cute.", tool='Search("cats") => {"top": "cats are mammals"}')
    (s,) = collator().encode(conv(moss_record([t1, t2]), "moss")).samples
    meta = E(META)
    expected_masked = set(range(len(meta)))
    pos = len(meta)
    for t in (t1, t2):
        for f in FIELDS:
            ids = E(t[f])
            if f == "Tool Responses":
                pieces = [tok().decode([i]) for i in ids]
                assert pieces[:2] == ["<|Results|>", ":"] and pieces[-2:] == ["<eor>", "\n"]
                expected_masked |= set(range(pos + 2, pos + len(ids) - 2))  # MOSS's [start+5, end-2)
                assert tok().decode(ids[2:-2]) == t[f][len("<|Results|>:") : -len("<eor>\n")]
            pos += len(ids)
    assert pos == len(s.input_ids)
    masked = {i for i, x in enumerate(s.labels) if x == -100}
    assert masked == expected_masked
    assert all(s.labels[i] == s.input_ids[i] for i in range(len(s.labels)) if i not in masked)


def test_case7_overflow_stops_the_session():
    t1, t2 = moss_turn("first question", "first answer"), moss_turn("second question", "second answer")
    record = moss_record([t1, t2])
    n1, n2 = len(E(META)) + len(turn_ids(t1)), len(E(META)) + len(turn_ids(t1)) + len(turn_ids(t2))
    for limit in (n1, n2 - 1):
        enc = collator(max_length=limit).encode(conv(record, "moss"))
        (s,) = enc.samples
        assert s.input_ids == E(META) + turn_ids(t1) and s.truncated
    (s,) = collator(max_length=n2).encode(conv(record, "moss")).samples
    assert len(s.input_ids) == n2 and not s.truncated
    enc = collator(max_length=n1 - 1).encode(conv(record, "moss"))
    assert enc.samples == [] and enc.dropped == ["no turn fits in data.max_length"]


def test_drop_oldest_keeps_last_turns():
    turns = [moss_turn(f"question {k}", f"answer {k}") for k in range(3)]
    meta = len(E(META))
    limit = meta + len(turn_ids(turns[1])) + len(turn_ids(turns[2]))
    (s,) = collator(max_length=limit, truncation="drop_oldest").encode(conv(moss_record(turns), "moss")).samples
    assert s.input_ids == E(META) + turn_ids(turns[1]) + turn_ids(turns[2]) and s.truncated
    enc = collator(max_length=meta + 3, truncation="drop_oldest").encode(conv(moss_record(turns), "moss"))
    assert enc.samples == [] and enc.dropped


def test_other_formats_render_into_moss_markup():
    record = messages_record([("q1", "a1"), ("q2", "a2")], system="Be brief.")
    (s,) = collator().encode(conv(record, "messages")).samples
    expected = E("Be brief.")
    for q, a in (("q1", "a1"), ("q2", "a2")):
        expected += E(f"<|Human|>: {q}<eoh>\n") + E(f"<|MOSS|>: {a}<eom>\n")
    assert s.input_ids == expected
    assert s.labels[: len(E("Be brief."))] == [-100] * len(E("Be brief."))
    assert labelled(s) == expected[len(E("Be brief.")) :]
    # no system message: data.meta_instruction
    (s,) = collator(meta_instruction="META ").encode(conv(messages_record([("q", "a")]), "messages")).samples
    assert s.input_ids[: len(E("META "))] == E("META ")


def test_chatglm_row_history_is_context_without_loss():
    row = {"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]}
    (s,) = collator().encode(conv(row, "chatglm")).samples
    ctx = E("<|Human|>: q1<eoh>\n") + E("<|MOSS|>: a1<eom>\n")
    trained = E("<|Human|>: q2<eoh>\n") + E("<|MOSS|>: a2<eom>\n")
    assert s.input_ids == ctx + trained
    assert s.labels == [-100] * len(ctx) + trained


def test_case10_lengths_and_labelled_text():
    turn = moss_turn("q", "a", tool="body")
    for limit in (2048, len(E(META)) + len(turn_ids(turn))):
        (s,) = collator(max_length=limit).encode(conv(moss_record([turn, turn]), "moss")).samples
        assert len(s.input_ids) == len(s.labels) <= limit
        text = "".join(turn[f] for f in FIELDS).replace("<|Results|>: body<eor>", "<|Results|>:<eor>")
        assert tok().decode(labelled(s)) == text * (len(s.input_ids) // len(turn_ids(turn)))

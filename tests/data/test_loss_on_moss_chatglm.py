"""`data.loss_on` for the moss and chatglm collators (issue 32), token-exact on the shipped demo
tokenizer; the labelled pieces were checked by hand against the rule each value states."""

from pathlib import Path

import pytest
from data_helpers import (
    META,
    TOKENIZER_DIR,
    E,
    conv,
    labelled,
    messages_record,
    moss_record,
    moss_turn,
    recipe,
    tid,
    tok,
)

from peftchat.cli import main
from peftchat.errors import ConfigError
from peftchat.formats.chatglm import ChatGLMFormat
from peftchat.formats.moss import MossFormat
from peftchat.formats.registry import make_format, sample_limit

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FIELDS = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")


def pieces(sample) -> list[str]:
    return [tok().decode([t]) for t in labelled(sample)]


def moss(loss_on, record, **data):
    return MossFormat(recipe(loss_on=loss_on, **data).data, tok()).encode(conv(record, "moss")).samples


def test_moss_default_is_moss_own_training_and_equals_all():
    t1, t2 = moss_turn("q one", "a one"), moss_turn("q two", "a two")
    (auto,) = moss("auto", moss_record([t1, t2]))
    (every,) = moss("all", moss_record([t1, t2]))
    assert auto == every
    # the Human field carries loss; of the tool response only the body (" None") is masked
    assert pieces(auto)[:27] == [
        "<|Human|>",
        ":",
        " ",
        "q",
        " one",
        "<eoh>",
        "\n",
        "<|Inner Thoughts|>",
        ":",
        " None",
        "<eot>",
        "\n",
        "<|Commands|>",
        ":",
        " None",
        "<eoc>",
        "\n",
        "<|Results|>",
        ":",
        "<eor>",
        "\n",
        "<|MOSS|>",
        ":",
        " a",
        " one",
        "<eom>",
        "\n",
    ]


def test_moss_assistant_trains_the_fields_the_model_writes_in_every_turn():
    t1, t2 = moss_turn("q one", "a one"), moss_turn("q two", "a two")
    for value in ("assistant", "all_assistant"):
        (s,) = moss(value, moss_record([t1, t2]))
        assert s.input_ids == E(META) + [x for turn in (t1, t2) for f in FIELDS for x in E(turn[f])]
        one_turn = [
            "<|Inner Thoughts|>",
            ":",
            " None",
            "<eot>",
            "\n",
            "<|Commands|>",
            ":",
            " None",
            "<eoc>",
            "\n",
            "<|Results|>",
            ":",
            "<eor>",
            "\n",
            "<|MOSS|>",
            ":",
            " a",
            " one",
            "<eom>",
            "\n",
        ]
        assert pieces(s) == one_turn + [" two" if p == " one" else p for p in one_turn]
        assert "<|Human|>" not in pieces(s)


def test_moss_last_assistant_trains_the_last_kept_turn_only():
    turns = [moss_turn(f"q{k}", f"a{k}") for k in range(3)]
    (s,) = moss("last_assistant", moss_record(turns))
    assert s.input_ids == E(META) + [t for turn in turns for f in FIELDS for t in E(turn[f])]
    body = E("<|Results|>: None<eor>\n")
    expected = E(turns[2]["Inner Thoughts"]) + E(turns[2]["Commands"]) + body[:2] + body[3:] + E(turns[2]["MOSS"])
    assert labelled(s) == expected
    # seed truncation keeps turns 0-1: the last kept one is trained
    limit = len(E(META)) + sum(len(E(turns[k][f])) for k in range(2) for f in FIELDS)
    (cut,) = moss("last_assistant", moss_record(turns), max_length=limit)
    assert cut.truncated and tok().decode(labelled(cut)).endswith("<|MOSS|>: a1<eom>\n")
    assert "a0" not in tok().decode(labelled(cut))


def test_moss_untrained_turn_under_assistant_has_no_loss():
    record = messages_record([("q1", "a1"), ("q2", "a2")])
    record["messages"][-1]["train"] = False
    (s,) = MossFormat(recipe(loss_on="assistant").data, tok()).encode(conv(record, "messages")).samples
    assert labelled(s) == E("<|MOSS|>: a1<eom>\n")
    (last,) = MossFormat(recipe(loss_on="last_assistant").data, tok()).encode(conv(record, "messages")).samples
    assert labelled(last) == E("<|MOSS|>: a1<eom>\n")  # the last turn still carrying loss


def test_chatglm_last_assistant_makes_one_sample_of_the_last_round():
    pairs = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    cfg = recipe(collator="chatglm", loss_on="last_assistant").data
    (s,) = ChatGLMFormat(cfg, tok()).encode(conv(messages_record(pairs), "messages")).samples
    prompt = "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：a2\n[Round 2]\n问：q3\n答："
    assert s.input_ids == E(prompt) + [tid("[gMASK]"), tid("<sop>")] + E("a3") + [tok().eos_token_id]
    assert labelled(s) == [tid("<sop>")] + E("a3") + [tok().eos_token_id]
    for value in ("auto", "assistant", "all_assistant"):
        cfg = recipe(collator="chatglm", loss_on=value).data
        assert len(ChatGLMFormat(cfg, tok()).encode(conv(messages_record(pairs), "messages")).samples) == 3


@pytest.mark.parametrize("collator", ["chatglm", "chat_template"])
def test_loss_on_all_is_refused_where_it_cannot_apply(collator):
    cfg = recipe(collator=collator, loss_on="all").data
    with pytest.raises(ConfigError, match=f"'data.loss_on' is 'all', which the {collator} collator cannot apply"):
        sample_limit(cfg)  # before any tokenizer or model
    with pytest.raises(ConfigError):
        make_format(cfg, tok())


def test_inspect_shows_assistant_only_loss_and_the_cli_refuses_all(tmp_path, capsys):
    base = [str(RECIPES / "demo.yaml"), f"model.tokenizer={TOKENIZER_DIR}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(["data", "inspect", *base, "data.loss_on=assistant", "--index", "0"]) == 0
    shown = capsys.readouterr().out
    assert "\n⟦<|Inner Thoughts|>:" in shown and "<|MOSS|>: 好的" in shown
    assert "⟦<|Human|>:" not in shown and "⟧<|Human|>: 要放糖吗？<eoh>\n⟦" in shown
    assert main(["data", "inspect", *base, "--index", "0"]) == 0
    assert "⟦<|Human|>: 番茄炒蛋怎么做？<eoh>" in capsys.readouterr().out  # the seed-exact default
    glm = [str(RECIPES / "demo_chatglm.yaml"), f"model.tokenizer={TOKENIZER_DIR}", f"data.cache_dir={tmp_path / 'g'}"]
    assert main(["data", "inspect", *glm, "data.loss_on=all"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("peftchat: error: 'data.loss_on' is 'all', which the chatglm collator") and err.count("\n") == 1
    )

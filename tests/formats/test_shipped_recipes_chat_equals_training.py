"""For every shipped recipe (on the demo data): the chat prompt for each training conversation's
prefix — its first k rounds as history, round k's question as the new turn — equals, token for
token, what training put in front of round k's answer."""

import json
from pathlib import Path

import pytest
from data_helpers import TOKENIZER_DIR, tok

from peftchat.config import load_recipe
from peftchat.data.readers import normalize
from peftchat.demo_assets import asset_path
from peftchat.formats.conversation import Conversation
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import context_budget

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = [
    ("demo.yaml", None),
    ("demo_qlora.yaml", None),
    ("demo_chatglm.yaml", None),
    ("demo_chat_template.yaml", None),
    ("chatglm_round_split_lora.yaml", "demo/chatglm_demo.jsonl"),
    ("llama3_8b_qlora_moss.yaml", "demo/moss_demo.jsonl"),
]
# Preference recipes train on pairs, not conversations: tests/data/test_preference_data.py checks
# that a pair's prompt equals the chat prompt, token for token, in every format.
PAIR_RECIPES = ["demo_dpo.yaml"]


def test_every_shipped_recipe_is_covered():
    shipped = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert shipped == sorted([name for name, _ in SHIPPED] + PAIR_RECIPES)


def prefix(conv: Conversation, k: int) -> Conversation:
    """The conversation's system message and first k rounds."""
    head = 1 if conv.system is not None else 0
    turns = conv.moss_turns[:k] if conv.moss_turns is not None else None
    return Conversation(conv.messages[: head + 2 * k], moss_turns=turns)


def loss_runs(labels):
    return [i for i, x in enumerate(labels) if x != -100 and (i == 0 or labels[i - 1] == -100)]


@pytest.mark.parametrize("name,data", SHIPPED)
def test_chat_prompt_of_each_training_prefix_is_the_training_prefix(name, data):
    overrides = [f"model.tokenizer={TOKENIZER_DIR}"] + ([f"data.train={asset_path(data)}"] if data else [])
    recipe = load_recipe(RECIPES / name, overrides)
    fmt = make_format(recipe.data, tok())
    lines = Path(recipe.data.train).read_text(encoding="utf-8").splitlines()
    checked = 0
    for i, line in enumerate(lines):
        conv = normalize(json.loads(line), recipe.data.format, recipe.data, f"{name}:{i + 1}")
        encoded = fmt.encode(conv)
        rounds = conv.rounds()
        for k in range(conv.context_rounds, len(rounds)):
            prompt = fmt.prompt(prefix(conv, k), rounds[k][0], context_budget(recipe))
            assert prompt.dropped_rounds == 0
            if recipe.data.collator == "chatglm":  # one sample per round: prompt + answer + eos
                sample = encoded.samples[k - conv.context_rounds]
                answer = tok().encode(rounds[k][1], add_special_tokens=False)
                assert sample.input_ids == prompt.ids + answer + [tok().eos_token_id]
            elif recipe.data.collator == "chat_template":  # the prompt ends where answer k's loss starts
                (sample,) = encoded.samples
                assert prompt.ids == sample.input_ids[: loss_runs(sample.labels)[k]]
            else:  # moss: meta + turns 0..k-1 + Human field of turn k, each field encoded alone
                (sample,) = encoded.samples
                fields = fmt.turn_fields(conv)
                n = len(fmt.tokenizer.encode(fmt.meta_instruction(conv), add_special_tokens=False))
                n += sum(len(fmt.encode_turn(f)[0]) for f in fields[:k]) + len(fmt.encode_turn(fields[k][:1])[0])
                assert fields[k][0][0] == "Human" and prompt.ids == sample.input_ids[:n]
            checked += 1
    assert checked >= len(lines)

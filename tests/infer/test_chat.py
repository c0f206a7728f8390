"""`peftchat chat`: the prompts a chat session builds are the training prompts of its collator;
streaming, history budget, and scripted sessions (stdin, --message) end to end on a tiny model."""

import io
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from peftchat.cli import main
from peftchat.config import recipe_from_dict
from peftchat.data.readers import normalize
from peftchat.demo_assets import demo_tokenizer_dir
from peftchat.errors import UserError
from peftchat.formats.conversation import Conversation
from peftchat.formats.moss import MOSS_FIELDS
from peftchat.formats.registry import make_format
from peftchat.infer.chat import ChatSession, ReplyStreamer
from peftchat.infer.decoding import context_budget
from peftchat.infer.loading import load_chat_model

META = "You are a careful assistant. 你是一个认真的助手。\n"
ROUNDS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("写一首关于春天的短诗。", "春风拂面，花开满园。"),
    ("And of Italy?", "Rome. 罗马是意大利的首都。"),
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))


class TeacherForcedModel:
    """Stands in for the model: it 'generates' the continuation of whichever training sequence
    starts with the prompt, up to and including the first stop token. A prompt that starts no
    training sequence fails the test."""

    def __init__(self, sequences, stop_ids):
        self.sequences = sequences
        self.stop_ids = set(stop_ids)
        self.prompts = []

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, input_ids, attention_mask, generation_config, streamer=None, logits_processor=None):
        prompt = input_ids[0].tolist()
        self.prompts.append(prompt)
        seq = next((s for s in self.sequences if s[: len(prompt)] == prompt and len(s) > len(prompt)), None)
        assert seq is not None, "the chat prompt is not the beginning of any training sequence"
        cont = seq[len(prompt) :]
        cut = next(k for k, t in enumerate(cont) if t in self.stop_ids)
        cont = cont[: cut + 1]
        if streamer is not None:
            streamer.put(input_ids)
            for t in cont:
                streamer.put(torch.tensor([t]))
            streamer.end()
        return torch.tensor([prompt + cont])


def _moss_record():
    turns = {}
    for k, (q, a) in enumerate(ROUNDS, 1):
        turns[f"turn_{k}"] = {
            "Human": f"<|Human|>: {q}<eoh>\n",
            "Inner Thoughts": f"<|Inner Thoughts|>: thinking about round {k}<eot>\n",
            "Commands": "<|Commands|>: None<eoc>\n",
            "Tool Responses": "<|Results|>: None<eor>\n",
            "MOSS": f"<|MOSS|>: {a}<eom>\n",
        }
    return {"meta_instruction": META, "num_turns": len(ROUNDS), "chat": turns}


@pytest.mark.parametrize("collator", ["chatglm", "moss", "chat_template"])
def test_session_prompts_are_the_training_prompts(collator, tok, tiny_llama_dir, infer_recipe_dict, tmp_path, capsys):
    recipe = recipe_from_dict(infer_recipe_dict(tiny_llama_dir, tmp_path, collator, meta_instruction=META))
    fmt = make_format(recipe.data, tok)
    if collator == "moss":  # a real MOSS record, inner thoughts and tool fields included
        conv = normalize(_moss_record(), "moss", recipe.data, "test")
    else:  # no system message: chat_template takes data.meta_instruction, in training as in chat
        conv = Conversation.from_rounds(ROUNDS)
    samples = fmt.encode(conv).samples
    assert len(samples) == (3 if collator == "chatglm" else 1)
    model = TeacherForcedModel([s.input_ids for s in samples], fmt.stop_ids)

    session = ChatSession(model, tok, recipe)
    for k, (query, answer) in enumerate(ROUNDS):
        streamed = []
        assert session.reply(query, write=streamed.append) == answer
        assert "".join(streamed) == answer
        prompt = model.prompts[k]
        sample = samples[k] if collator == "chatglm" else samples[0]
        # The prompt ends exactly where training's answer starts, not a token earlier or later.
        if collator == "chatglm":  # the loss starts at <sop>, the prompt's last token
            assert sample.labels[len(prompt) - 2] == -100 and sample.labels[len(prompt) - 1] != -100
        elif collator == "chat_template":  # the loss starts with the assistant content
            assert sample.labels[len(prompt) - 1] == -100 and sample.labels[len(prompt)] != -100
        else:  # Human turns carry loss in MOSS: the next token opens the model's first field
            nxt = tok.decode(sample.input_ids[len(prompt) : len(prompt) + 8], skip_special_tokens=False)
            assert nxt.startswith(MOSS_FIELDS["Inner Thoughts"])
    assert len(session.history.rounds()) == 3
    if collator == "moss":  # the generated inner thoughts are kept for the next prompts
        assert "thinking about round 1" in dict(session.history.moss_turns[0])["Inner Thoughts"]
    assert "left out" not in capsys.readouterr().err


def test_history_is_trimmed_to_the_context_budget(tok, tiny_llama_dir, infer_recipe_dict, tmp_path, capsys):
    data = infer_recipe_dict(tiny_llama_dir, tmp_path, "chat_template")
    data["decoding"]["max_context"] = 80
    recipe = recipe_from_dict(data)
    answer = "a fairly long answer of many words " * 2

    class FixedReply:
        prompts = []

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, **kwargs):
            self.prompts.append(input_ids[0].tolist())
            reply = tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
            return torch.cat([input_ids, torch.tensor([reply])], dim=1)

    model = FixedReply()
    session = ChatSession(model, tok, recipe)
    for k in range(4):
        session.reply(f"question number {k}")
    room = 80 - recipe.decoding.max_new_tokens
    assert all(len(p) <= room for p in model.prompts)
    rounds = session.history.rounds()
    assert len(rounds) < 4  # older rounds were dropped for good
    assert rounds[-1][0] == "question number 3"
    assert "left out the 1 oldest round(s)" in capsys.readouterr().err
    # the last prompt is the training prompt of the rounds that were kept
    kept = Conversation.from_rounds(rounds[:-1])
    assert model.prompts[-1] == make_format(recipe.data, tok).prompt(kept, "question number 3", room).ids


def test_streamer_holds_back_split_characters(tok):
    text = "春风拂面，花开满园。"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))  # characters span tokens
    written = []
    recipe = recipe_from_dict({"model": {"path": "unused"}, "data": {"train": "x", "collator": "chat_template"}})
    streamer = ReplyStreamer(make_format(recipe.data, tok).reply_stream(), written.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: not shown
    for t in ids:
        streamer.put(torch.tensor([t]))
    streamer.finish(text)
    assert "".join(written) == text
    assert not any("\ufffd" in w for w in written)


def _scripted(monkeypatch, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))


def test_scripted_session_through_cli(make_adapter, monkeypatch, capsys):
    """stdin not a terminal: one turn per line, `clear` resets, `stop` ends, stdout = replies only."""
    adapter = make_adapter()
    seen, replies = [], []
    build, reply = ChatSession.build_prompt, ChatSession.reply

    def spy_build(self, query):
        ids = build(self, query)
        seen.append((self, self.history, query, ids))
        return ids

    def spy_reply(self, query, write=None):
        replies.append(reply(self, query, write))
        return replies[-1]

    monkeypatch.setattr(ChatSession, "build_prompt", spy_build)
    monkeypatch.setattr(ChatSession, "reply", spy_reply)
    _scripted(monkeypatch, ["Hello there", "", "How are you?", "clear", "What is 2+2?", "stop", "never answered"])
    assert main(["chat", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert [s[2] for s in seen] == ["Hello there", "How are you?", "What is 2+2?"]
    assert [len(s[1].rounds()) for s in seen] == [0, 1, 0]  # history grows, `clear` empties it
    session = seen[0][0]
    for _, history, query, ids in seen:
        assert ids == session.format.prompt(history, query, context_budget(session.recipe)).ids
    assert out == "".join(r + "\n" for r in replies)  # streamed replies, nothing else
    assert "User:" not in out


def test_message_and_subprocess_stdin(make_adapter, capsys):
    adapter = make_adapter(collator="chat_template")
    model, tok, recipe = load_chat_model(adapter)
    session = ChatSession(model, tok, recipe)
    expected = [session.reply("Hi!"), session.reply("Tell me more.")]
    session.clear()
    expected_after_clear = session.reply("Tell me more.")

    assert main(["chat", str(adapter), "--message", "Hi!", "--no-stream"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"

    res = subprocess.run(
        [sys.executable, "-m", "peftchat.cli", "chat", str(adapter)],
        input="Hi!\nTell me more.\nclear\nTell me more.\nstop\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "".join(r + "\n" for r in expected + [expected_after_clear])


def test_bad_source_is_a_user_error(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope"), "--message", "hi"]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["chat", str(tmp_path / "empty"), "--message", "hi"]) == 2
    assert "neither an adapter dir" in capsys.readouterr().err


def test_system_flag_sets_the_sessions_system_message(
    make_adapter, monkeypatch, capsys, tok, tiny_llama_dir, infer_recipe_dict, tmp_path
):
    adapter = make_adapter(collator="chat_template")
    systems = []
    build = ChatSession.build_prompt

    def spy_build(self, query):
        ids = build(self, query)
        systems.append((self.history.system, tok.decode(ids)))
        return ids

    monkeypatch.setattr(ChatSession, "build_prompt", spy_build)
    assert main(["chat", str(adapter), "--system", "Talk like a pirate.", "--message", "hi", "--no-stream"]) == 0
    ((system, prompt),) = systems
    assert system == "Talk like a pirate." and prompt.startswith("<|im_start|>system\nTalk like a pirate.<|im_end|>")
    # a format without system messages refuses the flag rather than dropping it silently
    recipe = recipe_from_dict(infer_recipe_dict(tiny_llama_dir, tmp_path, "chatglm"))
    with pytest.raises(UserError, match="has no system message"):
        ChatSession(TeacherForcedModel([], []), tok, recipe, system="Talk like a pirate.")

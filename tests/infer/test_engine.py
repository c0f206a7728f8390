"""The serving engine's request checks and stop-string handling, without a model or a server."""

import pytest
import torch
from transformers import AutoTokenizer

from peftchat.config import recipe_from_dict
from peftchat.demo_assets import demo_tokenizer_dir
from peftchat.formats.conversation import Conversation
from peftchat.infer.engine import ChatEngine, ChatRequest, RequestError, _cut_at_stop, _safe_length

NO_HISTORY = Conversation.from_rounds([])


class NoModel:
    def parameters(self):
        yield torch.zeros(1)


def _engine(tiny_llama_dir, infer_recipe_dict, tmp_path, collator="moss", **data):
    tok = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    recipe = recipe_from_dict(infer_recipe_dict(tiny_llama_dir, tmp_path, collator, **data))
    return ChatEngine(NoModel(), tok, recipe)


def test_stop_strings():
    assert _cut_at_stop("hello world", ["wor", "lo"]) == ("hel", True)
    assert _cut_at_stop("hello", ["xyz"]) == ("hello", False)
    assert _safe_length("hello wo", ["world"]) == len("hello ")  # "wo" may become "world"
    assert _safe_length("hello", ["world"]) == 5
    assert _safe_length("abcab", ["abcabd", "b"]) == 0  # "abcab" is itself a prefix of a stop


def test_request_checks(tiny_llama_dir, infer_recipe_dict, tmp_path):
    engine = _engine(tiny_llama_dir, infer_recipe_dict, tmp_path)
    job = engine.prepare(ChatRequest(NO_HISTORY, "hi", max_tokens=5, temperature=0.5, top_p=0.9, stop=["", "x"]))
    assert job.recipe.decoding.max_new_tokens == 5 and job.recipe.decoding.temperature == 0.5
    assert job.stop == ["x"] and engine.recipe.decoding.max_new_tokens == 6  # the server's recipe is untouched
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(max_tokens=256)):
        with pytest.raises(RequestError):
            engine.prepare(ChatRequest(NO_HISTORY, "hi", **bad))
    long_round = Conversation.from_rounds([("长" * 150, "答" * 150)])
    with pytest.raises(RequestError, match="context budget") as e:
        engine.prepare(ChatRequest(long_round, "hi", max_tokens=8))
    assert e.value.code == "context_length_exceeded"


def test_chatglm_without_history_column_ignores_history(tiny_llama_dir, infer_recipe_dict, tmp_path):
    engine = _engine(tiny_llama_dir, infer_recipe_dict, tmp_path, "chatglm", history_column=None)
    with_history = engine.prepare(ChatRequest(Conversation.from_rounds([("a", "b")]), "hi"))
    assert with_history.prompt == engine.prepare(ChatRequest(NO_HISTORY, "hi")).prompt


def test_streaming_decodes_each_token_once_and_holds_back_stop_strings(tiny_llama_dir, infer_recipe_dict, tmp_path):
    """Token by token the engine hands out the reply via the format's incremental stream: the
    decoded ids grow linearly with the reply (re-decoding all ids per token would be quadratic),
    the pieces add up to the final reply, and a stop string split across tokens is never shown."""
    engine = _engine(tiny_llama_dir, infer_recipe_dict, tmp_path, "chat_template")
    tok = engine.tokenizer
    answer = "番茄炒蛋：先炒鸡蛋，再炒番茄。" * 8 + "END of the recipe"
    ids = tok.encode(answer, add_special_tokens=False) + engine.format.stop_ids[:1]
    decoded = []
    real_decode = tok.decode
    tok.decode = lambda t, **kw: decoded.append(len(t)) or real_decode(t, **kw)
    try:
        pieces: list[str] = []
        job = engine.prepare(ChatRequest(NO_HISTORY, "hi", stop=["END of"]))
        for t in ids:  # as run()'s streamer hands them over
            job.generated.append(t)
            engine._advance(job, [t], pieces.append)
            assert "END" not in "".join(pieces)  # "E", "EN", "END o" are held back while they may become the stop
        assert sum(decoded) < 8 * len(ids)
        engine._finish(job, pieces.append)
    finally:
        tok.decode = real_decode
    assert "".join(pieces) == job.text == answer[: answer.find("END of")].strip()
    assert job.finish_reason == "stop"

"""`peftchat eval`: ChatGLM's scoring, ChatGLM's eval prompts, and a converged tiny run that
scores ~100 on its own training conversations."""

import json

import pytest

pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")
pytest.importorskip("nltk")

from transformers import AutoTokenizer  # noqa: E402

from peftchat.cli import main  # noqa: E402
from peftchat.config import recipe_from_dict  # noqa: E402
from peftchat.demo_assets import asset_path, demo_tokenizer_dir  # noqa: E402
from peftchat.formats.conversation import Conversation  # noqa: E402
from peftchat.formats.registry import make_format  # noqa: E402
from peftchat.formats.samples import encode_text  # noqa: E402
from peftchat.infer.decoding import context_budget  # noqa: E402
from peftchat.infer.evaluate import EvalPrompts, load_eval_samples, score_generations  # noqa: E402


def test_scores_follow_chatglm_compute_metrics():
    same = "好的，你好！我是 PeftChat，有什么可以帮你的吗？"
    assert score_generations([same], [same]) == {
        "bleu-4": 100.0,
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
        "n": 1,
    }
    # ROUGE on jieba words: 我/爱/北京 vs 我/爱/上海 share 2 of 3 words (on characters it would be 2 of 4)
    assert score_generations(["我爱北京"], ["我爱上海"])["rouge-1"] == pytest.approx(66.6667)
    empty = score_generations([""], ["abc"])
    assert empty["rouge-1"] == 0 and empty["bleu-4"] == 0
    two = score_generations([same, ""], [same, same])
    assert two["n"] == 2 and two["rouge-l"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        score_generations(["a"], [])


def test_chatglm_eval_prompt_is_the_bare_query_without_history(tiny_llama_dir, infer_recipe_dict, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    recipe = recipe_from_dict(infer_recipe_dict(tiny_llama_dir, tmp_path, "chatglm"))
    seps = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])  # the demo tokenizer has both
    prompts = EvalPrompts(recipe, tok)
    assert prompts.ids(Conversation.from_rounds([]), "你好") == encode_text(tok, "你好") + seps
    history = Conversation.from_rounds([("a", "b")])
    chat_prompt = make_format(recipe.data, tok).prompt(history, "你好", context_budget(recipe)).ids
    assert prompts.ids(history, "你好") == chat_prompt
    samples = load_eval_samples(recipe, str(asset_path("demo/chatglm_demo.jsonl")))
    assert len(samples) == 30  # one answer per row; the history is context only
    assert samples[3].history and samples[3].reference.startswith("好的，醋")


def test_moss_conversations_give_one_sample_per_answer(tiny_llama_dir, infer_recipe_dict, tmp_path):
    recipe = recipe_from_dict(infer_recipe_dict(tiny_llama_dir, tmp_path, "moss"))
    samples = load_eval_samples(recipe, str(asset_path("demo/moss_demo.jsonl")), limit=5)
    assert len(samples) == 5
    second = next(s for s in samples if s.history.round_starts())
    # rendered as training renders the session: its raw MOSS turns and its meta instruction
    assert second.history.moss_turns and len(second.history.moss_turns) == len(second.history.round_starts())
    assert second.history.system


def test_converged_demo_scores_near_100_on_its_training_data(tiny_llama_dir, tmp_path, capsys):
    from peftchat.train.loop import train

    rows = asset_path("demo/chatglm_demo.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows[i] for i in (0, 1, 3)) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "model": {"path": str(tiny_llama_dir), "dtype": "fp32", "compute_dtype": "fp32"},
            "adapter": {
                "r": 8,
                "alpha": 16,
                "dropout": 0.0,
                "target_modules": "all-linear",
                "modules_to_save": ["lm_head"],
            },
            # history_column null: ChatGLM trains and evaluates such rows on the bare query alike
            "data": {
                "train": str(data),
                "format": "chatglm",
                "collator": "chatglm",
                "history_column": None,
                "max_source_length": 64,
                "max_target_length": 64,
            },
            "training": {
                "output_dir": str(run),
                "batch_size": 3,
                "lr": 1e-2,
                "warmup_steps": 2,
                "max_steps": 40,
                "gradient_checkpointing": False,
                "save_steps": 1000,
                "eval_steps": 1000,
                "log_steps": 10,
                "device": "cpu",
            },
            "decoding": {"max_new_tokens": 64, "temperature": 0},
        }
    )
    train(recipe)
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(data), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 3
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert printed[key] >= 95, printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["scores"] == printed
    assert [s["reference"] for s in saved["samples"]] == [json.loads(rows[i])["response"] for i in (0, 1, 3)]
    assert all(s["prediction"] for s in saved["samples"])
    assert main(["eval", str(run), "--data", str(data), "--limit", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1


def test_eval_user_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_eval_generation_scores_for_the_training_loop(make_adapter, tmp_path):
    from peftchat.infer.evaluate import eval_generation_scores
    from peftchat.infer.loading import load_chat_model

    model, tok, recipe = load_chat_model(make_adapter("chatglm"))
    model.train()
    samples = load_eval_samples(recipe, str(asset_path("demo/chatglm_demo.jsonl")), limit=2)
    row = eval_generation_scores(model, tok, recipe, samples)
    assert set(row) == {"eval_bleu-4", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_generate_n"}
    assert row["eval_generate_n"] == 2 and model.training


def test_eval_generate_hook_uses_the_held_out_sessions(make_adapter, tiny_llama_dir, infer_recipe_dict, tmp_path):
    from peftchat.infer.evaluate import eval_generate_hook, held_out_samples
    from peftchat.infer.loading import load_chat_model

    recipe = recipe_from_dict(infer_recipe_dict(tiny_llama_dir, tmp_path, "chatglm", eval_split=3))
    assert eval_generate_hook(recipe) is None  # training.eval_generate defaults to 0
    recipe.training.eval_generate = 2
    held = held_out_samples(recipe, 100)
    assert 3 <= len(held) < 30  # three sessions' answers
    model, tok, _ = load_chat_model(make_adapter("chatglm"))
    row = eval_generate_hook(recipe)(model, tok)
    assert row["eval_generate_n"] == 2
    recipe.data.eval_split = 0.0
    with pytest.raises(Exception, match="needs eval data"):
        eval_generate_hook(recipe)


def test_eval_rounds_are_the_trained_answers_with_their_reference_history():
    from peftchat.infer.evaluate import eval_rounds

    conv = Conversation(
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q0"},
            {"role": "assistant", "content": "a0"},  # context (chatglm history)
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "train": False},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"},
            {"role": "assistant", "content": "a3"},
        ],
        context_rounds=1,
        moss_turns=[[("Human", "h0")], [("Human", "h1")], [("Human", "h2")], [("Human", "h3")]],
    )
    rounds = eval_rounds(conv)
    assert [(q, a) for _, q, a in rounds] == [("q2", "a2"), ("q3", "a3")]
    history, _, _ = rounds[1]
    assert history.system == "S" and history.rounds() == [("q0", "a0"), ("q1", "a1"), ("q2", "a2")]
    assert history.moss_turns == conv.moss_turns[:3] and history.context_rounds == 0

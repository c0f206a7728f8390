"""Cost of chat's prompt fitting and reply streaming on CPU (tiny random Qwen2, demo tokenizer).

    PYTHONPATH=. python benchmarks/chat_cost.py

Prints the best of a few runs of: fitting a 10-round chat_template prompt (fits as is, and with a
budget that forces oldest rounds out), the streamer's own work for a 200-token reply (tokens fed
one by one, no model), and generating 200 tokens with and without the streamer.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftchat.config import recipe_from_dict
from peftchat.demo_assets import build_tiny_model
from peftchat.formats.conversation import Conversation
from peftchat.infer.chat import ChatSession, ReplyStreamer
from peftchat.infer.decoding import context_budget


def best(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    model_dir = build_tiny_model(tempfile.mkdtemp(), arch="qwen2", seed=0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def recipe(max_length: int):
        return recipe_from_dict({"model": {"path": str(model_dir), "dtype": "fp32", "compute_dtype": "fp32"},
                                 "data": {"train": "x", "collator": "chat_template", "max_length": max_length},
                                 "training": {"device": "cpu"},
                                 "decoding": {"max_new_tokens": 200, "temperature": 0}})

    history = Conversation.from_rounds([(f"question number {k} about things", f"answer number {k} " * 8)
                                        for k in range(10)])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    roomy, tight = ChatSession(model, tok, recipe(2048)), ChatSession(model, tok, recipe(600))
    t_fit = best(lambda: roomy.format.prompt(history, "the new question", context_budget(roomy.recipe)))
    dropped = tight.format.prompt(history, "the new question", context_budget(tight.recipe)).dropped_rounds
    t_drop = best(lambda: tight.format.prompt(history, "the new question", context_budget(tight.recipe)))

    reply_ids = tok.encode("word " * 199, add_special_tokens=False)[:200]

    def stream_only():
        streamer = ReplyStreamer(roomy.format.reply_stream(), lambda text: None)
        streamer.put(torch.tensor([[1, 2]]))
        for t in reply_ids:
            streamer.put(torch.tensor([t]))

    t_stream = best(stream_only, 3)
    prompt = torch.tensor([roomy.format.prompt(history, "q", context_budget(roomy.recipe)).ids])

    def generate(streamer):
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=200,
                           min_new_tokens=200, do_sample=False, streamer=streamer, pad_token_id=0)

    t_gen = best(lambda: generate(None), 3)
    t_gen_stream = best(lambda: generate(ReplyStreamer(roomy.format.reply_stream(), lambda text: None)), 3)
    print(f"fit 10-round prompt (fits): {t_fit * 1e3:.1f} ms; fit with {dropped} rounds dropped: {t_drop * 1e3:.1f} ms")
    print(f"streamer overhead for 200 tokens: {t_stream * 1e3:.1f} ms; generate 200 tokens: "
          f"{t_gen * 1e3:.0f} ms plain, {t_gen_stream * 1e3:.0f} ms streamed")


if __name__ == "__main__":
    main()

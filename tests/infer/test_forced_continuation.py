"""The MOSS Tool Responses body is the system's to write (training masks it): generation gets it
forced right after the model opens the field."""

import torch

from peftchat.config import recipe_from_dict
from peftchat.demo_assets import asset_path
from peftchat.formats.registry import make_format
from peftchat.infer.decoding import ForcedContinuation, logits_processors
from peftchat.model.tokenizer import load_tokenizer


def _moss_format():
    recipe = recipe_from_dict(
        {
            "model": {"path": "unused", "tokenizer": str(asset_path("tokenizer"))},
            "data": {"train": "x.jsonl", "format": "moss", "collator": "moss"},
        }
    )
    tokenizer = load_tokenizer(recipe)
    return make_format(recipe.data, tokenizer), tokenizer


def test_moss_forces_the_results_body_after_the_marker():
    fmt, tok = _moss_format()
    [(trigger, forced)] = fmt.forced_continuations()
    assert tok.decode(trigger, skip_special_tokens=False) == "<|Results|>:"
    assert tok.decode(trigger + forced, skip_special_tokens=False) == "<|Results|>: None<eor>\n"
    assert logits_processors(fmt) is not None


def test_forced_tokens_follow_the_trigger_one_by_one_and_nothing_else():
    proc = ForcedContinuation([([7, 8], [3, 4, 5])])
    vocab = 10

    def next_token(ids):
        scores = torch.randn(1, vocab)
        return int(proc(torch.tensor([ids]), scores).argmax())

    seq = [1, 2, 7, 8]
    for expected in (3, 4, 5):
        got = next_token(seq)
        assert got == expected
        seq.append(got)
    scores = torch.arange(vocab, dtype=torch.float).unsqueeze(0)
    assert torch.equal(proc(torch.tensor([seq]), scores.clone()), scores)  # done: free again
    assert torch.equal(proc(torch.tensor([[1, 7, 2]]), scores.clone()), scores)  # no trigger at the end

"""The real-length chat scenario: seeded multi-turn sessions with a long-tailed length distribution.

Real SFT sets are mostly short sessions with a long tail (median a few hundred tokens, a few
percent at the length limit). `write_sessions` draws each session's target length from a
log-normal (median `median` tokens, sigma 0.8: about 4 % above 2,048 and cut there by
`data.max_length`), splits it into 1-6 user/assistant turns and fills the turns with text from
the shipped demo corpus at seeded offsets. The file is the same for every variant (same seed).

Every variant sees the same tokens: peftchat trains on the JSONL through its recipe; the peers
get the same file tokenized by peftchat's own pipeline (`tokenized_samples`) and batched in file
order with per-batch dynamic padding (`padded_batches`, what HF's padding collators do).
Throughput is counted as real (non-pad) tokens/s and label tokens/s.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

SEED = 1234
MEDIAN_TOKENS = 500
SIGMA = 0.8
N_SESSIONS = 600


def session_lengths(
    n: int, median: int = MEDIAN_TOKENS, sigma: float = SIGMA, seed: int = SEED, cap: int = 2048
) -> list[int]:
    """Seeded log-normal token lengths, at least 32 and at most `cap` (longer ones are cut to it)."""
    rng = random.Random(seed)
    return [max(32, min(cap, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def write_sessions(path: Path, tokenizer, n: int = N_SESSIONS, seed: int = SEED) -> Path:
    """`n` messages-JSONL sessions whose token lengths follow `session_lengths` (approximately:
    the text is cut by characters at the corpus' own characters-per-token ratio)."""
    from peftchat.demo_assets import asset_path

    corpus = asset_path("demo/corpus.txt").read_text(encoding="utf-8").replace("\n", " ")
    chars_per_token = len(corpus) / max(1, len(tokenizer(corpus, add_special_tokens=False)["input_ids"]))
    text = corpus * 4
    rng = random.Random(seed + 1)
    with open(path, "w", encoding="utf-8") as f:
        for i, tokens in enumerate(session_lengths(n, seed=seed)):
            turns = rng.randint(1, 6)
            per_turn = max(8, tokens // (2 * turns))
            messages = []
            for t in range(turns):
                for role, share in (("user", 0.3), ("assistant", 1.7)):
                    n_chars = max(8, int(per_turn * share * chars_per_token))
                    start = rng.randrange(0, len(corpus))
                    messages.append({"role": role, "content": f"{role[0]}{i}.{t} " + text[start : start + n_chars]})
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def tokenized_samples(recipe) -> list[dict[str, list[int]]]:
    """The recipe's training samples as peftchat's pipeline makes them (input_ids, labels), in file order."""
    from peftchat.data.pipeline import build_datasets
    from peftchat.model.tokenizer import load_tokenizer

    bundle = build_datasets(recipe, load_tokenizer(recipe), split_eval=False)
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in bundle.train]


def padded_batches(
    samples: list[dict[str, list[int]]], batch: int, n_batches: int, pad_id: int
) -> list[dict[str, Any]]:
    """The first `n_batches` batches of `batch` consecutive samples, each padded to its own longest
    row; every batch dict also carries `real_tokens` and `label_tokens` (after the causal shift)."""
    from peftchat.data.batching import collate, count_label_tokens

    out = []
    for b in range(n_batches):
        rows = samples[b * batch : (b + 1) * batch]
        if len(rows) < batch:
            raise ValueError(f"{len(samples)} samples are too few for {n_batches} batches of {batch}")
        tensors = collate([[r] for r in rows], pad_id, packing=False)
        tensors["real_tokens"] = sum(len(r["input_ids"]) for r in rows)
        tensors["label_tokens"] = count_label_tokens(tensors["labels"])
        out.append(tensors)
    return out


def sessions_recipe(spec: dict[str, Any]):
    """A recipe that tokenizes the spec's sessions file as the peftchat rows do (chat_template
    collator, shipped tokenizer, `data.max_length` = the spec's seq)."""
    from peftchat.config import recipe_from_dict
    from peftchat.demo_assets import demo_tokenizer_dir

    work = Path(spec["work_dir"])
    return recipe_from_dict(
        {
            "model": {"path": spec["model_dir"], "tokenizer": str(demo_tokenizer_dir())},
            "data": {
                "train": spec["sessions_file"],
                "format": spec.get("sessions_format", "messages"),
                "collator": spec.get("sessions_collator", "chat_template"),
                "max_length": spec["seq"],
                "shuffle": False,
                "cache_dir": str(work.parent / "hf_cache"),
            },
            "training": {"output_dir": str(work / "peer_data"), "device": spec["device"]},
        }
    )

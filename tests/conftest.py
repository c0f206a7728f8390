# ---- Triton without a GPU: the interpreter, set before anything imports triton. Triton decides
# interpreted or compiled when a function is decorated, and triton.language's own helpers
# (tl.randint4x, which peftchat.kernels.lora_dropout's kernels call) are decorated when triton is
# first imported (bitsandbytes imports it): set later, a kernel runs interpreted but calls a
# compiled helper and fails (tests/kernels/test_lora_dropout.py after tests/infer/test_loading.py).
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

# ---- training engine (tests/train, tests/model): one tiny random-init Llama per session
import pytest as _pytest_train


@_pytest_train.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (hidden 64, 2 layers) with the demo tokenizer; read-only for tests."""
    from peftchat.demo_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@_pytest_train.fixture(scope="session")
def packing_samples():
    """Four samples of 5-14 tokens, some with masked prompt labels: packed-row tests pack them."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for n, masked in [(9, 3), (14, 0), (5, 2), (11, 4)]:
        ids = torch.randint(20, 3000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return out


# ---- merge / chat / generate (tests/model/test_merge*.py, tests/infer): saved adapters on the tiny Llama
_DEMO_DATA = {
    "moss": ("moss_demo.jsonl", "moss"),
    "chatglm": ("chatglm_demo.jsonl", "chatglm"),
    "chat_template": ("messages_demo.jsonl", "messages"),
}


def _infer_recipe_dict(
    base_dir, output_dir, collator="moss", quantization="none", use_dora=False, dtype="fp32", **data
):
    """Recipe (as a dict) of a tiny CPU run (fp32 unless `dtype`): greedy decoding of a few tokens,
    the demo data of `collator`."""
    from peftchat.demo_assets import asset_path

    train, fmt = _DEMO_DATA[collator]
    return {
        "model": {"path": str(base_dir), "dtype": dtype, "compute_dtype": "fp32", "quantization": quantization},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "use_dora": use_dora},
        "data": {
            "train": str(asset_path(f"demo/{train}")),
            "format": fmt,
            "collator": collator,
            "max_length": 256,
            "max_source_length": 128,
            "max_target_length": 64,
            **data,
        },
        "training": {"device": "cpu", "output_dir": str(output_dir), "gradient_checkpointing": False},
        "decoding": {"max_new_tokens": 6, "temperature": 0},
    }


@_pytest_train.fixture(scope="session")
def infer_recipe_dict():
    """`f(base_dir, output_dir, collator="moss", quantization="none", use_dora=False, dtype="fp32", **data) -> dict`."""
    return _infer_recipe_dict


@_pytest_train.fixture(scope="session")
def make_adapter(tmp_path_factory, tiny_llama_dir):
    """Factory: an adapter dir as training leaves it (adapter, tokenizer, recipe.yaml) for the tiny
    Llama, built with the training code (`load_base_model` + `apply_lora`) and random non-zero
    LoRA B (and perturbed DoRA magnitudes) so that merging it changes the model. Cached per args."""
    cache = {}

    def make(collator="moss", quantization="none", use_dora=False, dtype="fp32", **data):
        key = (collator, quantization, use_dora, dtype, tuple(sorted(data.items())))
        if key in cache:
            return cache[key]
        import torch
        from transformers import AutoTokenizer

        from peftchat.config import recipe_from_dict, save_recipe
        from peftchat.model.adapters import apply_lora
        from peftchat.model.load import load_base_model

        out = tmp_path_factory.mktemp(f"adapter-{collator}-{quantization}-{dtype}{'-dora' if use_dora else ''}")
        recipe = recipe_from_dict(
            _infer_recipe_dict(tiny_llama_dir, out, collator, quantization, use_dora, dtype, **data)
        )
        model = apply_lora(load_base_model(recipe), recipe, verbose=False)
        gen = torch.Generator().manual_seed(len(cache) + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(tiny_llama_dir)).save_pretrained(str(out))
        save_recipe(recipe, out / "recipe.yaml")
        cache[key] = out
        return out

    return make


# ---- serve (tests/infer/test_serve*.py): an ASGI app under a real uvicorn server
@_pytest_train.fixture(scope="session")
def uvicorn_app():
    """`with uvicorn_app(app) as port:` serves `app` with uvicorn on 127.0.0.1 (an ephemeral port,
    in a thread) until the block ends."""
    import threading
    import time
    from contextlib import contextmanager

    @contextmanager
    def running(app):
        import uvicorn

        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not srv.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        try:
            yield srv.servers[0].sockets[0].getsockname()[1]
        finally:
            srv.should_exit = True
            thread.join(timeout=10)

    return running


@_pytest_train.fixture(scope="session")
def slow_chat_engine():
    """`f(adapter_dir) -> engine`: a ChatEngine for the saved adapter that sleeps `engine.delay`
    seconds per token (0 until a test sets it), so a test can act in the middle of a generation."""
    import time

    from peftchat.infer.engine import ChatEngine
    from peftchat.infer.loading import load_chat_model

    class SlowEngine(ChatEngine):
        delay = 0.0

        def _advance(self, job, new_ids, on_text):
            time.sleep(self.delay)
            super()._advance(job, new_ids, on_text)

    return lambda adapter_dir: SlowEngine(*load_chat_model(adapter_dir))

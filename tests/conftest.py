
# ---- training engine (tests/train, tests/model): one tiny random-init Llama per session
import pytest as _pytest_train


@_pytest_train.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (hidden 64, 2 layers) with the demo tokenizer; read-only for tests."""
    from peftchat.demo_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)

import os

import pytest

# Tests never reach the hub: a download attempt fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tutorial_api import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """the tiny random-weight Qwen2 and its tokenizer, built once."""
    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2():
    """the real offline default model, SmolLM2-135M-Instruct."""
    return load_model("smollm2-135m")

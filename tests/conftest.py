import os

import pytest

# Tests never reach the hub: a download attempt fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tutorial_api import create_app, load_model, start_server  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """the tiny random-weight Qwen2 and its tokenizer, built once."""
    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2():
    """the real offline default model, SmolLM2-135M-Instruct."""
    return load_model("smollm2-135m")


@pytest.fixture
def serve():
    """start the tiny model's app on a free loopback port with some settings changed; stopped after the test."""
    servers = []

    def start(**settings):
        servers.append(start_server(create_app("tiny-qwen2", **settings), port=0, log_level="warning"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()

import copy
import os
import time

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


@pytest.fixture(scope="session")
def tiny_server():
    """the tiny model's app with default settings on a free loopback port, shared by the tests that call it."""
    server = start_server(create_app("tiny-qwen2"), port=0, log_level="warning")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slow_tiny(tiny):
    """the tiny model slowed to 20 ms a decoding step, so a long answer reliably outlasts a test's checks."""
    model, tokenizer = tiny
    slow = copy.deepcopy(model)
    fast_forward = slow.forward

    def forward(*args, **kwargs):
        time.sleep(0.02)
        return fast_forward(*args, **kwargs)

    slow.forward = forward
    return slow, tokenizer

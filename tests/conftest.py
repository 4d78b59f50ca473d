import copy
import json
import os
import threading
import time

import pytest

# Tests never reach the hub: a download attempt fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tutorial_api import create_app, load_model, start_server


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` where there is no CUDA; a `real_model` test is `slow` too."""
    import torch

    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "real_model" in item.keywords:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random-weight Qwen2 and its tokenizer, built once."""
    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model, SmolLM2-135M-Instruct."""
    return load_model("smollm2-135m")


@pytest.fixture
def serve():
    """Start the tiny model's app with some settings changed, on a free loopback port.

    Each server started stops after the test.
    """
    servers = []

    def start(**settings):
        servers.append(
            start_server(create_app("tiny-qwen2", **settings), port=0, log_level="warning")
        )
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server():
    """The tiny model's app with default settings on a free loopback port, shared by its users."""
    server = start_server(create_app("tiny-qwen2"), port=0, log_level="warning")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slow_tiny(tiny):
    """The tiny model slowed to 20 ms a decoding step: a long answer outlasts a test's checks."""
    model, tokenizer = tiny
    slow = copy.deepcopy(model)
    fast_forward = slow.forward

    def forward(*args, **kwargs):
        time.sleep(0.02)
        return fast_forward(*args, **kwargs)

    slow.forward = forward
    return slow, tokenizer


INJECTED_FAULT = RuntimeError("injected fault: secret")


class FaultyModel:
    """A model like the one it wraps, but raising `error` where `fails(call, input_ids)` says.

    `gate`, when set, holds every call until the test opens it; `entered` is set once a call waits
    there.
    """

    def __init__(
        self,
        model,
        fails=lambda call, input_ids: False,
        error=INJECTED_FAULT,
    ):
        self._model, self._fails, self._error = model, fails, error
        self.calls = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, input_ids, **kwargs):
        self.calls += 1
        if self.gate is not None:
            self.entered.set()
            self.gate.wait()
        if self._fails(self.calls, input_ids):
            raise self._error
        return self._model(input_ids=input_ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture
def faulty(tiny):
    """Build a FaultyModel around the tiny model: `faulty(fails=..., error=...)`."""
    return lambda **options: FaultyModel(tiny[0], **options)


@pytest.fixture
def decoding():
    """Read a streamed OpenAI answer until its first token's text: its request is in the batch.

    Returns the lines, to keep: dropping them closes the connection, and the server cancels.
    """

    def read(streamed):
        lines = streamed.iter_lines(decode_unicode=True)
        while not (line := next(lines)).startswith("data: ") or not json.loads(line[6:])["choices"][
            0
        ]["delta"].get("content"):
            pass
        return lines

    return read

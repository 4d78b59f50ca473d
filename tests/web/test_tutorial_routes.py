"""the tutorial's POST /: its answer budget, answer_tokens within max_length."""

import logging
import re

import pytest
import requests
from fastapi.testclient import TestClient

from tutorial_api import create_app


@pytest.fixture(scope="module")
def client(tiny):
    """POST / with an answer budget of 6 tokens (answer_tokens) and a class limit of 9
    (max_new_tokens).
    """
    with TestClient(create_app(tiny, answer_tokens=6, max_new_tokens=9)) as client:
        yield client


def tokens_of(client, caplog, body) -> tuple[int, int, str]:
    """POST `body` greedily; the prompt and answer token counts and the finish reason from the
    request log.
    """
    caplog.set_level(logging.INFO, logger="tutorial_api.requests")
    caplog.clear()
    answer = client.post("/", json={"temperature": 0, **body})
    assert answer.status_code == 200, answer.text
    [line] = [
        record.getMessage() for record in caplog.records if record.name == "tutorial_api.requests"
    ]
    prompt, completion, finish = re.search(
        r"prompt_tokens=(\d+) completion_tokens=(\d+) finish=(\w+)", line
    ).groups()
    return int(prompt), int(completion), finish


def test_an_answer_without_max_length_stops_at_answer_tokens(client, caplog):
    assert tokens_of(client, caplog, {"prompt": "你好", "history": []})[1:] == (6, "length")


def test_a_max_length_above_the_budget_stops_at_answer_tokens(client, caplog):
    """A long max_length (the tutorial's default is 2048; the tiny model's context holds 1024) is
    not refused: it allows the answer that many tokens with the prompt, and answer_tokens ends it
    first.
    """
    assert tokens_of(client, caplog, {"prompt": "你好", "max_length": 1000})[1:] == (6, "length")


def test_max_length_counts_the_prompt_and_the_answer(client, caplog):
    """max_length keeps counting the prompt and the answer together."""
    prompt, _, _ = tokens_of(client, caplog, {"prompt": "你好"})
    assert tokens_of(client, caplog, {"prompt": "你好", "max_length": prompt + 4}) == (
        prompt,
        4,
        "length",
    )


def test_the_default_budget_is_512_tokens_and_a_setting(tiny, caplog):
    """The default budget is 512 tokens, and the setting changes it."""
    app = create_app(tiny)
    assert app.state.settings.answer_tokens == 512
    with TestClient(create_app(tiny, answer_tokens=3)) as small:
        assert tokens_of(small, caplog, {"prompt": "Tell me a story"})[1] == 3


def test_answers_and_refusals_say_their_json_is_utf8(tiny_server):
    """Answers and refusals name charset=utf-8: Windows PowerShell 5.1 garbles Chinese without."""
    answered = requests.post(tiny_server.url, json={"prompt": "你好", "max_length": 40})
    refused = requests.post(tiny_server.url, json={"prompt": " "})
    assert (answered.status_code, refused.status_code) == (200, 422)
    for answer in (answered, refused):
        assert answer.headers["content-type"] == "application/json; charset=utf-8"

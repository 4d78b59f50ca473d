import json
import logging
import time

import pytest
import requests

from tutorial_api import create_app, start_server
from tutorial_api.web.errors import Refusal
from tutorial_api.web.limits import Slots

MESSAGES = [{"role": "user", "content": "Tell me a story"}]
ALICE, BOB = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
LONG = {
    "messages": MESSAGES,
    "max_tokens": 900,
    "temperature": 0,
}  # greedy, on the slow model: about 18 s


@pytest.fixture(scope="module")
def limited():
    """a server with small body, prompt, answer and history limits."""
    server = start_server(
        create_app(
            "tiny-qwen2",
            max_body_bytes=2000,
            max_prompt_tokens=100,
            max_new_tokens=8,
            max_history_turns=2,
        ),
        port=0,
        log_level="warning",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict(slow_tiny):
    """a server with two keys, one request in flight per key, and a request timeout."""
    server = start_server(
        create_app(
            slow_tiny,
            api_keys=["alice:alice-key", "bob:bob-key"],
            max_concurrent_per_key=1,
            request_timeout=1,
        ),
        port=0,
        log_level="warning",
    )
    yield server
    server.stop()


def chat(server, body, headers=None, **options):
    return requests.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, **options)


def alice_can_ask_again(server) -> None:
    """Alice's slot is free again: a short request of hers is served (within a few seconds, for
    disconnects).
    """
    deadline = time.monotonic() + 5
    while (
        answer := chat(server, {"messages": MESSAGES, "max_tokens": 1}, ALICE)
    ).status_code == 429:
        assert time.monotonic() < deadline, "alice's slot was never released"
        time.sleep(0.05)
    assert answer.status_code == 200


def assert_engine_idle(server) -> None:
    """every generation has left the engine: a timed-out one is cancelled, not left running."""
    deadline = time.monotonic() + 5
    while requests.get(f"{server.url}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "a timed-out generation kept running"
        time.sleep(0.05)


def test_a_body_over_the_limit_gets_413_by_its_length(limited):
    big = "x" * 3000
    tutorial = requests.post(limited.url, json={"prompt": big})
    assert tutorial.status_code == 413
    assert tutorial.json()["field"] == "body" and "max_body_bytes" in tutorial.json()["message"]
    openai = chat(limited, {"messages": [{"role": "user", "content": big}]})
    assert openai.status_code == 413 and openai.json()["error"]["code"] == "request_too_large"


def test_a_streamed_body_without_a_length_is_counted_too(limited):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    answer = requests.post(limited.url, data=chunks(), headers={"Content-Type": "application/json"})
    assert answer.request.headers.get("Transfer-Encoding") == "chunked"
    assert answer.status_code == 413 and "max_body_bytes" in answer.json()["message"]


def test_a_prompt_over_the_token_limit_is_refused(limited):
    tutorial = requests.post(limited.url, json={"prompt": "word " * 150})
    assert tutorial.status_code == 422 and tutorial.json()["field"] == "prompt"
    assert "max_prompt_tokens" in tutorial.json()["message"]
    openai = chat(limited, {"messages": [{"role": "user", "content": "word " * 150}]})
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "messages"
    assert "max_prompt_tokens" in openai.json()["error"]["message"]


def test_asking_for_a_longer_answer_than_the_limit_is_refused(limited):
    for field in ("max_tokens", "max_completion_tokens"):
        answer = chat(limited, {"messages": MESSAGES, field: 9})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field
        assert "max_new_tokens" in answer.json()["error"]["message"]
    tutorial = requests.post(limited.url, json={"prompt": "hi", "max_length": 500})
    assert tutorial.status_code == 422 and tutorial.json()["field"] == "max_length"
    assert "max_new_tokens" in tutorial.json()["message"]


def test_asking_for_less_is_served_and_not_asking_gets_the_limit(limited, caplog):
    assert chat(limited, {**LONG, "max_tokens": 5}).json()["usage"]["completion_tokens"] == 5
    assert chat(limited, {**LONG, "max_tokens": None}).json()["usage"]["completion_tokens"] == 8
    caplog.set_level(logging.INFO, logger="tutorial_api.requests")
    assert requests.post(limited.url, json={"prompt": "hi", "temperature": 0}).status_code == 200
    assert " completion_tokens=8 " in caplog.records[-1].getMessage()


def test_a_history_over_the_turn_limit_is_refused(limited):
    history = [["q1", "a1"], ["q2", "a2"], ["q3", "a3"]]
    tutorial = requests.post(limited.url, json={"prompt": "hi", "history": history})
    assert tutorial.status_code == 422 and tutorial.json()["field"] == "history"
    assert "max_history_turns" in tutorial.json()["message"]
    assert (
        requests.post(limited.url, json={"prompt": "hi", "history": history[:2]}).status_code == 200
    )
    turns = [
        {"role": role, "content": text}
        for pair in history
        for role, text in zip(("user", "assistant"), pair, strict=True)
    ]
    openai = chat(limited, {"messages": [*turns, *MESSAGES]})
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "messages"


def test_a_slot_is_released_when_its_block_fails():
    slots = Slots(1)
    with pytest.raises(RuntimeError), slots.hold("alice"):
        raise RuntimeError("the route failed")
    with slots.hold("alice"), pytest.raises(Refusal) as refused, slots.hold("alice"):
        pass
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "1"}
    assert not slots.busy


def test_one_request_in_flight_per_key(strict):
    with chat(strict, {**LONG, "stream": True}, ALICE, stream=True) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        refused = chat(strict, {"messages": MESSAGES, "max_tokens": 1}, ALICE)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert "max_concurrent_per_key" in refused.json()["error"]["message"]
        tutorial = requests.post(strict.url, json={"prompt": "hi", "max_length": 40}, headers=ALICE)
        assert tutorial.status_code == 429 and tutorial.json()["status"] == 429
        assert chat(strict, {"messages": MESSAGES, "max_tokens": 1}, BOB).status_code == 200
    alice_can_ask_again(strict)


def test_the_slot_is_released_on_every_path(strict):
    assert chat(strict, {"messages": MESSAGES, "max_tokens": 2}, ALICE).status_code == 200
    alice_can_ask_again(strict)
    assert (
        chat(strict, {"messages": MESSAGES, "max_tokens": 0}, ALICE).status_code == 400
    )  # invalid body
    alice_can_ask_again(strict)
    assert (
        chat(strict, {"messages": [{"role": "user", "content": "word " * 1100}]}, ALICE).status_code
        == 400
    )
    alice_can_ask_again(strict)
    assert chat(strict, LONG, ALICE).status_code == 504  # the request timeout
    alice_can_ask_again(strict)
    with chat(strict, {**LONG, "stream": True}, ALICE, stream=True) as dropped:
        next(dropped.iter_lines())  # then hang up mid-stream
    alice_can_ask_again(strict)
    with pytest.raises(requests.Timeout):
        chat(strict, LONG, ALICE, timeout=0.5)  # hang up while waiting for the whole answer
    alice_can_ask_again(strict)


def test_a_request_past_the_timeout_is_cancelled_with_504(strict):
    started = time.monotonic()
    openai = chat(strict, LONG, BOB)
    assert openai.status_code == 504 and openai.json()["error"]["code"] == "timeout"
    assert "request_timeout" in openai.json()["error"]["message"]
    tutorial = requests.post(
        strict.url,
        json={"prompt": "Tell me a story", "max_length": 1000, "temperature": 0},
        headers=BOB,
    )
    assert tutorial.status_code == 504 and "request_timeout" in tutorial.json()["message"]
    assert time.monotonic() - started < 6
    assert_engine_idle(strict)


def test_a_stream_past_the_timeout_ends_with_an_error_event(strict):
    with chat(strict, {**LONG, "stream": True}, BOB, stream=True) as answer:
        assert answer.status_code == 200
        events = [
            line[6:] for line in answer.iter_lines(decode_unicode=True) if line.startswith("data: ")
        ]
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "timeout" and "request_timeout" in error["message"]
    assert len(events) > 2  # the answer streamed until the timeout
    assert_engine_idle(strict)

import json
import threading
import time

import openai
import pytest
import requests
from fastapi.testclient import TestClient

from tutorial_api import chat, create_app, start_server
from tutorial_api.conversation import build_messages
from tutorial_api.web import openai_routes

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "给我讲一个故事"},
]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture
def one_slot_server(slow_tiny):
    """A server that decodes one request at a time and lets one more wait, on the slow model."""
    server = start_server(
        create_app(slow_tiny, max_batch_size=1, max_waiting=1), port=0, log_level="warning"
    )
    yield server
    server.stop()


def reference(tiny, max_new_tokens):
    system, user = MESSAGES[0]["content"], MESSAGES[1]["content"]
    return chat(*tiny, user, system=system, max_new_tokens=max_new_tokens, temperature=0)[0]


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["tiny-qwen2"]


def test_completion_with_the_official_client(client, tiny):
    completion = client.chat.completions.create(
        model="any-name", messages=MESSAGES, max_tokens=10, temperature=0
    )
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip() == reference(tiny, 10)
    assert choice.finish_reason == "length"
    _, tokenizer = tiny
    prompt_tokens = len(
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    )
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        prompt_tokens,
        10,
    )
    assert completion.usage.total_tokens == prompt_tokens + 10
    assert completion.model == "tiny-qwen2" and completion.id.startswith("chatcmpl-")


@pytest.mark.parametrize("prefix_cache_mb", [256, 0])
def test_usage_counts_the_reused_prompt_tokens(serve, prefix_cache_mb):
    """Usage counts the prompt tokens reused from a recent request."""
    client = openai.OpenAI(
        base_url=f"{serve(prefix_cache_mb=prefix_cache_mb).url}/v1", api_key="-", max_retries=0
    )
    first, again = (
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0)
        for _ in range(2)
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (
        again.usage.prompt_tokens - 1 if prefix_cache_mb else 0
    )
    assert again.choices[0].message.content == first.choices[0].message.content


def test_a_key_never_reuses_or_learns_another_keys_cache(serve):
    """A key reuses its own cached conversation, never another key's, nor learns its length."""
    url = f"{serve(api_keys=['alice:a-secret', 'bob:b-secret']).url}/v1"
    alice, bob = (
        openai.OpenAI(base_url=url, api_key=key, max_retries=0) for key in ("a-secret", "b-secret")
    )
    asked = alice.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0)
    # Alice's question and answer, as another student would guess them, and a new question.
    guess = [
        *MESSAGES,
        {"role": "assistant", "content": asked.choices[0].message.content},
        {"role": "user", "content": "再讲一个"},
    ]
    probe, again = (
        client.chat.completions.create(model="m", messages=guess, max_tokens=2, temperature=0)
        for client in (bob, alice)
    )
    assert probe.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_max_completion_tokens_is_the_newer_name(client):
    completion = client.chat.completions.create(
        model="m", messages=MESSAGES, max_completion_tokens=4, temperature=0
    )
    assert completion.usage.completion_tokens == 4


def test_streaming_with_the_official_client(client, tiny):
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() == reference(tiny, 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert not any("\ufffd" in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_stream_without_usage_ends_with_done(tiny_server):
    with requests.post(
        f"{tiny_server.url}/v1/chat/completions",
        stream=True,
        json={"messages": MESSAGES, "max_tokens": 3, "stream": True},
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [
            line for line in answer.iter_lines(decode_unicode=True) if line.startswith("data: ")
        ]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_stop_and_seed(client, tiny):
    full = reference(tiny, 16)
    stop_word = full.split()[2]
    stopped = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=16, temperature=0, stop=stop_word
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_word not in stopped.choices[0].message.content

    def sample(seed):
        return (
            client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert sample(11) == sample(11) != sample(12)


BAD_REQUESTS = {
    "no-messages": ({"messages": []}, "messages"),
    "last-message-not-from-user": (
        {"messages": [{"role": "assistant", "content": "hi"}]},
        "messages",
    ),
    "unknown-role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "temperature-too-high": ({"messages": MESSAGES, "temperature": 3}, "temperature"),
    "top-p-zero": ({"messages": MESSAGES, "top_p": 0}, "top_p"),
    "max-tokens-zero": ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    "several-answers": ({"messages": MESSAGES, "n": 2}, "n"),
    "five-stop-strings": ({"messages": MESSAGES, "stop": list("abcde")}, "stop"),
    "long-stop-strings": ({"messages": MESSAGES, "stop": ["x" * 200_000] * 4}, "stop"),
    "negative-seed": ({"messages": MESSAGES, "seed": -1}, "seed"),
    "temperature-as-bool": ({"messages": MESSAGES, "temperature": False}, "temperature"),
    "longer-than-context": (
        {"messages": [{"role": "user", "content": "word " * 1100}]},
        "messages",
    ),
    "tools": (
        {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools",
    ),
    "response-format": (
        {"messages": MESSAGES, "response_format": {"type": "json_object"}},
        "response_format",
    ),
    "logit-bias": ({"messages": MESSAGES, "logit_bias": {"42": 5}}, "logit_bias"),
    "top-logprobs-without-logprobs": ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    "presence-penalty-too-high": (
        {"messages": MESSAGES, "presence_penalty": 3},
        "presence_penalty",
    ),
}


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_an_openai_error(client, body, param):
    with pytest.raises(openai.BadRequestError) as failure:
        client.chat.completions.create(model="m", **body)
    error = failure.value.body
    assert failure.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_json_and_unknown_paths_keep_the_openai_shape(tiny_server):
    for raw in (b"{", b'{"messages": "\x80"}'):
        answer = requests.post(
            f"{tiny_server.url}/v1/chat/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"
    missing = requests.get(f"{tiny_server.url}/v1/nothing-here")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


def wait_for_active(server, count):
    deadline = time.monotonic() + 10
    while requests.get(f"{server.url}/health").json()["active_requests"] < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests ever became active"
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after(one_slot_server, decoding):
    url = f"{one_slot_server.url}/v1/chat/completions"
    long = {
        "messages": MESSAGES,
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }  # greedy: never ends early
    with requests.post(url, json=long, stream=True) as running:
        lines = decoding(running)  # noqa: F841 - held open
        with requests.post(url, json=long, stream=True) as waiting:
            wait_for_active(one_slot_server, 2)
            refused = requests.post(url, json={"messages": MESSAGES, "max_tokens": 2})
            assert waiting.status_code == 200
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "server_error"


def test_a_disconnect_frees_the_slot_for_the_next_request(one_slot_server, tiny):
    url = f"{one_slot_server.url}/v1/chat/completions"
    with requests.post(
        url, json={"messages": MESSAGES, "max_tokens": 900, "stream": True}, stream=True
    ) as dropped:
        lines = dropped.iter_lines()
        next(lines), next(lines)
    deadline = time.monotonic() + 5
    while requests.get(f"{one_slot_server.url}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.01)
    completion = requests.post(
        url, json={"messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    ).json()
    assert completion["choices"][0]["message"]["content"].strip() == reference(tiny, 10)


def test_a_non_streaming_disconnect_is_cancelled_too(one_slot_server):
    url = f"{one_slot_server.url}/v1/chat/completions"
    hung_up = threading.Thread(
        target=lambda: pytest.raises(
            requests.Timeout,
            requests.post,
            url,
            json={"messages": MESSAGES, "max_tokens": 900},
            timeout=0.5,
        )
    )
    hung_up.start()
    hung_up.join()
    deadline = time.monotonic() + 5
    while requests.get(f"{one_slot_server.url}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.01)


def test_the_tutorial_endpoint_shares_the_engine(tiny_server, client, tiny):
    answer = requests.post(
        tiny_server.url,
        json={"prompt": "给我讲一个故事", "history": [], "temperature": 0, "max_length": 60},
    ).json()
    expected = chat(*tiny, "给我讲一个故事", max_length=60, temperature=0)[0]
    assert answer["response"] == expected
    assert build_messages("给我讲一个故事")[-1]["content"] == answer["history"][0][0]


def test_the_developer_role_is_the_system_message(client):
    def answer(role):
        messages = [{"role": role, "content": "You are terse."}, MESSAGES[1]]
        return client.chat.completions.create(
            model="m", messages=messages, max_tokens=8, temperature=0
        )

    assert (
        answer("developer").choices[0].message.content
        == answer("system").choices[0].message.content
    )
    assert answer("developer").usage.prompt_tokens == answer("system").usage.prompt_tokens


def test_logprobs_with_the_official_client(client):
    completion = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == max(alternative.logprob for alternative in entry.top_logprobs) <= 0
    assert (
        "".join(entry.token for entry in content).strip()
        == completion.choices[0].message.content.strip()
    )
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, stream=True
        )
    )
    streamed = [
        entry
        for chunk in chunks
        if chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None


def test_a_presence_penalty_keeps_tokens_from_repeating(client):
    def tokens(**penalty):
        completion = client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=40, temperature=0, logprobs=True, **penalty
        )
        return [entry.token for entry in completion.choices[0].logprobs.content]

    assert len(set(tokens())) < 40, (
        "the plain greedy answer should repeat itself for this test to mean anything"
    )
    assert len(set(tokens(presence_penalty=2.0))) == 40
    assert tokens(frequency_penalty=2.0) != tokens()


def test_streams_are_not_cached_and_are_kept_alive(tiny, faulty, monkeypatch):
    monkeypatch.setattr(openai_routes, "KEEPALIVE_SECONDS", 0.05)
    model = faulty()
    model.gate = (
        threading.Event()
    )  # the worker holds the first step until the test has seen a keep-alive
    try:
        with (
            TestClient(create_app((model, tiny[1]))) as test_client,
            test_client.stream(
                "POST",
                "/v1/chat/completions",
                json={"messages": MESSAGES, "max_tokens": 3, "stream": True},
            ) as answer,
        ):
            assert answer.headers["cache-control"] == "no-cache"
            lines = answer.iter_lines()
            assert next(lines).startswith("data: ")
            while (line := next(lines)) != ": ping":
                assert line == "", line
            model.gate.set()
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    finally:
        model.gate.set()


def test_a_stream_failing_midway_ends_with_a_safe_error_event(tiny, faulty, caplog):
    model = faulty(fails=lambda call, input_ids: call == 3)
    with (
        TestClient(create_app((model, tiny[1]))) as test_client,
        test_client.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 20, "stream": True},
        ) as answer,
    ):
        events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert answer.status_code == 200 and "[DONE]" not in events
    assert any(json.loads(event)["choices"][0]["delta"].get("content") for event in events[:-1])
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and error["message"] and "secret" not in events[-1]
    assert "injected fault: secret" in caplog.text  # the cause is in the server's log


def test_v1_answers_and_errors_say_their_json_is_utf8(tiny_server):
    """/v1's answers and errors name charset=utf-8, as Windows PowerShell 5.1 needs."""
    url = f"{tiny_server.url}/v1"
    answers = [
        requests.post(f"{url}/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}),
        requests.post(f"{url}/chat/completions", json={"messages": []}),
        requests.get(f"{url}/models"),
    ]
    assert [answer.status_code for answer in answers] == [200, 400, 200]
    for answer in answers:
        assert answer.headers["content-type"] == "application/json; charset=utf-8"

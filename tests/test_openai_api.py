import json
import threading
import time

import openai
import pytest
import requests

from tutorial_api import chat, create_app, start_server
from tutorial_api.chat import build_messages

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "给我讲一个故事"}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture
def one_slot_server(slow_tiny):
    """a server that decodes one request at a time and lets one more wait, on the slowed tiny model."""
    server = start_server(create_app(slow_tiny, max_batch_size=1, max_waiting=1), port=0, log_level="warning")
    yield server
    server.stop()


def reference(tiny, max_new_tokens):
    system, user = MESSAGES[0]["content"], MESSAGES[1]["content"]
    return chat(*tiny, user, system=system, max_new_tokens=max_new_tokens, temperature=0)[0]


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["tiny-qwen2"]


def test_completion_with_the_official_client(client, tiny):
    completion = client.chat.completions.create(model="any-name", messages=MESSAGES, max_tokens=10, temperature=0)
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip() == reference(tiny, 10)
    assert choice.finish_reason == "length"
    _, tokenizer = tiny
    prompt_tokens = len(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"])
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, 10)
    assert completion.usage.total_tokens == prompt_tokens + 10
    assert completion.model == "tiny-qwen2" and completion.id.startswith("chatcmpl-")


def test_max_completion_tokens_is_the_newer_name(client):
    completion = client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4


def test_streaming_with_the_official_client(client, tiny):
    chunks = list(client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() == reference(tiny, 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert not any("\ufffd" in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_stream_without_usage_ends_with_done(tiny_server):
    with requests.post(f"{tiny_server.url}/v1/chat/completions", stream=True, json={
            "messages": MESSAGES, "max_tokens": 3, "stream": True}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_stop_and_seed(client, tiny):
    full = reference(tiny, 16)
    stop_word = full.split()[2]
    stopped = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0, stop=stop_word)
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_word not in stopped.choices[0].message.content

    def sample(seed):
        return client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              seed=seed).choices[0].message.content

    assert sample(11) == sample(11) != sample(12)


BAD_REQUESTS = {
    "no-messages": ({"messages": []}, "messages"),
    "last-message-not-from-user": ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    "unknown-role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "temperature-too-high": ({"messages": MESSAGES, "temperature": 3}, "temperature"),
    "top-p-zero": ({"messages": MESSAGES, "top_p": 0}, "top_p"),
    "max-tokens-zero": ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    "several-answers": ({"messages": MESSAGES, "n": 2}, "n"),
    "five-stop-strings": ({"messages": MESSAGES, "stop": list("abcde")}, "stop"),
    "negative-seed": ({"messages": MESSAGES, "seed": -1}, "seed"),
    "temperature-as-bool": ({"messages": MESSAGES, "temperature": False}, "temperature"),
    "longer-than-context": ({"messages": [{"role": "user", "content": "word " * 1100}]}, "messages"),
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
        answer = requests.post(f"{tiny_server.url}/v1/chat/completions", data=raw,
                               headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"
    missing = requests.get(f"{tiny_server.url}/v1/nothing-here")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_a_full_queue_answers_503_with_retry_after(one_slot_server):
    url = f"{one_slot_server.url}/v1/chat/completions"
    long = {"messages": MESSAGES, "max_tokens": 900, "temperature": 0, "stream": True}  # greedy: never ends early
    with requests.post(url, json=long, stream=True) as running, requests.post(url, json=long, stream=True) as waiting:
        lines = running.iter_lines()  # kept: a dropped iterator closes the connection, and the server cancels
        next(lines)
        deadline = time.monotonic() + 10
        while requests.get(f"{one_slot_server.url}/health").json()["active_requests"] < 2:
            assert time.monotonic() < deadline
        refused = requests.post(url, json={"messages": MESSAGES, "max_tokens": 2})
        assert waiting.status_code == 200
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "server_error"


def test_a_disconnect_frees_the_slot_for_the_next_request(one_slot_server, tiny):
    url = f"{one_slot_server.url}/v1/chat/completions"
    with requests.post(url, json={"messages": MESSAGES, "max_tokens": 900, "stream": True}, stream=True) as dropped:
        lines = dropped.iter_lines()
        next(lines), next(lines)
    deadline = time.monotonic() + 5
    while requests.get(f"{one_slot_server.url}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.01)
    completion = requests.post(url, json={"messages": MESSAGES, "max_tokens": 10, "temperature": 0}).json()
    assert completion["choices"][0]["message"]["content"].strip() == reference(tiny, 10)


def test_a_non_streaming_disconnect_is_cancelled_too(one_slot_server):
    url = f"{one_slot_server.url}/v1/chat/completions"
    hung_up = threading.Thread(target=lambda: pytest.raises(
        requests.Timeout, requests.post, url, json={"messages": MESSAGES, "max_tokens": 900}, timeout=0.5))
    hung_up.start()
    hung_up.join()
    deadline = time.monotonic() + 5
    while requests.get(f"{one_slot_server.url}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.01)


def test_the_tutorial_endpoint_shares_the_engine(tiny_server, client, tiny):
    answer = requests.post(tiny_server.url, json={"prompt": "给我讲一个故事", "history": [], "temperature": 0,
                                             "max_length": 60}).json()
    expected = chat(*tiny, "给我讲一个故事", max_length=60, temperature=0)[0]
    assert answer["response"] == expected
    assert build_messages("给我讲一个故事")[-1]["content"] == answer["history"][0][0]

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi.testclient import TestClient
from transformers import Qwen2ForCausalLM

from tutorial_api import chat, create_app, load_model, start_server
from tutorial_api.models import choose_dtype


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app("tiny-qwen2")) as client:
        yield client


def test_the_tutorials_requests_call_gets_the_four_fields(client):
    data = {"prompt": "你好", "history": [], "max_length": 80, "temperature": 0}
    answer = client.post(
        "/", headers={"Content-Type": "application/json"}, content=json.dumps(data)
    )
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200
    assert body["history"] == [["你好", body["response"]]]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", body["time"])


def test_history_is_carried_forward(client):
    first = client.post(
        "/", json={"prompt": "你好", "history": [], "max_length": 60, "temperature": 0}
    ).json()
    second = client.post(
        "/",
        json={
            "prompt": "给这个故事起一个标题",
            "history": first["history"],
            "max_length": 90,
            "temperature": 0,
        },
    ).json()
    assert second["history"] == first["history"] + [["给这个故事起一个标题", second["response"]]]


def test_health_names_the_model_and_the_dtype_it_computes_in(client):
    answer = client.get("/health")
    assert answer.status_code == 200
    auto = str(choose_dtype("auto", "cpu")).removeprefix("torch.")
    assert answer.json() == {
        "status": "ok",
        "model": "tiny-qwen2",
        "dtype": auto,
        "active_requests": 0,
    }
    with TestClient(create_app("tiny-qwen2", dtype="float16")) as half:
        assert half.get("/health").json()["dtype"] == "float16"


class BrokenTemplate:
    """a tokenizer whose chat template fails: an error no route expects."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        raise RuntimeError("template exploded: secret")

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_an_unexpected_error_answers_500_in_each_apis_shape(tiny, caplog):
    with TestClient(create_app((tiny[0], BrokenTemplate(tiny[1])))) as broken:
        tutorial = broken.post("/", json={"prompt": "hi"})
        openai = broken.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
    assert tutorial.status_code == 500 and set(tutorial.json()) == {
        "status",
        "field",
        "message",
        "time",
    }
    assert openai.status_code == 500 and openai.json()["error"]["type"] == "server_error"
    for answer in (tutorial, openai):
        assert "secret" not in answer.text and "X-Request-ID" in answer.text
        assert f"Request {answer.headers['X-Request-ID']} failed" in caplog.text
    assert "template exploded: secret" in caplog.text


def test_health_is_503_after_failed_steps_and_200_once_it_works(tiny, faulty):
    """Health is 503 with a reason after failed steps, and 200 once the engine generates again."""
    model = faulty(fails=lambda call, input_ids: call <= 3)
    with TestClient(create_app((model, tiny[1]))) as client:
        for _ in range(3):
            failed = client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            )
            assert failed.status_code == 500 and "secret" not in failed.text
        lost = client.get("/health")
        assert (
            lost.status_code == 503
            and lost.json()["status"] == "unavailable"
            and "failed" in lost.json()["reason"]
        )
        assert client.post("/", json={"prompt": "hi", "max_length": 40}).status_code == 200
        assert client.get("/health").status_code == 200


def test_a_dead_worker_answers_503_everywhere(tiny, faulty):
    """A dead worker answers 503 on /health and on every request."""

    class WorkerKilled(BaseException):
        """an error no step guard catches."""

    model = faulty(fails=lambda call, input_ids: True, error=WorkerKilled())
    with TestClient(create_app((model, tiny[1]))) as client:
        first = client.post("/", json={"prompt": "hi"})
        health = client.get("/health")
        later = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
    assert first.status_code == 503 and "restart the server" in first.json()["message"]
    assert health.status_code == 503 and "restart the server" in health.json()["reason"]
    assert later.status_code == 503 and "restart the server" in later.json()["error"]["message"]


BAD_REQUESTS = {
    "missing-prompt": ({"history": []}, "prompt"),
    "empty-prompt": ({"prompt": ""}, "prompt"),
    "blank-prompt": ({"prompt": " \n "}, "prompt"),
    "prompt-not-text": ({"prompt": 42}, "prompt"),
    "history-not-a-list": ({"prompt": "hi", "history": "earlier"}, "history"),
    "history-pair-too-short": ({"prompt": "hi", "history": [["only the question"]]}, "history[0]"),
    "history-pair-too-long": ({"prompt": "hi", "history": [["a", "b", "c"]]}, "history[0]"),
    "history-pair-not-text": ({"prompt": "hi", "history": [["a", 1]]}, "history[0][1]"),
    "top-p-zero": ({"prompt": "hi", "top_p": 0}, "top_p"),
    "top-p-above-one": ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    "negative-temperature": ({"prompt": "hi", "temperature": -3}, "temperature"),
    "temperature-too-high": ({"prompt": "hi", "temperature": 9}, "temperature"),
    "temperature-as-text": ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    "temperature-as-bool": ({"prompt": "hi", "temperature": True}, "temperature"),
    "max-length-zero": ({"prompt": "hi", "max_length": 0}, "max_length"),
    "max-length-fractional": ({"prompt": "hi", "max_length": 2.5}, "max_length"),
    "max-length-as-text": ({"prompt": "hi", "max_length": "100"}, "max_length"),
    "max-length-beyond-context": ({"prompt": "hi", "max_length": 100_000}, "max_length"),
    "max-length-below-prompt": ({"prompt": "hi", "max_length": 5}, "max_length"),
    "prompt-beyond-context": ({"prompt": "word " * 1100}, "prompt"),
    "body-is-a-list": ([{"prompt": "hi"}], "body"),
}


@pytest.mark.parametrize(("body", "field"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_a_422_naming_the_field(client, body, field):
    answer = client.post("/", json=body)
    assert answer.status_code == 422
    error = answer.json()
    assert error["status"] == 422 and error["field"] == field
    assert field.split("[")[0] in error["message"] or field == "body"


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"prompt": "hi"', b"", b'{"prompt": "\x80"}'],
    ids=["text", "truncated", "empty", "not-utf-8"],
)
def test_a_body_that_is_not_json_gets_a_422(client, raw):
    answer = client.post("/", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422
    assert answer.json()["field"] == "body"


def test_openapi_documents_the_error_shape(client):
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/"]["post"]["responses"]
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatError")
    assert set(schema["components"]["schemas"]["ChatRequest"]["properties"]) == {
        "prompt",
        "history",
        "max_length",
        "top_p",
        "temperature",
    }


def test_health_answers_while_a_generation_runs(tiny_server):
    long_request = threading.Thread(
        target=requests.post,
        args=(tiny_server.url,),
        kwargs={"json": {"prompt": "Tell me a story", "temperature": 0}},
    )
    long_request.start()
    deadline = time.monotonic() + 10
    while not requests.get(f"{tiny_server.url}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "the generation never started"
    latencies = []
    for _ in range(10):
        started = time.perf_counter()
        assert requests.get(f"{tiny_server.url}/health").status_code == 200
        latencies.append(time.perf_counter() - started)
    still_generating = long_request.is_alive()
    long_request.join()
    assert still_generating, "the generation ended before /health was measured; make it longer"
    assert max(latencies) < 0.5


class GatedTemplate:
    """A tokenizer whose chat template, for a prompt longer than `long`, waits at `gate` until the
    test opens it: a slow tokenization that the test controls. `inside` is true while a call waits
    there.
    """

    def __init__(self, tokenizer, long=10_000):
        self._tokenizer, self._long = tokenizer, long
        self.gate, self.entered = threading.Event(), threading.Event()
        self.inside = False

    def apply_chat_template(self, messages, *args, **kwargs):
        if len(messages[-1]["content"]) > self._long:
            self.inside = True
            self.entered.set()
            self.gate.wait(
                60
            )  # bounded: where tokenizing blocks the event loop, the test fails instead of hanging
            self.inside = False
        return self._tokenizer.apply_chat_template(messages, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


BIG = "word " * 190_000  # just under the default max_body_bytes of 1 MB

TOKENIZING_ROUTES = {
    "tutorial": ("/", {"prompt": BIG}, 422, lambda error: error["field"] == "prompt"),
    "openai": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": BIG}]},
        400,
        lambda error: error["error"]["param"] == "messages",
    ),
    "tokenize": (
        "/tokenize",
        {"messages": [{"role": "user", "content": BIG}]},
        200,
        lambda counted: counted["count"] > counted["max_model_len"],
    ),
}


@pytest.mark.parametrize(
    ("path", "body", "status", "check"), TOKENIZING_ROUTES.values(), ids=TOKENIZING_ROUTES.keys()
)
def test_health_answers_while_a_long_prompt_is_tokenized(tiny, path, body, status, check):
    tokenizer = GatedTemplate(tiny[1])
    server = start_server(create_app((tiny[0], tokenizer)), port=0, log_level="warning")
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(requests.post, server.url + path, json=body, timeout=120)
            assert tokenizer.entered.wait(60), "the long prompt never reached the chat template"
            health = requests.get(f"{server.url}/health", timeout=120)
            assert tokenizer.inside, (
                "/health answered only once the long prompt's tokenization had ended"
            )
            assert health.status_code == 200
            tokenizer.gate.set()
            assert answer.result().status_code == status and check(answer.result().json())
    finally:
        tokenizer.gate.set()
        server.stop()


def test_concurrent_requests_get_their_own_answers():
    """In fp32, where a row's logits in a padded batch equal its logits alone; bf16 rounds them
    differently with the batch's shape, enough to flip the tiny random model's near-tied greedy
    choices (and, now and then, SmolLM2's).
    """
    model = load_model("tiny-qwen2", dtype="float32")
    prompts = [f"Question number {n}" for n in range(6)]
    expected = {p: chat(*model, p, max_length=70, temperature=0)[0] for p in prompts}
    server = start_server(create_app(model), port=0, log_level="warning")

    def ask(prompt):
        return requests.post(
            server.url, json={"prompt": prompt, "max_length": 70, "temperature": 0}
        ).json()

    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
    finally:
        server.stop()
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer["history"] == [[prompt, expected[prompt]]]


def test_an_already_loaded_model_can_be_served(tiny):
    with TestClient(create_app(tiny)) as client:
        answer = client.post(
            "/", json={"prompt": "你好", "max_length": 60, "temperature": 0}
        ).json()
        assert answer["response"] == chat(*tiny, "你好", max_length=60, temperature=0)[0]
        assert client.get("/health").json()["model"] == "Qwen2ForCausalLM"


def test_a_model_with_its_own_chat_is_served_on_post_root(tiny):
    """A model with its own chat is served on the tutorial endpoint."""

    class QwenWithOwnChat(Qwen2ForCausalLM):
        """Qwen-7B-Chat's remote code: model.chat with (query, response) tuples."""

        def chat(self, tokenizer, query, history, **options):
            return f"echo: {query}", [*history, (query, f"echo: {query}")]

    with TestClient(create_app((QwenWithOwnChat(tiny[0].config), tiny[1]))) as client:
        answer = client.post("/", json={"prompt": "你好", "history": [["a", "b"]]}).json()
        assert answer["history"] == [["a", "b"], ["你好", "echo: 你好"]]
        refused = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"


def test_cross_origin_calls_are_off_by_default(client):
    preflight = client.options(
        "/", headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cross_origin_calls_only_from_the_configured_origins():
    """Cross-origin calls come only from the configured origins."""
    client = TestClient(create_app("tiny-qwen2", cors_origins=["http://localhost:3000"]))

    def preflight(origin):
        return client.options(
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )

    allowed = preflight("http://localhost:3000")
    assert (
        allowed.status_code == 200
        and allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    )
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert preflight("http://elsewhere.example").status_code == 400
    models = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert "x-request-id" in models.headers["access-control-expose-headers"].lower()


def test_a_full_queue_answers_503_on_the_tutorial_endpoint(slow_tiny, decoding):
    server = start_server(
        create_app(slow_tiny, max_batch_size=1, max_waiting=1), port=0, log_level="warning"
    )
    long = {
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    try:
        with (
            requests.post(f"{server.url}/v1/chat/completions", json=long, stream=True) as running,
            ThreadPoolExecutor(1) as pool,
        ):
            lines = decoding(running)  # noqa: F841 - kept: dropping it would hang up, and the server would cancel
            # The first request is decoding: the next one waits, and one more finds the queue full.
            pool.submit(
                requests.post,
                server.url,
                json={"prompt": "Tell me a story", "temperature": 0},
                timeout=3,
            )
            deadline = time.monotonic() + 10
            while requests.get(f"{server.url}/health").json()["active_requests"] < 2:
                assert time.monotonic() < deadline
            refused = requests.post(server.url, json={"prompt": "hi"})
    finally:
        server.stop()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["status"] == 503 and "busy" in refused.json()["message"]

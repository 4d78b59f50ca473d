"""The kit in front of an OpenAI-compatible server: a kit on the tiny model as the upstream of a kit
in upstream mode, and `transformers serve`, a server no one here wrote.
"""

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import requests

from tutorial_api import create_app, start_server
from tutorial_api import upstream as upstream_module
from tutorial_api.upstream import Upstream, UpstreamChat

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def wait_until(condition, what: str, timeout: float = 20.0):
    """poll `condition` until it holds; the bound only stops a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


class Kit:
    """a kit server on loopback and its app, to read its engine."""

    def __init__(self, app):
        self.app = app
        self.server = start_server(app, port=0, log_level="warning")
        self.url = self.server.url

    @property
    def engine(self):
        return self.app.state.engine


@pytest.fixture
def kits():
    """Start kits: `kits(model_or_None, **settings)`; an upstream's URL goes in `upstream`. Stopped
    after the test.
    """
    started = []

    def start(model=None, **settings):
        started.append(Kit(create_app(model, **settings)))
        return started[-1]

    yield start
    for kit in reversed(started):
        kit.server.stop()


@pytest.fixture(scope="module")
def upstream(slow_tiny):
    """The tiny model, slowed, served by a kit: the upstream most tests put a kit in front of."""
    kit = Kit(create_app(slow_tiny))
    yield kit
    kit.server.stop()


@pytest.fixture(scope="module")
def front(upstream):
    """a kit in upstream mode in front of `upstream`, with default settings."""
    kit = Kit(create_app(upstream=f"{upstream.url}/v1"))
    yield kit
    kit.server.stop()


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.INFO, logger="tutorial_api.requests")
    return lambda path: [
        record.getMessage()
        for record in caplog.records
        if record.name == "tutorial_api.requests" and f" path={path} " in record.getMessage()
    ]


def test_no_model_is_loaded_and_the_upstreams_is_served(front, upstream):
    """No model is loaded, and the upstream's first model is served."""
    assert isinstance(front.engine, Upstream) and not hasattr(front.engine, "tokenizer")
    served = upstream.app.state.model_name
    assert front.engine.model == served == front.app.state.model_name
    assert requests.get(f"{front.url}/v1/models").json()["data"][0]["id"] == served
    health = requests.get(f"{front.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    docs = requests.get(f"{front.url}/docs")
    assert (
        docs.status_code == 200 and "https://" not in docs.text
    )  # offline docs, as without an upstream


def test_post_root_answers_through_the_upstream(front, upstream, log_lines):
    """The tutorial's POST answers through the upstream, with the same token counts."""
    answer = requests.post(
        f"{front.url}/",
        json={"prompt": "你好", "history": [["Hi", "Hello!"]], "max_length": 60, "temperature": 0},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == 200 and body["history"] == [
        ["Hi", "Hello!"],
        ["你好", body["response"]],
    ]
    # max_length keeps its meaning: the upstream counted the prompt, the answer had the rest.
    upstream_line = next(line for line in log_lines(CHAT) if "finish=length" in line)
    prompt = int(upstream_line.split("prompt_tokens=")[1].split()[0])
    completion = int(upstream_line.split("completion_tokens=")[1].split()[0])
    assert prompt + completion == 60
    assert (
        f"prompt_tokens={prompt} completion_tokens={completion} finish=length" in log_lines("/")[-1]
    )


def test_max_length_is_checked_against_the_upstreams_context(front, upstream, log_lines):
    """max_length is checked against the upstream's context before anything is generated."""
    too_long = requests.post(f"{front.url}/", json={"prompt": "Hello", "max_length": 5000})
    assert too_long.status_code == 422 and too_long.json()["field"] == "max_length"
    assert "1024" in too_long.json()["message"]
    assert not log_lines(CHAT)


def test_bad_input_is_refused_before_the_upstream_is_called(kits):
    # No server listens upstream: an answer other than 502 was given before any call.
    front = kits(upstream="http://127.0.0.1:9/v1", upstream_model="any")
    assert requests.post(f"{front.url}/", json={"prompt": ""}).status_code == 422
    refused = requests.post(f"{front.url}{CHAT}", json={"messages": HELLO, "temperature": 5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"
    refused = requests.post(f"{front.url}{CHAT}", json={"messages": HELLO, "logprobs": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


def test_the_openai_client_streams_through_the_upstream(front, log_lines):
    """The OpenAI client streams through the upstream, with usage."""
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="whatever",
            messages=HELLO,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    direct = client.chat.completions.create(model="x", messages=HELLO, max_tokens=6, temperature=0)
    assert direct.choices[0].message.content == text  # greedy: the same answer, streamed or not
    assert "completion_tokens=6 finish=length" in log_lines(CHAT)[-1]


def test_a_stream_without_usage_asked_gets_none(front, log_lines):
    """A stream without usage asked gets none, and the log has the upstream's counts."""
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="x", messages=HELLO, max_tokens=5, temperature=0, stream=True
        )
    )
    # The kit asked the upstream for the usage, for its log, and kept it from a client that did not
    # ask.
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    wait_until(lambda: len(log_lines(CHAT)) == 2, "both servers' log lines")
    upstream_line, front_line = (
        line.split(" prompt_tokens=")[1].split(" seconds=")[0] for line in log_lines(CHAT)
    )
    assert front_line == upstream_line and "completion_tokens=5 finish=length" in front_line


def test_a_stream_broken_off_upstream_ends_with_an_error_event(kits, slow_tiny):
    """A stream the upstream breaks off ends with an OpenAI error event."""
    upstream = kits(slow_tiny, request_timeout=0.5)  # its stream ends in its own error event
    front = kits(upstream=f"{upstream.url}/v1")
    body = {"messages": HELLO, "max_tokens": 900, "stream": True}
    with requests.post(f"{front.url}{CHAT}", json=body, stream=True) as streamed:
        events = [
            json.loads(line[6:])
            for line in streamed.iter_lines(decode_unicode=True)
            if line.startswith("data: ")
        ]
    assert streamed.status_code == 200 and any(event.get("choices") for event in events[:-1])
    assert (
        events[-1]["error"]["code"] == "upstream_error"
        and "longer than" in events[-1]["error"]["message"]
    )
    assert front.engine.active == 0


def test_a_hang_up_frees_the_upstreams_slot_streaming(front, upstream, decoding, log_lines):
    """A client that hangs up frees the upstream's slot, streaming."""
    body = {"messages": HELLO, "max_tokens": 1000, "stream": True}
    with requests.post(f"{front.url}{CHAT}", json=body, stream=True) as streamed:
        lines = decoding(streamed)  # noqa: F841 - kept: dropping it would hang up before the checks
        assert upstream.engine.active == 1 and front.engine.active == 1
    wait_until(
        lambda: upstream.engine.active == 0 and front.engine.active == 0,
        "the upstream's slot freed",
    )
    wait_until(lambda: len(log_lines(CHAT)) == 2, "both servers' log lines")
    assert all("cancelled=yes" in line for line in log_lines(CHAT))


def test_a_hang_up_frees_the_upstreams_slot_without_streaming(front, upstream, log_lines):
    """A client that hangs up frees the upstream's slot, without streaming."""

    def hang_up():
        # the client gives up, and closes its connection
        with contextlib.suppress(requests.ReadTimeout):
            requests.post(
                f"{front.url}/", json={"prompt": "Hello", "max_length": 1000}, timeout=(5, 0.5)
            )

    caller = threading.Thread(target=hang_up)
    caller.start()
    wait_until(lambda: upstream.engine.active == 1, "the request reaching the upstream")
    caller.join()
    wait_until(lambda: upstream.engine.active == 0, "the upstream's slot freed")
    wait_until(lambda: log_lines(CHAT), "the upstream's log line")
    assert "cancelled=yes" in log_lines(CHAT)[-1]


def test_an_upstream_that_stops_gives_502_and_health_503(kits, tiny):
    """An upstream that stops gives 502 in each API's shape, and /health 503, never its URL."""
    upstream = kits(tiny)
    # A base URL may carry a user and password: callers see neither, nor where it is.
    host = upstream.url.removeprefix("http://")
    front = kits(upstream=f"http://teacher:s3cret@{host}/v1")
    assert (
        requests.post(f"{front.url}/", json={"prompt": "Hello", "max_length": 40}).status_code
        == 200
    )
    upstream.server.stop()
    tutorial = requests.post(f"{front.url}/", json={"prompt": "Hello"})
    assert tutorial.status_code == 502 and "cannot be reached" in tutorial.json()["message"]
    openai_shape = requests.post(f"{front.url}{CHAT}", json={"messages": HELLO})
    assert (
        openai_shape.status_code == 502
        and openai_shape.json()["error"]["code"] == "upstream_unreachable"
    )
    health = requests.get(f"{front.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert "cannot be reached" in health.json()["reason"]
    for answer in (tutorial, openai_shape, health):
        assert "s3cret" not in answer.text and host not in answer.text
    front.server.stop()
    assert front.engine.client.is_closed  # the one pooled client lives as long as the server


@pytest.mark.parametrize("fresh_seconds, upstream_checks", [(60.0, 1), (0.0, 5)])
def test_health_asks_the_upstream_once_while_its_answer_is_fresh(
    kits, upstream, log_lines, monkeypatch, fresh_seconds, upstream_checks
):
    monkeypatch.setattr(upstream_module, "_HEALTH_FRESH_SECONDS", fresh_seconds)
    front = kits(upstream=f"{upstream.url}/v1")
    for _ in range(5):
        assert requests.get(f"{front.url}/health").json()["status"] == "ok"
    # Both kits log to the same logger: the front's five lines, and one for each check the upstream
    # answered.
    wait_until(
        lambda: len(log_lines("/health")) >= 5 + upstream_checks, "the upstream's health log lines"
    )
    assert len(log_lines("/health")) == 5 + upstream_checks


def test_an_overloaded_upstream_gives_503_with_its_retry_after(kits, slow_tiny, decoding):
    upstream = kits(slow_tiny, max_batch_size=1, max_waiting=1)
    front = kits(upstream=f"{upstream.url}/v1")
    long = {"messages": HELLO, "max_tokens": 1000, "stream": True}
    with (
        requests.post(f"{upstream.url}{CHAT}", json=long, stream=True) as running,
        requests.post(f"{upstream.url}{CHAT}", json=long, stream=True),
    ):
        lines = decoding(running)  # noqa: F841 - kept: dropping it would hang up, and the upstream would cancel
        wait_until(lambda: upstream.engine.active == 2, "one request running, one waiting")
        for path, body in [("/", {"prompt": "Hello"}), (CHAT, {"messages": HELLO})]:
            refused = requests.post(f"{front.url}{path}", json=body)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "busy" in refused.json()["error"]["message"]


def test_a_slow_upstream_gives_504_and_is_cancelled(kits, upstream):
    """An upstream slower than the request timeout gives 504 and is cancelled."""
    front = kits(upstream=f"{upstream.url}/v1", request_timeout=0.5)
    for path, body in [
        ("/", {"prompt": "Hello", "max_length": 1000}),
        (CHAT, {"messages": HELLO, "max_tokens": 900}),
    ]:
        answer = requests.post(f"{front.url}{path}", json=body)
        assert answer.status_code == 504, answer.text
        wait_until(lambda: upstream.engine.active == 0, "the upstream's request cancelled")
    # A stream already under way ends with the timeout as an error event.
    with requests.post(
        f"{front.url}{CHAT}",
        json={"messages": HELLO, "max_tokens": 900, "stream": True},
        stream=True,
    ) as streamed:
        last = [
            line for line in streamed.iter_lines(decode_unicode=True) if line.startswith("data: ")
        ][-1]
    assert json.loads(last[6:])["error"]["code"] == "timeout"
    wait_until(lambda: upstream.engine.active == 0, "the upstream's streamed request cancelled")


def test_an_upstreams_4xx_is_passed_on_with_its_message(kits, tiny):
    upstream = kits(tiny, max_new_tokens=4)
    front = kits(upstream=f"{upstream.url}/v1")
    refused = requests.post(f"{front.url}{CHAT}", json={"messages": HELLO, "max_tokens": 50})
    assert refused.status_code == 400
    assert (
        refused.json()["error"]["param"] == "max_tokens"
        and "max_new_tokens" in refused.json()["error"]["message"]
    )


def test_the_upstreams_own_key_is_sent_and_a_wrong_one_is_named(kits, tiny):
    upstream = kits(tiny, api_keys=["kit:upstream-s3cret"])
    good = kits(upstream=f"{upstream.url}/v1", upstream_api_key="upstream-s3cret")
    assert (
        requests.post(f"{good.url}{CHAT}", json={"messages": HELLO, "max_tokens": 2}).status_code
        == 200
    )
    assert "upstream-s3cret" not in repr(good.app.state.settings)
    wrong = kits(upstream=f"{upstream.url}/v1", upstream_model="any", upstream_api_key="nope")
    refused = requests.post(f"{wrong.url}/", json={"prompt": "Hello"})
    assert refused.status_code == 502 and "--upstream-api-key" in refused.json()["message"]


def test_keys_and_token_limits_hold_in_front_of_the_upstream(kits, upstream):
    front = kits(upstream=f"{upstream.url}/v1", api_keys=["alice:a-key"], max_new_tokens=8)
    alice = {"Authorization": "Bearer a-key"}
    assert requests.post(f"{front.url}/", json={"prompt": "Hello"}).status_code == 401
    assert (
        requests.post(f"{front.url}{CHAT}", json={"messages": HELLO}, headers=alice).json()[
            "usage"
        ]["completion_tokens"]
        <= 8
    )
    too_many = requests.post(
        f"{front.url}{CHAT}", json={"messages": HELLO, "max_tokens": 9}, headers=alice
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    short_prompts = kits(upstream=f"{upstream.url}/v1", max_prompt_tokens=5)
    too_long = requests.post(f"{short_prompts.url}{CHAT}", json={"messages": HELLO})
    assert (
        too_long.status_code == 400 and "max_prompt_tokens" in too_long.json()["error"]["message"]
    )


def test_per_key_concurrency_holds_in_front_of_the_upstream(kits, upstream, decoding):
    front = kits(
        upstream=f"{upstream.url}/v1",
        api_keys=["alice:a-key", "bob:b-key"],
        max_concurrent_per_key=1,
    )
    alice, bob = ({"Authorization": f"Bearer {key}"} for key in ("a-key", "b-key"))
    with requests.post(
        f"{front.url}{CHAT}",
        json={"messages": HELLO, "max_tokens": 900, "stream": True},
        headers=alice,
        stream=True,
    ) as streamed:
        lines = decoding(streamed)  # noqa: F841 - kept: dropping it would hang up and free the slot
        assert (
            requests.post(f"{front.url}/", json={"prompt": "Hi"}, headers=alice).status_code == 429
        )
        assert (
            requests.post(
                f"{front.url}/", json={"prompt": "Hi", "max_length": 40}, headers=bob
            ).status_code
            == 200
        )


def test_events_split_across_reads_are_passed_on_whole():
    """Events split across reads, with CRLF line ends, are passed on whole."""
    # Servers built on sse-starlette end lines with CRLF, and any read may stop mid-event.
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "你好"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "!"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    ]
    sent = "".join(
        f"data: {json.dumps(event, ensure_ascii=False)}\r\n\r\n" for event in events
    ).encode()
    sent += b"data: [DONE]\r\n\r\n"

    async def in_pieces():
        for start in range(0, len(sent), 7):
            yield sent[start : start + 7]

    async def relayed(include_usage):
        upstream = Upstream("http://upstream.test/v1", model="m")
        upstream.client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda request: httpx.Response(200, content=in_pieces()))
        )
        async with upstream.client:
            generation = await upstream.start(UpstreamChat(HELLO, None, None))
            return b"".join(
                [events async for events in generation.relay(include_usage)]
            ), generation

    for include_usage in (False, True):
        relayed_bytes, generation = asyncio.run(relayed(include_usage))
        *received, done = relayed_bytes.decode().split("\n\n")[:-1]
        assert [json.loads(event.removeprefix("data: ")) for event in received] == events[
            : 3 + include_usage
        ]
        assert done == "data: [DONE]"
        assert (
            generation.prompt_tokens,
            generation.completion_tokens,
            generation.finish_reason,
        ) == (3, 2, "stop")


@pytest.mark.parametrize(
    ("ending", "finish_reason"),
    [
        ({"finish_reason": "stop"}, "stop"),
        ({"finish_reason": "length"}, "length"),
        ({"finish_reason": "abort"}, "error"),
        ({"finish_reason": "content_filter"}, "error"),
        ({"finish_reason": None}, "error"),
    ],
    ids=["stop", "length", "abort", "unknown", "missing"],
)
def test_only_stop_and_length_from_upstream_end_an_answer_whole(ending, finish_reason):
    """An upstream's abort, unknown or missing finish reason ends the answer with an error."""
    events = [
        {"choices": [{"delta": {"content": "你好"}, "finish_reason": None}]},
        {"choices": [{"delta": {}, **ending}]},
    ]
    sent = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"

    async def answered():
        upstream = Upstream("http://upstream.test/v1", model="m")
        upstream.client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda request: httpx.Response(200, text=sent))
        )
        async with upstream.client:
            generation = await upstream.start(UpstreamChat(HELLO, None, None))
            try:
                return await generation.text(), generation.finish_reason
            except upstream_module.UpstreamError as error:
                return str(error), generation.finish_reason

    text, reported = asyncio.run(answered())
    assert reported == finish_reason
    assert text == "你好" if finish_reason != "error" else "try again" in text


# transformers' own OpenAI-compatible server, on the tiny model saved to a folder.


@pytest.fixture(scope="module")
def transformers_serve(tiny, tmp_path_factory):
    """`transformers serve` on a free loopback port, its model forced to the tiny Qwen2 saved with
    its tokenizer.
    """
    from tutorial_api.server import bind

    command = Path(sys.executable).with_name("transformers")
    if not command.exists():
        pytest.skip("the `transformers` command is not installed beside this Python")
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny[0].save_pretrained(folder)
    tiny[1].save_pretrained(folder)
    probe = bind("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    log = tmp_path_factory.mktemp("logs") / "transformers-serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                command,
                "serve",
                str(folder),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            return requests.get(f"{url}/health", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(healthy, "transformers serve answering /health", timeout=120)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow
def test_the_kit_answers_through_transformers_serve(kits, transformers_serve, log_lines):
    front = kits(upstream=f"{transformers_serve}/v1", api_keys=["alice:a-key"])
    key = {"Authorization": "Bearer a-key"}
    answer = requests.post(
        f"{front.url}/", json={"prompt": "你好", "max_length": 5, "temperature": 0}, headers=key
    )
    assert answer.status_code == 200 and answer.json()["history"][0][0] == "你好"
    # Without POST /tokenize upstream, max_length bounds the answer alone: documented in the README.
    assert "completion_tokens=5 finish=length" in log_lines("/")[-1]
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="a-key")
    chunks = list(
        client.chat.completions.create(
            model="x",
            messages=HELLO,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].usage.completion_tokens == 4
    # Its usage rides on the chunk with the finish reason: a client that did not ask gets that chunk
    # without it.
    plain = list(
        client.chat.completions.create(model="x", messages=HELLO, max_tokens=4, stream=True)
    )
    assert (
        all(chunk.usage is None for chunk in plain)
        and plain[-1].choices[0].finish_reason == "length"
    )
    assert "completion_tokens=4 finish=length" in log_lines(CHAT)[-1]
    assert requests.get(f"{front.url}/health").json()["status"] == "ok"


@pytest.mark.slow
def test_a_hang_up_closes_the_request_to_transformers_serve(kits, transformers_serve, decoding):
    """A client that hangs up closes the request to transformers serve."""
    front = kits(upstream=f"{transformers_serve}/v1")
    with requests.post(
        f"{front.url}{CHAT}",
        json={"messages": HELLO, "max_tokens": 500, "stream": True},
        stream=True,
    ) as streamed:
        lines = decoding(streamed)  # noqa: F841 - kept: dropping it would hang up before the check
        assert front.engine.active == 1
    wait_until(lambda: front.engine.active == 0, "the upstream request closed")
    # The upstream, answered mid-stream before, still answers the next request.
    assert (
        requests.post(f"{front.url}{CHAT}", json={"messages": HELLO, "max_tokens": 2}).status_code
        == 200
    )

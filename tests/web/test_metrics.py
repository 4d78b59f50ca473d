"""/metrics, parsed by prometheus_client's own text parser, its counters moving as requests come."""

import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tutorial_api import create_app, start_server

KEY = "metrics-key"
CHAT = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, "temperature": 0}


def scrape(server) -> dict:
    """Return every sample of /metrics, keyed by its name and its labels."""
    answer = requests.get(f"{server.url}/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """Return one sample's value; 0 for a counter not yet seen with these labels."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_until(server, condition, seconds=60) -> dict:
    """Scrape until `condition(samples)` holds; fail after `seconds` (a hang, not a slow server)."""
    deadline = time.monotonic() + seconds
    while not condition(samples := scrape(server)):
        assert time.monotonic() < deadline, "the gauges never got there"
        time.sleep(0.05)
    return samples


@pytest.fixture(scope="module")
def server():
    server = start_server(
        create_app("tiny-qwen2", api_keys=[f"student:{KEY}"]), port=0, log_level="warning"
    )
    yield server
    server.stop()


def chat(server, key=KEY, **changes):
    return requests.post(
        f"{server.url}/v1/chat/completions",
        json={**CHAT, **changes},
        headers={"Authorization": f"Bearer {key}"},
    )


def test_requests_are_counted_by_route_and_status(server):
    before = scrape(server)
    assert chat(server).status_code == 200
    assert chat(server, key="wrong").status_code == 401
    requests.get(f"{server.url}/no/such/page/{time.time()}")
    after = scrape(server)
    chats = "/v1/chat/completions"
    assert moved(before, after, "tutorial_api_requests_total", path=chats, status="200") == 1
    assert moved(before, after, "tutorial_api_requests_total", path=chats, status="401") == 1
    # Any unknown path is one label value: a client cannot add series at will.
    assert moved(before, after, "tutorial_api_requests_total", path="other", status="404") == 1


def test_tokens_and_cache_hits_equal_the_usage_answered(server):
    before = scrape(server)
    history = [{"role": "user", "content": "请用一句话介绍你自己。"}]
    usages = [chat(server, messages=history).json()["usage"] for _ in range(2)]
    after = scrape(server)
    assert moved(before, after, "tutorial_api_prompt_tokens_total") == sum(
        usage["prompt_tokens"] for usage in usages
    )
    assert moved(before, after, "tutorial_api_completion_tokens_total") == sum(
        usage["completion_tokens"] for usage in usages
    )
    cached = [usage["prompt_tokens_details"]["cached_tokens"] for usage in usages]
    assert cached[1] > 0  # the same conversation again: its prompt comes from the prefix cache
    assert moved(before, after, "tutorial_api_prompt_tokens_cached_total") == sum(cached)


def test_latency_histograms_count_chats_and_streamed_first_tokens(server):
    before = scrape(server)
    assert chat(server).status_code == 200
    streamed = chat(server, stream=True)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    after = scrape(server)
    first_token, answer = (
        "tutorial_api_time_to_first_token_seconds",
        "tutorial_api_request_duration_seconds",
    )
    assert moved(before, after, f"{first_token}_count") == 1  # streamed answers only
    assert moved(before, after, f"{answer}_count") == 2
    assert moved(before, after, f"{answer}_bucket", le="+Inf") == 2
    assert 0 < moved(before, after, f"{first_token}_sum") <= moved(before, after, f"{answer}_sum")
    assert moved(before, after, "tutorial_api_finished_total", reason="length") == 2


def test_running_and_waiting_follow_the_batch(slow_tiny, decoding):
    server = start_server(create_app(slow_tiny, max_batch_size=1), port=0, log_level="warning")
    long = {**CHAT, "max_tokens": 900, "stream": True}
    try:
        with requests.post(f"{server.url}/v1/chat/completions", json=long, stream=True) as first:
            lines = decoding(first)  # noqa: F841 - kept: dropping it would hang up
            waiter = threading.Thread(
                target=requests.post,
                args=(f"{server.url}/v1/chat/completions",),
                kwargs={"json": {**CHAT, "max_tokens": 2}},
            )
            waiter.start()
            samples = scrape_until(
                server, lambda samples: value(samples, "tutorial_api_requests_waiting") == 1
            )
            assert value(samples, "tutorial_api_requests_running") == 1
            assert value(samples, "tutorial_api_requests_active") == 2
        waiter.join()
        samples = scrape_until(
            server, lambda samples: value(samples, "tutorial_api_requests_active") == 0
        )
        assert value(samples, "tutorial_api_requests_running") == 0
        assert value(samples, "tutorial_api_requests_waiting") == 0
        assert value(samples, "tutorial_api_finished_total", reason="cancelled") == 1
    finally:
        server.stop()


def test_each_app_counts_only_its_own_requests(server, tiny):
    other = start_server(create_app(tiny), port=0, log_level="warning")
    try:
        before = scrape(server)
        assert requests.get(f"{other.url}/health").status_code == 200
        assert (
            value(scrape(other), "tutorial_api_requests_total", path="/health", status="200") == 1
        )
        assert (
            moved(
                before, scrape(server), "tutorial_api_requests_total", path="/health", status="200"
            )
            == 0
        )
    finally:
        other.stop()


@pytest.mark.slow
def test_an_unreachable_upstream_counts_as_an_upstream_error(tiny):
    upstream = start_server(create_app(tiny), port=0, log_level="warning")
    kit = start_server(create_app(upstream=f"{upstream.url}/v1"), port=0, log_level="warning")
    try:
        assert value(scrape(kit), "tutorial_api_upstream_errors_total") == 0
        upstream.stop()
        refused = requests.post(f"{kit.url}/v1/chat/completions", json=CHAT)
        assert refused.status_code == 502
        assert value(scrape(kit), "tutorial_api_upstream_errors_total") == 1
    finally:
        kit.stop()


def test_the_dashboard_shows_metrics_figures_and_no_prompt(serve):
    server = serve(api_keys=["Ms Wang (teacher):t-key", f"alice:{KEY}"])
    question = "今天的作业是什么？"
    assert chat(server, messages=[{"role": "user", "content": question}]).status_code == 200
    teacher = {"Authorization": "Bearer t-key"}
    dashboard = requests.get(f"{server.url}/dashboard/data", headers=teacher)
    samples = scrape(server)
    figures = dashboard.json()
    for name in ("tutorial_api_completion_tokens_total", "tutorial_api_prompt_tokens_total"):
        assert figures["samples"][name][0]["value"] == value(samples, name) > 0
    alice = figures["keys"]["alice"]
    assert alice["requests"] == 1 and alice["completion_tokens"] > 0
    assert "Ms Wang" not in figures["keys"]  # the dashboard's own polls are not counted per key
    assert question not in dashboard.text and KEY not in dashboard.text

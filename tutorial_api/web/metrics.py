"""GET /metrics: the server's counters in Prometheus' text format, from `prometheus_client`.

The request log middleware feeds them as each request ends; the gauges are read when scraped. Each
app has a registry of its own, so several apps in one process (tests, a notebook) never share one.
The counters hold no prompt text and no key.
"""

import re
import time
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from tutorial_api.backend import FinishReason, RequestStatus

# An event that carries answer text: the first one leaving ends the time to the first token.
_TEXT = re.compile(rb'"content"\s*:\s*"[^"]')
# Seconds: a tiny model answers in milliseconds, a class on two cores waits tens of seconds.
_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ANSWER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
# A path no route matched is counted as this, so a client cannot add label values at will.
UNMATCHED = "other"
# The teacher's pages fetch their data here: those polls are no student's work.
DASHBOARD_DATA = "/dashboard/data"
SHEET_DATA = "/sheet/data"


@dataclass
class KeyTally:
    """One key's requests so far, for the teacher's dashboard (never in /metrics: names stay)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_seen: float = 0.0  # time.time() of its last request's end


class Metrics:
    """One app's counters and histograms, fed by the request log as each request ends.

    `in_flight` holds the state of every request under way (its key's name, its generation): the
    running and waiting gauges and the teacher's dashboard read it; `per_key` tallies each key.
    """

    def __init__(self, app: FastAPI, *, upstream: bool = False):
        self.app = app
        self.upstream = upstream
        self.registry = CollectorRegistry()
        self.in_flight: dict[str, dict] = {}  # request id -> the request's state
        self.per_key: dict[str, KeyTally] = {}
        registry = self.registry
        self.requests = Counter(
            "tutorial_api_requests",
            "Requests answered, by route and HTTP status.",
            ["path", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tutorial_api_prompt_tokens", "Prompt tokens of the answered chats.", registry=registry
        )
        self.cached_tokens = Counter(
            "tutorial_api_prompt_tokens_cached",
            "Prompt tokens reused from the prefix cache instead of computed.",
            registry=registry,
        )
        self.completion_tokens = Counter(
            "tutorial_api_completion_tokens", "Answer tokens generated.", registry=registry
        )
        self.first_token = Histogram(
            "tutorial_api_time_to_first_token_seconds",
            "Streamed answers: seconds from the request's arrival to its first text leaving.",
            buckets=_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.answer_time = Histogram(
            "tutorial_api_request_duration_seconds",
            "Chats: seconds from the request's arrival to the answer's last byte.",
            buckets=_ANSWER_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "tutorial_api_finished",
            "Chats ended, by finish reason (stop, length, cancelled, error).",
            ["reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "tutorial_api_upstream_errors",
            "Requests the upstream server failed: answered 502, or broken off mid-answer.",
            registry=registry,
        )
        registry.register(_Gauges(self))

    def started(self, request_id: str, state: dict) -> None:
        """Count a request as in flight."""
        self.in_flight[request_id] = state

    def streamed(self, state: dict, body: bytes, seconds: float) -> None:
        """Note `seconds` as the time to the first token if `body` is a stream's first text."""
        if "generation" in state and "first_token_seconds" not in state and _TEXT.search(body):
            state["first_token_seconds"] = seconds
            self.first_token.observe(seconds)

    def ended(self, request_id: str, scope, status: int, seconds: float) -> None:
        """Count a request that has ended: its status, its chat's tokens, time and outcome."""
        state = self.in_flight.pop(request_id, {})
        path = getattr(scope.get("route"), "path", UNMATCHED)
        self.requests.labels(path, str(status)).inc()
        generation = state.get("generation")
        if (key := state.get("key_name")) and path not in (DASHBOARD_DATA, SHEET_DATA):
            tally = self.per_key.setdefault(key, KeyTally())
            tally.requests += 1
            tally.last_seen = time.time()
            if generation is not None:
                tally.prompt_tokens += generation.prompt_tokens
                tally.completion_tokens += generation.completion_tokens
        if generation is not None:
            self.prompt_tokens.inc(generation.prompt_tokens)
            self.completion_tokens.inc(generation.completion_tokens)
            self.cached_tokens.inc(generation.cached_tokens or 0)
            self.answer_time.observe(seconds)
            reason = generation.finish_reason or (
                FinishReason.CANCELLED if generation.cancelled else None
            )
            if reason:
                self.finished.labels(str(reason)).inc()
        broke_off = generation is not None and generation.finish_reason == FinishReason.ERROR
        if self.upstream and (status == 502 or broke_off):
            self.upstream_errors.inc()

    def generations(self) -> list:
        """Return the generations of the requests in flight that have one."""
        return [
            state["generation"] for state in list(self.in_flight.values()) if "generation" in state
        ]

    def snapshot(self) -> dict:
        """Return the dashboard's figures: /metrics' samples, per key tallies, requests in flight.

        No prompt text: a request in flight shows its key, its status, its age and its tokens.
        """
        samples = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    samples.setdefault(sample.name, []).append(
                        {"labels": sample.labels, "value": sample.value}
                    )
        now = time.perf_counter()
        asking = [
            {
                "key": state.get("key_name", "-"),
                "status": str(state["generation"].status),
                "seconds": round(now - state["generation"].started, 1),
                "completion_tokens": state["generation"].completion_tokens,
            }
            for state in list(self.in_flight.values())
            if "generation" in state
        ]
        keys = {name: asdict(tally) for name, tally in sorted(self.per_key.items())}
        return {"time": time.time(), "samples": samples, "keys": keys, "asking": asking}


class _Gauges:
    """The gauges read at each scrape: requests active, running and waiting; decoding threads."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        """Yield the gauges as they are now."""
        generations = self.metrics.generations()
        waiting = sum(g.status == RequestStatus.WAITING for g in generations)
        running = sum(
            g.status in (RequestStatus.PREFILLING, RequestStatus.RUNNING) for g in generations
        )
        backend = getattr(self.metrics.app.state, "engine", None)
        yield GaugeMetricFamily(
            "tutorial_api_requests_running",
            "Chats being prefilled or decoded (the kit's engine), or answering (an upstream).",
            value=running,
        )
        yield GaugeMetricFamily(
            "tutorial_api_requests_waiting",
            "Chats queued, not yet in the batch.",
            value=waiting,
        )
        if backend is not None:
            yield GaugeMetricFamily(
                "tutorial_api_requests_active",
                "Requests the backend holds, waiting or generating: what /health reports.",
                value=backend.active,
            )
        threads = getattr(backend, "threads", None)
        if threads is not None:
            yield GaugeMetricFamily(
                "tutorial_api_threads",
                "CPU threads the engine decodes with now.",
                value=threads,
            )


def add_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Serve `metrics` at GET /metrics, in Prometheus' text format; no key needed, as /health."""

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        """Return the counters in Prometheus' text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

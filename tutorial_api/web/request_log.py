"""One log line per request, for the teacher: who asked, what for, how it ended, how long it took.

The same middleware feeds the app's Prometheus counters (`metrics.py`) as each request ends.

The line is `key=value` pairs; a value with anything but plain characters is written as a JSON
string, so text from a client (a path, a key's name) can never start a line of its own. The
request's id comes back to the client in the X-Request-ID header, to find its line.
"""

import json
import logging
import re
import time
import uuid

from tutorial_api.web.metrics import Metrics

logger = logging.getLogger("tutorial_api.requests")

_PLAIN = re.compile(r"[\w./:@+-]+", re.ASCII)


class RequestLog:
    """ASGI middleware: an id for each request, sent back as X-Request-ID, and a line as it ends.

    Each request also moves `metrics`' counters: counted in flight, then ended.
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        """Pass the request on with its id, and write its log line once the answer ends."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id  # for the engine's and the error handler's log lines
        started = time.perf_counter()
        # Until the app answers: an unhandled error becomes a 500 outside this middleware.
        status = 500
        logged = False
        streamed = False
        self.metrics.started(request_id, state)

        def write_line():
            """Log the request's line, once, however the request ends."""
            nonlocal logged
            if not logged:
                logged = True
                seconds = time.perf_counter() - started
                logger.info(log_line(request_id, scope, state, status, seconds))
                self.metrics.ended(request_id, scope, status, seconds)

        async def send_with_id(message):
            """Send the answer with its X-Request-ID header, noting its status."""
            nonlocal status, streamed
            if message["type"] == "http.response.start":
                status = message["status"]
                streamed = any(
                    name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message.get("headers", [])
                )
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            if streamed and message["type"] == "http.response.body":
                seconds = time.perf_counter() - started
                self.metrics.streamed(state, message.get("body", b""), seconds)
            last_part = not message.get("more_body", False)
            if message["type"] == "http.response.body" and last_part:
                # Before the last byte leaves: a client holding its answer finds the line written.
                write_line()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            write_line()


def log_line(request_id: str, scope, state: dict, status: int, seconds: float) -> str:
    """Return the request's line: id, key, method, path, status, tokens, how it ended, seconds."""
    generation = state.get("generation")
    fields = {
        "id": request_id,
        "key": state.get("key_name", "-"),
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "prompt_tokens": generation.prompt_tokens if generation else 0,
        "completion_tokens": generation.completion_tokens if generation else 0,
        "finish": (generation.finish_reason if generation else None) or "-",
        "cancelled": "yes" if generation and generation.cancelled else "no",
        "seconds": f"{seconds:.3f}",
    }
    return " ".join(f"{name}={_value(value)}" for name, value in fields.items())


def _value(value) -> str:
    """Write `value` as it is if plain, else as a JSON string, which keeps it on one line."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)

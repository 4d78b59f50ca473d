"""The backend that relays to an OpenAI-compatible server: vLLM, SGLang, another kit.

It offers what the kit's own engine does (prepare, start, then text, stream or cancel) over one
pooled HTTP client for the server's life.

Every request goes upstream as a stream, whether its client streams or not: its text arrives as it
is generated, its usage comes in the last chunk, and closing the connection is how the upstream
learns a client hung up (vLLM aborts a request whose connection closes). A client that streams gets
the upstream's own events as they arrive; the kit reads only the few it needs.
"""

import asyncio
import json
import logging
import re
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
import httpx
from fastapi.sse import format_sse_event

from tutorial_api.backend import (
    DEFAULT_MAX_LENGTH,
    BackendError,
    ChatInputError,
    FinishReason,
    RelayedAnswer,
    RequestStatus,
    answer_budget,
)

logger = logging.getLogger(__name__)

# A class of a few hundred students: this many requests in flight to the upstream at once, the rest
# queue here.
MAX_CONNECTIONS = 256
# How long /health waits for the upstream's own health.
_HEALTH_SECONDS = 5.0
# How long the upstream's health, once checked, answers /health: a monitor or load balancer polling
# the kit many times a second costs the upstream one check a second, and the kit one request to it.
_HEALTH_FRESH_SECONDS = 1.0
# Statuses that say an upstream has no such route (POST /tokenize, GET /health are not in every
# server).
_ABSENT = (404, 405, 501)


class UpstreamError(BackendError):
    """The upstream's failure as the kit answers it, with the upstream's own HTTP status.

    `field` names the request's field at fault where the upstream named one; `retry_after` is passed
    on from the upstream.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "upstream_error",
        field: str = "",
        retry_after: str | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.field, self.retry_after = status, code, field, retry_after


@dataclass
class UpstreamChat:
    """A conversation checked and ready to send, with the OpenAI fields to send.

    Its token count and answer budget are there where the upstream can count tokens, None where it
    cannot.
    """

    messages: list[dict]
    prompt_tokens: int | None
    max_new_tokens: int | None
    options: dict = field(default_factory=dict)


class Upstream:
    """The backend when an OpenAI-compatible server generates: one pooled client to `base_url`.

    `base_url` ends in /v1; `model` defaults to the first model the upstream lists. Callers never
    see it (it may hold a user and password): only the server's log names it, without those.
    """

    uses_model_chat = False

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        count_prompts: bool = False,
    ):
        self.base_url = base_url.rstrip("/")
        # for the server's log: the base URL without a user and password
        self.logged_url = str(httpx.URL(self.base_url).copy_with(userinfo=b""))
        self.model = model
        self.count_prompts = (
            count_prompts  # count every prompt (for max_prompt_tokens), not only for max_length
        )
        self._counts_tokens = True  # until the upstream shows it has no /tokenize
        self._live: set[UpstreamGeneration] = set()
        self._health_check: asyncio.Task | None = (
            None  # the latest, shared by every /health while it is fresh
        )
        self._health_checked = 0.0  # when it ended, by time.monotonic()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(None, connect=10.0),  # the kit's request_timeout bounds a request
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
            ),
        )

    async def open(self) -> str:
        """Learn the model to use, when none was named; return its name."""
        if self.model is None:
            listed = await self._call("GET", f"{self.base_url}/models")
            models = [card["id"] for card in listed.json().get("data", [])]
            if not models:
                raise UpstreamError(
                    502, f"The upstream server at {self.logged_url} lists no model."
                )
            self.model = models[0]
        return self.model

    async def close(self) -> None:
        if self._health_check:
            self._health_check.cancel()
        await self.client.aclose()

    @property
    def active(self) -> int:
        """Count the requests sent upstream and not yet answered in full."""
        return len(self._live)

    async def health(self) -> str | None:
        """Say why the upstream cannot answer now, or return None while it can.

        The upstream is asked at most once a second: calls meanwhile share the check in flight, or
        the last one's answer.
        """
        check = self._health_check
        stale = check is None or (
            check.done() and time.monotonic() - self._health_checked > _HEALTH_FRESH_SECONDS
        )
        if stale:
            check = self._health_check = asyncio.create_task(self._check_health())
        return await asyncio.shield(
            check
        )  # a caller that gives up does not cancel the check the others wait for

    async def _check_health(self) -> str | None:
        """Ask the upstream's /health (at the server's root, as vLLM's), else its model list."""
        try:
            root = self.base_url.removesuffix("/v1")
            for url in (f"{root}/health", f"{self.base_url}/models"):
                try:
                    answer = await self.client.get(url, timeout=_HEALTH_SECONDS)
                except httpx.HTTPError as error:
                    reason = type(error).__name__
                    return f"The upstream server cannot be reached ({reason})."
                if answer.status_code == 200:
                    return None
                if answer.status_code not in _ABSENT:
                    path = url.removeprefix(root)
                    return f"The upstream server reports {answer.status_code} on {path}."
            return None
        finally:
            self._health_checked = time.monotonic()

    async def count(self, messages: list[dict]) -> tuple[int, int] | None:
        """Count the prompt's tokens by the upstream's POST /tokenize; None where it has none.

        Return them with the model's context. vLLM's /tokenize is at the server's root.
        """
        if not self._counts_tokens:
            return None
        url = f"{self.base_url.removesuffix('/v1')}/tokenize"
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        try:
            counted = (await self._call("POST", url, json=body)).json()
        except UpstreamError as error:
            if error.status not in _ABSENT:
                raise
            logger.info(
                "The upstream has no POST /tokenize: max_length and max_prompt_tokens are not "
                "checked here"
            )
            self._counts_tokens = False
            return None
        return counted["count"], counted["max_model_len"]

    async def prepare(
        self,
        messages,
        *,
        max_length=None,
        max_new_tokens=None,
        default_max_length=DEFAULT_MAX_LENGTH,
        top_logprobs=None,
        **sampling,
    ) -> UpstreamChat:
        """Check a chat and work out its answer's budget, as `conversation.prepare` does.

        That needs the upstream to count tokens; where it cannot, the answer is held to
        `max_new_tokens`, else to `max_length` alone. The prompt is counted only where a budget or
        `count_prompts` needs it.
        """
        if top_logprobs is not None:
            raise ChatInputError(
                "logprobs",
                "logprobs are not available on this server: it answers through an upstream server.",
            )
        # A budget of the whole context needs no count: the upstream keeps its own context, and
        # saves a round trip.
        whole_context = max_length is None and default_max_length is None
        counted = None if whole_context and not self.count_prompts else await self.count(messages)
        if counted is None:
            budget = max_new_tokens if max_new_tokens is not None else max_length
            return UpstreamChat(messages, None, budget, _present(sampling))
        budget = answer_budget(*counted, max_length, max_new_tokens, default_max_length)
        return UpstreamChat(messages, counted[0], budget, _present(sampling))

    async def start(
        self, chat: UpstreamChat, *, stop=(), label="", cache_scope=None
    ) -> "UpstreamGeneration":
        """Send the chat upstream; return once it is accepted, raise UpstreamError if refused.

        `cache_scope` is not sent: the upstream keeps its own cache.
        """
        body = {
            "model": self.model,
            "messages": chat.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **chat.options,
        }
        if chat.max_new_tokens is not None:
            body["max_tokens"] = chat.max_new_tokens
        if stop:
            body["stop"] = list(stop)
        generation = UpstreamGeneration(chat, self, label)
        self._live.add(generation)
        try:
            response = await self._call(
                "POST", f"{self.base_url}/chat/completions", json=body, stream=True
            )
        except BaseException:
            self._live.discard(generation)
            raise
        generation.read(response)
        return generation

    def release(self, generation: "UpstreamGeneration") -> None:
        self._live.discard(generation)

    async def _call(
        self, method: str, url: str, *, stream: bool = False, **options
    ) -> httpx.Response:
        """Return the upstream's 200 answer (body unread if `stream`), else raise UpstreamError."""
        request = self.client.build_request(method, url, **options)
        try:
            response = await self.client.send(request, stream=stream)
        except httpx.HTTPError as error:
            logger.warning(
                "The upstream server at %s cannot be reached: %r", self.logged_url, error
            )
            raise UpstreamError(
                502,
                f"The upstream server cannot be reached ({type(error).__name__}); "
                "try again when it is back.",
                code="upstream_unreachable",
            ) from None
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            raise _failure(response)
        return response


class UpstreamGeneration(RelayedAnswer):
    """One request answered by the upstream, its events read as they arrive.

    They are read as text (`stream`, `text`) or passed on to a streaming client as they are
    (`relay`); `cancel` closes the upstream connection at once, so the upstream stops generating.

    Only what the kit needs is parsed (the usage, the finish reason, an error): every other event is
    bytes the kit never decodes, so the kit in front costs the upstream's clients little.
    """

    def __init__(self, chat: UpstreamChat, upstream: Upstream, label: str):
        super().__init__(label)
        self.prompt_tokens = chat.prompt_tokens or 0
        self.completion_tokens = 0
        self._upstream = upstream
        self._text_events = 0
        self._reported_finish: str | None = None  # the upstream's own finish_reason
        self._usage_seen = False
        # The last event parsed: its id, created and model head a usage chunk made here.
        self._last_read: dict = {}
        # An anyio scope, not Task.cancel: httpx finishes closing the connection under anyio's
        # shield, so the upstream sees it close, and the pool gets its slot back.
        self._reading = anyio.CancelScope()
        self._reader: asyncio.Task | None = None

    def read(self, response: httpx.Response) -> None:
        """Start reading the upstream's events into this answer's pieces."""
        self.status = RequestStatus.RUNNING
        self._reader = asyncio.create_task(self._read(response))

    def cancel(self) -> None:
        self._cancelled = True
        self._reading.cancel()

    async def stream(self, ping_every: float | None = None):
        """Yield the answer's text as it arrives, and None after each quiet `ping_every` s."""
        async with aclosing(super().stream(ping_every)) as pieces:
            async for piece in pieces:
                if piece is None:
                    yield None
                    continue
                for event in [piece] if isinstance(piece, dict) else _parsed(piece):
                    for choice in event.get("choices") or []:
                        if text := (choice.get("delta") or {}).get("content"):
                            yield text

    async def relay(self, include_usage: bool, ping_every: float | None = None):
        """Yield the upstream's own server-sent events, for a client that streams.

        None comes after each `ping_every` seconds without one, the usage only where the client
        asked for it, then `[DONE]`.
        """
        async with aclosing(super().stream(ping_every)) as pieces:
            async for piece in pieces:
                if isinstance(
                    piece, dict
                ):  # an event that carries the usage, which the kit always asks for
                    if not include_usage:
                        piece = {name: value for name, value in piece.items() if name != "usage"}
                    if not (piece.get("choices") or include_usage):
                        continue
                    piece = _event(piece)
                yield piece
        if (
            include_usage and not self._usage_seen
        ):  # an upstream that sent none: the counts the kit made
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            }
            head = {
                name: self._last_read.get(name) for name in ("id", "object", "created", "model")
            }
            yield _event({**head, "choices": [], "usage": usage})
        yield format_sse_event(data_str="[DONE]")

    async def _read(self, response: httpx.Response) -> None:
        try:
            with self._reading:
                held = b""
                async for chunk in response.aiter_bytes():
                    received = held + chunk
                    if b"\r" in received:
                        received = received.replace(b"\r\n", b"\n")
                    complete, end, held = received.rpartition(b"\n\n")
                    if end:
                        self._read_events(complete + end)
            if self._reading.cancelled_caught:
                self._end(FinishReason.CANCELLED)
                return
            self._end_as_reported()
        except UpstreamError as error:
            self._end(FinishReason.ERROR, error)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning(
                "The upstream's answer to request %s broke off: %r", self.label or "-", error
            )
            broke_off = UpstreamError(502, "The upstream server's answer broke off; try again.")
            self._end(FinishReason.ERROR, broke_off)
        finally:
            # An answer left unread closes its connection: the upstream aborts the request.
            await response.aclose()

    def _read_events(self, events: bytes) -> None:
        """Queue complete events as they came, after reading the few the kit needs.

        Those are the usage (queued parsed, for `relay` to keep or drop), the finish reason,
        `[DONE]` (which `relay` sends itself) and an error (raised).
        """
        # Without the upstream's usage, the text events are the count: most servers stream one token
        # an event.
        self._text_events += len(_TEXT.findall(events))
        if not _NEEDED.search(events):
            self._pass(events)
            return
        passed = []
        try:
            for event in events.split(b"\n\n")[:-1]:
                if not _NEEDED.search(event):
                    passed.append(event + b"\n\n")
                elif (data := _data(event)) != "[DONE]":
                    self._note(read := json.loads(data))
                    if read.get("usage"):
                        self._pass(b"".join(passed))
                        self._pass(read)
                        passed = []
                    else:
                        passed.append(event + b"\n\n")
        finally:
            self._pass(b"".join(passed))  # the events before an error still reach the client

    def _pass(self, piece: bytes | dict) -> None:
        if piece:
            self._pieces.put_nowait(piece)  # this loop's own queue: no thread to wake

    def _note(self, event: dict) -> None:
        """Keep the usage and finish reason of a parsed event; raise the error it reports."""
        if "error" in event:
            raise _failure(None, event, status=502)
        self._last_read = event
        if usage := event.get("usage"):
            self.prompt_tokens, self.completion_tokens = (
                usage["prompt_tokens"],
                usage["completion_tokens"],
            )
            self._usage_seen = True
        for choice in event.get("choices") or []:
            self._reported_finish = choice.get("finish_reason") or self._reported_finish

    def _end_as_reported(self) -> None:
        """End as the upstream's finish reason says; any but `stop` and `length` is an error.

        vLLM's `abort`, a reason the kit does not know, or none at all: the answer may be cut short,
        and the client hears so instead of an answer that looks whole.
        """
        reported = self._reported_finish
        if reported in _FINISH_REASONS:
            self._end(_FINISH_REASONS[reported])
            return
        logger.warning(
            "The upstream's answer to request %s ended with finish_reason %r",
            self.label or "-",
            reported,
        )
        said = "without a finish reason" if reported is None else f"with finish_reason {reported!r}"
        ended = UpstreamError(502, f"The upstream server ended the answer {said}; try again.")
        self._end(FinishReason.ERROR, ended)

    def _end(self, reason: FinishReason, error: Exception | None = None) -> None:
        self.status, self.finish_reason = RequestStatus.DONE, reason
        self.completion_tokens = self.completion_tokens or self._text_events
        self._upstream.release(self)
        if error is None:
            self._end_stream()
        else:
            self._send(error)


# The upstream finish reasons that end an answer whole, as the kit reports them.
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}

# What the kit reads in an upstream's events: keys JSON never writes unquoted inside a string, so
# text that only mentions them does not match. An event without them passes on unread.
_NEEDED = re.compile(rb'"(?:error|prompt_tokens)"\s*:|"finish_reason"\s*:\s*"|\[DONE\]')
_TEXT = re.compile(rb'"content"\s*:\s*"[^"]')


def _data(event: bytes) -> str:
    """Return the data of one server-sent event (its `data:` lines), as text."""
    return "\n".join(
        line[5:].decode().strip() for line in event.split(b"\n") if line.startswith(b"data:")
    )


def _parsed(events: bytes) -> list[dict]:
    """Return the JSON events among complete server-sent events."""
    return [
        json.loads(data)
        for event in events.split(b"\n\n")
        if (data := _data(event)) and data != "[DONE]"
    ]


def _event(chunk: dict) -> bytes:
    """Return a chunk as a server-sent event, written as the kit's own streams write theirs."""
    return format_sse_event(data_str=json.dumps(chunk, ensure_ascii=False))


def _present(options: dict) -> dict:
    """Return the sampling fields the client set, to send as they are."""
    return {name: value for name, value in options.items() if value is not None}


def _failure(
    response: httpx.Response | None, body: dict | None = None, *, status: int | None = None
) -> UpstreamError:
    """Return an upstream's error answer, or an error event in its stream, as an UpstreamError.

    A 4xx keeps the upstream's own message, a 503 its Retry-After; anything else becomes a 502.
    """
    if body is None:
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:500]}
    detail = body.get("error") if isinstance(body.get("error"), dict) else body
    message = str(detail.get("message") or detail.get("detail") or body)
    status = status or response.status_code
    if status in (401, 403):
        return UpstreamError(
            502, "The upstream server refused this server's key: check --upstream-api-key."
        )
    if status == 503:
        return UpstreamError(
            503,
            f"The upstream server is busy: {message}",
            code="server_busy",
            retry_after=response.headers.get("Retry-After"),
        )
    if 400 <= status < 500:
        return UpstreamError(
            status,
            message,
            code=str(detail.get("code") or "upstream_error"),
            field=str(detail.get("param") or detail.get("field") or ""),
            retry_after=response.headers.get("Retry-After"),
        )
    return UpstreamError(502, f"The upstream server failed ({status}): {message}")

"""The server's limits on one request, each refusal naming the limit as its setting is called.

They cover the body's size, the conversation's length, the answer's budget, and how many requests
one caller may have in flight.
"""

from collections import Counter
from contextlib import contextmanager

from fastapi import Request
from starlette.datastructures import Headers

from tutorial_api.backend import ChatInputError
from tutorial_api.web.errors import Refusal


class BodyLimit:
    """ASGI middleware that refuses a body over `max_bytes` with 413.

    By its Content-Length at once where that declares too much, else as its bytes arrive.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        """Pass the request on, with a `receive` that counts the body's bytes."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def receive_counted():
            """Receive the next part of the body; raise 413's refusal once it is too large."""
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large()
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()
            return message

        await self.app(scope, receive_counted, send)

    def _too_large(self) -> Refusal:
        """Return the 413 refusal, which names max_body_bytes."""
        # Raised while the route reads its body, so the error handler answers in the route's shape.
        return Refusal(
            413,
            f"The request body is larger than this server's limit (max_body_bytes) of "
            f"{self.max_bytes} bytes.",
            field="body",
            code="request_too_large",
        )


def check_turns(messages: list[dict], settings) -> None:
    """Refuse a conversation with more earlier turns than max_history_turns.

    An earlier turn is a user message before the last one.
    """
    turns = sum(message["role"] == "user" for message in messages) - 1
    if settings.max_history_turns is not None and turns > settings.max_history_turns:
        raise ChatInputError(
            "history",
            f"The conversation carries {turns} earlier turns, more than this server's "
            f"limit (max_history_turns) of {settings.max_history_turns}. "
            "Drop the oldest turns.",
        )


def check_tokens(prepared, settings, budget_field: str | None) -> None:
    """Refuse a prompt over max_prompt_tokens, and an answer's budget over max_new_tokens.

    A budget the client set, through `budget_field`, is refused; one it did not set
    (`budget_field` None) is lowered to max_new_tokens instead. A prompt or budget of None (an
    upstream that cannot count tokens) is not known, so not refused.
    """
    prompt_tokens = prepared.prompt_tokens
    counted = None not in (settings.max_prompt_tokens, prompt_tokens)
    if counted and prompt_tokens > settings.max_prompt_tokens:
        raise ChatInputError(
            "prompt",
            f"The prompt and history take {prompt_tokens} tokens, more than this "
            f"server's limit (max_prompt_tokens) of {settings.max_prompt_tokens}. "
            "Shorten the prompt or drop old history turns.",
        )
    limit = settings.max_new_tokens
    budget = prepared.max_new_tokens
    if limit is None or (budget is not None and budget <= limit):
        return
    if budget_field is None:
        prepared.max_new_tokens = limit
        return
    highest = (prompt_tokens or 0) + limit if budget_field == "max_length" else limit
    raise ChatInputError(
        budget_field,
        f"{budget_field} allows an answer of {prepared.max_new_tokens} tokens, more "
        f"than this server's limit (max_new_tokens) of {limit} new tokens per "
        f"request. Set {budget_field} to at most {highest}, or leave it out.",
    )


class Slots:
    """How many requests each caller has in flight, at most `limit` (max_concurrent_per_key)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.busy: Counter[str] = Counter()

    @contextmanager
    def hold(self, caller: str):
        """Hold one of `caller`'s slots while the block runs; refuse with 429 when all are taken."""
        if self.busy[caller] >= self.limit:
            raise Refusal(
                429,
                f"{caller} already has as many requests in flight as this server allows "
                f"(max_concurrent_per_key is {self.limit}). Wait for an answer, then ask again.",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.busy[caller] += 1
        try:
            yield
        finally:
            self.busy[caller] -= 1
            if not self.busy[caller]:
                del self.busy[caller]


async def concurrency_slot(request: Request):
    """Hold one of the caller's slots until the answer is sent: a FastAPI dependency.

    The caller is its key's name, else its address.
    """
    address = request.client.host if request.client else "unknown"
    caller = getattr(request.state, "key_name", None) or address
    with request.app.state.slots.hold(caller):
        yield

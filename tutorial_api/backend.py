"""The contract between the HTTP layer and whatever generates the answers.

Two backends implement it: the kit's own engine (`tutorial_api.engine`), which computes with torch,
and `tutorial_api.upstream.Upstream`, which relays to an OpenAI-compatible server such as vLLM. The
routes depend on this module alone: it imports neither torch nor the web framework, and it knows
nothing of HTTP statuses (the HTTP layer maps each error to one, in `tutorial_api.web.errors`).
"""

import asyncio
import contextlib
import enum
import time
from typing import Protocol

# The original tutorial's default for `max_length`: prompt and answer together, in tokens.
DEFAULT_MAX_LENGTH = 2048


class RequestStatus(enum.StrEnum):
    """Where a request is in its life, in order; DONE is the only end."""

    WAITING = "waiting"  # queued, not yet in the batch
    PREFILLING = "prefilling"  # its prompt is being computed
    RUNNING = "running"  # decoding, one token a step
    DONE = "done"  # finished, cancelled or failed: see its FinishReason


class FinishReason(enum.StrEnum):
    """How an answer ended, as the request log and OpenAI's `finish_reason` write it."""

    STOP = "stop"  # an end token or a stop string
    LENGTH = "length"  # the answer's token budget ran out
    CANCELLED = "cancelled"  # the client hung up, or the request timed out
    ERROR = "error"  # the backend failed; the client got the error


class ChatInputError(ValueError):
    """A request the model cannot serve as asked; `field` names the input to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class BackendError(RuntimeError):
    """A request the backend cannot serve or finish; the message is safe to show a client.

    The cause, if any, is in the server's log. `field` names the request field at fault, where one
    is; `retry_after` is how many seconds to wait before trying again, where that helps.
    """

    field = ""
    retry_after: int | str | None = None


class BackendBusy(BackendError):
    """The waiting queue is full: the client should retry shortly."""

    retry_after = 1


class BackendStopped(BackendError):
    """The backend is shutting down, or its worker has stopped."""


def answer_budget(
    prompt_tokens: int,
    context: int,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    default_max_length: int | None = DEFAULT_MAX_LENGTH,
) -> int:
    """Return the answer's token budget; raise ChatInputError if the prompt leaves no room.

    The budget is `max_length` (else `default_max_length`, else the whole context) less the prompt,
    and at most `max_new_tokens`.
    """
    if prompt_tokens >= context:
        raise ChatInputError(
            "prompt",
            f"The prompt and history take {prompt_tokens} tokens, but the model's context holds "
            f"{context}. Shorten the prompt or drop old history turns.",
        )
    if max_length is not None and max_length > context:
        raise ChatInputError(
            "max_length",
            f"max_length {max_length} is larger than the model's context of {context} tokens.",
        )
    if max_length is None:
        total = context if default_max_length is None else min(default_max_length, context)
    else:
        total = max_length
    if prompt_tokens >= total:
        raise ChatInputError(
            "max_length",
            f"The prompt and history take {prompt_tokens} tokens, which leaves no room for an "
            f"answer within max_length {total}. Raise max_length (up to {context}) or shorten "
            "the history.",
        )
    budget = total - prompt_tokens
    return budget if max_new_tokens is None else min(budget, max_new_tokens)


_DONE = object()


class Answer:
    """What a route holds of a request, whichever backend answers it.

    It offers the text as it comes (`stream`, `text`), `cancel`, and for the request log the token
    counts, the status and the finish reason; `started` starts the request timeout's clock.
    """

    prompt_tokens: int  # counts, as OpenAI's usage names them
    completion_tokens: int
    cached_tokens: int | None = (
        None  # of the prompt's, reused rather than computed; None if unknown
    )

    def __init__(self, label=""):
        self.label = label
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.started = time.perf_counter()
        self._cancelled = False
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue = asyncio.Queue()

    @property
    def cancelled(self) -> bool:
        """Tell whether the client cancelled the request (hung up, or timed out)."""
        return self._cancelled

    def cancel(self) -> None:
        """Stop generating; each backend frees the request's place its own way."""
        raise NotImplementedError

    async def stream(self, ping_every: float | None = None):
        """Yield the answer's text as it comes, and None after each quiet `ping_every` s.

        Raise the backend's error that ended it; leaving early cancels the generation.
        """
        try:
            while True:
                try:
                    async with asyncio.timeout(ping_every):  # a timer, not a task: cheap per piece
                        piece = await self._pieces.get()
                except TimeoutError:
                    yield None
                    continue
                if piece is _DONE:
                    return
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            if self.status != RequestStatus.DONE:
                self.cancel()

    async def text(self) -> str:
        """Return the whole answer once it has ended."""
        return "".join([piece async for piece in self.stream()])

    def _end_stream(self) -> None:
        self._send(_DONE)

    def _send(self, item) -> None:
        """Queue a text piece, the end of the stream or an error; safe from any thread."""
        if item == "":
            return
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody listens any more
            self._loop.call_soon_threadsafe(self._pieces.put_nowait, item)


class RelayedAnswer(Answer):
    """An answer whose backend's own server-sent events go on to a streaming client."""

    async def relay(self, include_usage: bool, ping_every: float | None = None):
        """Yield the backend's own events, None after each quiet `ping_every` s, then `[DONE]`."""
        raise NotImplementedError


class PreparedChat(Protocol):
    """A conversation checked and ready to start, as a backend's `prepare` returns it."""

    @property
    def prompt_tokens(self) -> int | None:
        """Count the prompt's tokens; None where the backend cannot count them."""
        ...

    @property
    def max_new_tokens(self) -> int | None:
        """Return the answer's budget in tokens; None leaves it to the backend."""
        ...


class Backend(Protocol):
    """What the routes call, whichever backend generates.

    A backend whose model answers through its own `model.chat` (Qwen-7B-Chat's remote code) says so
    with `uses_model_chat`, and the routes then call its `model_chat` instead of `prepare` and
    `start`.
    """

    uses_model_chat: bool

    @property
    def active(self) -> int:
        """Count the requests waiting or generating."""
        ...

    async def health(self) -> str | None:
        """Say why the backend cannot generate now, or return None while it can."""
        ...

    async def count(self, messages: list[dict]) -> tuple[int, int] | None:
        """Count the prompt's tokens and return them with the model's context; None if it cannot."""
        ...

    async def prepare(self, messages: list[dict], **budget_and_sampling) -> PreparedChat:
        """Check a conversation and work out its answer's budget; raise ChatInputError if not."""
        ...

    async def start(
        self, prepared: PreparedChat, *, stop=(), label="", cache_scope: str | None = None
    ) -> Answer:
        """Start generating; raise BackendBusy when full, BackendStopped once stopped.

        Cached prompts are reused and left only within `cache_scope` (an API key's name); None
        shares them.
        """
        ...

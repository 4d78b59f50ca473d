"""Between HTTP and the backend: start a request's generation within the limits, then wait.

The backend is the kit's own engine or an upstream server; its errors become refusals here.
"""

import asyncio
import time

import anyio
from fastapi import Request

from tutorial_api.backend import BackendError
from tutorial_api.web.errors import Refusal, backend_refusal
from tutorial_api.web.limits import check_tokens, check_turns

# How often a waiting request checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.25


async def start_generation(
    request: Request, messages, *, budget_field=None, stop=(), **budget_and_sampling
):
    """Check a chat against the server's limits and start it on the app's backend.

    Raise ChatInputError before anything is generated or sent, a Refusal when the backend refuses
    (busy, stopped, unreachable), a 504 past the request timeout.

    `budget_field` names the request field that set the answer's budget, when the client set one.
    With API keys on, each key reuses only its own cached prompts and answers.
    """
    engine, settings = request.app.state.engine, request.app.state.settings
    check_turns(messages, settings)
    try:
        # anyio's timer, not asyncio's: an upstream request cut off while it waits lets httpx close
        # it cleanly.
        with anyio.fail_after(settings.request_timeout):
            prepared = await engine.prepare(messages, **budget_and_sampling)
            check_tokens(prepared, settings, budget_field)
            generation = await engine.start(
                prepared,
                stop=stop,
                label=request.state.request_id,
                cache_scope=getattr(request.state, "key_name", None),
            )
    except BackendError as error:
        raise backend_refusal(error) from None
    except TimeoutError:
        raise _timeout_refusal(settings.request_timeout) from None
    request.state.generation = generation  # for the request log
    return generation


async def answer_or_cancel(request: Request, generation) -> str | None:
    """Return the whole answer, or None (generation cancelled) if the client disconnects first.

    Past the request timeout, raise a 504 Refusal.
    """
    answer = asyncio.ensure_future(generation.text())
    try:
        while not answer.done():
            left = _seconds_left(request, generation)
            if left == 0:
                raise _timed_out(request, generation)
            await asyncio.wait(
                {answer},
                timeout=_DISCONNECT_POLL_SECONDS
                if left is None
                else min(_DISCONNECT_POLL_SECONDS, left),
            )
            if not answer.done() and await request.is_disconnected():
                generation.cancel()
                return None
        return answer.result()
    except BackendError as error:
        raise backend_refusal(error) from None
    finally:
        answer.cancel()


async def stream_or_timeout(request: Request, generation, pieces):
    """Yield `pieces`, the generation's stream, as they come; a 504 past the request timeout.

    The pieces are its text, or an upstream's own events; on a timeout the generation is cancelled.
    """
    try:
        while True:
            try:
                yield await asyncio.wait_for(anext(pieces), _seconds_left(request, generation))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _timed_out(request, generation) from None
            except BackendError as error:
                raise backend_refusal(error) from None
    finally:
        await pieces.aclose()


def _seconds_left(request: Request, generation) -> float | None:
    """Return the seconds left before the request timeout, or None without one.

    The clock starts at the generation's start.
    """
    timeout = request.app.state.settings.request_timeout
    return None if timeout is None else max(0.0, generation.started + timeout - time.perf_counter())


def _timed_out(request: Request, generation) -> Refusal:
    generation.cancel()
    return _timeout_refusal(request.app.state.settings.request_timeout)


def _timeout_refusal(timeout: float) -> Refusal:
    return Refusal(
        504,
        f"The answer took longer than this server's limit (request_timeout) of {timeout:g} seconds "
        "and was cancelled. Ask for a shorter answer, or try again when the server is less busy.",
        code="timeout",
    )

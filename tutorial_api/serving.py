"""between HTTP and the engine (the kit's own, or an upstream server): start a generation for a request within the
server's limits, then wait for it."""

import asyncio
import time

import anyio
from fastapi import Request

from tutorial_api.engine import EngineError
from tutorial_api.errors import Refusal
from tutorial_api.limits import check_tokens, check_turns

# How often a waiting request checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.25


async def start_generation(request: Request, messages, *, budget_field=None, stop=(), **budget_and_sampling):
    """check and start a chat on the app's engine (the kit's own, or an upstream server); raises ChatInputError
    before anything is generated or sent, a Refusal when the engine refuses (busy, stopped, unreachable), 504 past
    the request timeout.

    `budget_field` names the request field that set the answer's budget, when the client set one.
    """
    engine, settings = request.app.state.engine, request.app.state.settings
    check_turns(messages, settings)
    try:
        # anyio's timer, not asyncio's: an upstream request cut off while it waits lets httpx close it cleanly.
        with anyio.fail_after(settings.request_timeout):
            prepared = await engine.prepare(messages, **budget_and_sampling)
            check_tokens(prepared, settings, budget_field)
            generation = await engine.start(prepared, stop=stop, label=request.state.request_id)
    except EngineError as error:
        raise _refusal(error) from None
    except TimeoutError:
        raise _timeout_refusal(settings.request_timeout) from None
    request.state.generation = generation  # for the request log
    return generation


async def answer_or_cancel(request: Request, generation) -> str | None:
    """the whole answer; None, with the generation cancelled, if the client disconnects first; a 504 past the
    request timeout."""
    answer = asyncio.ensure_future(generation.text())
    try:
        while not answer.done():
            left = _seconds_left(request, generation)
            if left == 0:
                raise _timed_out(request, generation)
            await asyncio.wait({answer}, timeout=_DISCONNECT_POLL_SECONDS if left is None else
                               min(_DISCONNECT_POLL_SECONDS, left))
            if not answer.done() and await request.is_disconnected():
                generation.cancel()
                return None
        return answer.result()
    except EngineError as error:
        raise _refusal(error) from None
    finally:
        answer.cancel()


async def stream_or_timeout(request: Request, generation, pieces):
    """`pieces`, the generation's stream (its text, or an upstream's own events), as they come; a 504 Refusal, with
    the generation cancelled, past the request timeout."""
    try:
        while True:
            try:
                yield await asyncio.wait_for(anext(pieces), _seconds_left(request, generation))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _timed_out(request, generation) from None
            except EngineError as error:
                raise _refusal(error) from None
    finally:
        await pieces.aclose()


def _refusal(error: EngineError) -> Refusal:
    """the engine's own error as the server's refusal, in each API's shape."""
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return Refusal(error.status, str(error), field=error.field, code=error.code, headers=headers)


def _seconds_left(request: Request, generation) -> float | None:
    """seconds until the request timeout, counted from the generation's start; None without a timeout."""
    timeout = request.app.state.settings.request_timeout
    return None if timeout is None else max(0.0, generation.started + timeout - time.perf_counter())


def _timed_out(request: Request, generation) -> Refusal:
    generation.cancel()
    return _timeout_refusal(request.app.state.settings.request_timeout)


def _timeout_refusal(timeout: float) -> Refusal:
    return Refusal(504, f"The answer took longer than this server's limit (request_timeout) of {timeout:g} seconds "
                        "and was cancelled. Ask for a shorter answer, or try again when the server is less busy.",
                   code="timeout")

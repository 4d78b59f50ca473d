"""between HTTP and the engine: start a generation for a request, wait for it, log it."""

import asyncio
import logging
import time

from fastapi import Request

from tutorial_api.chat import prepare

logger = logging.getLogger("tutorial_api.requests")


def start_generation(request: Request, messages, *, seed=None, stop=(), **budget_and_sampling):
    """tokenize and queue a chat; raises ChatInputError before any compute, EngineBusy when the queue is full."""
    engine = request.app.state.engine
    prepared = prepare(engine.model, engine.tokenizer, messages, **budget_and_sampling)
    return engine.submit(prepared, seed=seed, stop=stop)


async def answer_or_cancel(request: Request, generation) -> str | None:
    """the whole answer; None, with the generation cancelled, if the client disconnects first."""
    answer = asyncio.ensure_future(generation.text())
    try:
        while not answer.done():
            await asyncio.wait({answer}, timeout=0.25)
            if not answer.done() and await request.is_disconnected():
                generation.cancel()
                return None
        return answer.result()
    finally:
        answer.cancel()
        log_generation(request, generation)


def log_generation(request: Request, generation) -> None:
    """one line per request, with counts only: user text never enters the log."""
    logger.info(
        "%s %s prompt_tokens=%d completion_tokens=%d finish=%s seconds=%.2f",
        request.method, request.url.path, generation.prompt_tokens, generation.completion_tokens,
        generation.finish_reason or "cancelled", time.perf_counter() - generation.started,
    )

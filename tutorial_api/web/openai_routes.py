"""OpenAI's `/v1/chat/completions` (with streaming) and `/v1/models`, on the app's backend."""

import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from tutorial_api.backend import RelayedAnswer
from tutorial_api.web.admission import answer_or_cancel, start_generation, stream_or_timeout
from tutorial_api.web.errors import Refusal
from tutorial_api.web.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 500, 502, 503)}
# A stream that has sent nothing for this long sends an SSE comment, so proxies and clients keep it
# open.
KEEPALIVE_SECONDS = 15.0
# FastAPI's own SSE headers: no caching, and no buffering in an nginx proxy.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/models", response_model=ModelList)
async def list_models(request: Request):
    """List the one model this server runs; requests may name it or not."""
    return ModelList(data=[ModelCard(id=request.app.state.model_name)])


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        **_ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "with `stream`: server-sent events",
        },
    },
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """Answer a chat completion; with `stream`, `chat.completion.chunk` events, then `[DONE]`."""
    if unsupported := body.unsupported():
        raise Refusal(
            400,
            f"{unsupported[0]} is not supported by this server.",
            field=unsupported[0],
            code="unsupported_parameter",
        )
    budgets = {
        name: value
        for name in ("max_tokens", "max_completion_tokens")
        if (value := getattr(body, name))
    }
    budget_field = min(budgets, key=budgets.get, default=None)
    engine = request.app.state.engine
    if engine.uses_model_chat:
        raise Refusal(
            400,
            "This model's remote code has its own chat(): it is served on POST / only.",
            field="model",
        )
    generation = await start_generation(
        request,
        [message.for_template() for message in body.messages],
        # Unlike the tutorial's max_length, OpenAI's budget leaves the whole context to the answer.
        default_max_length=None,
        max_new_tokens=budgets.get(budget_field),
        budget_field=budget_field,
        temperature=body.temperature,
        top_p=body.top_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        seed=body.seed,
        stop=body.stop or (),
    )
    completion_id, created, model = (
        f"chatcmpl-{uuid.uuid4().hex}",
        int(time.time()),
        request.app.state.model_name,
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # An upstream's own events go on as they come: none is parsed and written again.
        if isinstance(generation, RelayedAnswer):
            return EventSourceResponse(
                _relayed(request, generation, include_usage), headers=_SSE_HEADERS
            )
        return EventSourceResponse(
            _events(
                request, generation, completion_id, created, model, include_usage, body.logprobs
            ),
            headers=_SSE_HEADERS,
        )
    content = await answer_or_cancel(request, generation)
    if content is None:
        raise Refusal(499, "The client disconnected.")
    logprobs = _logprobs(engine.tokenizer, generation.logprobs) if body.logprobs else None
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        usage=_usage(generation),
        choices=[
            {
                "message": {"content": content},
                "finish_reason": generation.finish_reason,
                "logprobs": logprobs,
            }
        ],
    )


async def _events(request, generation, completion_id, created, model, include_usage, with_logprobs):
    logprobs_sent = 0

    def event(choices, **extra):
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **({"usage": None} if include_usage else {}),
            **extra,
        }
        return format_sse_event(data_str=json.dumps(chunk, ensure_ascii=False))

    def delta(content, finish_reason=None):
        nonlocal logprobs_sent
        choice = {"index": 0, "delta": content, "finish_reason": finish_reason}
        if with_logprobs:
            # The tokens decoded since the last event: the text of a token held back for a stop
            # string comes later.
            choice["logprobs"] = _logprobs(
                request.app.state.engine.tokenizer, generation.logprobs[logprobs_sent:]
            )
            logprobs_sent += len(choice["logprobs"]["content"])
        return event([choice])

    try:
        yield delta({"role": "assistant", "content": ""})
        async for piece in stream_or_timeout(
            request, generation, generation.stream(KEEPALIVE_SECONDS)
        ):
            yield KEEPALIVE_COMMENT if piece is None else delta({"content": piece})
        yield delta({}, generation.finish_reason)
        if include_usage:
            yield event([], usage=_usage(generation).model_dump())
        yield format_sse_event(data_str="[DONE]")
    except Exception as error:  # the status line is sent: report in the stream
        yield _error_event(request, error)


async def _relayed(request, generation, include_usage):
    """Yield an upstream's events as they come, ending as `_events` does on a timeout or failure."""
    try:
        async for events in stream_or_timeout(
            request, generation, generation.relay(include_usage, KEEPALIVE_SECONDS)
        ):
            yield KEEPALIVE_COMMENT if events is None else events
    except Exception as error:  # the status line is sent: report in the stream
        yield _error_event(request, error)


def _error_event(request, error: Exception) -> bytes:
    """Return a stream's failure as OpenAI's error event; other details go only to the log.

    A refusal keeps its own message.
    """
    if isinstance(error, Refusal):
        detail = {"message": error.detail, "type": "server_error", "code": error.code}
    else:
        logger.exception("Stream of request %s failed", request.state.request_id)
        detail = {
            "message": "The answer failed on the server; its log has the details under this "
            "request's X-Request-ID.",
            "type": "server_error",
            "code": "server_error",
        }
    return format_sse_event(data_str=ErrorResponse(error=detail).model_dump_json())


def _logprobs(tokenizer, entries) -> dict:
    """Return OpenAI's `logprobs` of a choice from the engine's (token, logprob, alternatives)."""
    ids = sorted(
        {
            token
            for entry in entries
            for token in (entry[0], *(alternative for alternative, _ in entry[2]))
        }
    )
    texts = dict(zip(ids, tokenizer.batch_decode([[token] for token in ids]), strict=True))

    def described(token, logprob):
        return {"token": texts[token], "logprob": logprob, "bytes": list(texts[token].encode())}

    return {
        "content": [
            {**described(token, logprob), "top_logprobs": [described(*pair) for pair in top]}
            for token, logprob, top in entries
        ]
    }


def _usage(generation) -> Usage:
    cached = generation.cached_tokens
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
        prompt_tokens_details=None if cached is None else PromptTokensDetails(cached_tokens=cached),
    )

"""OpenAI-compatible `/v1/chat/completions` (with streaming) and `/v1/models`, served by the engine."""

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse, format_sse_event

from tutorial_api.chat import ChatInputError
from tutorial_api.errors import Refusal
from tutorial_api.models import context_length
from tutorial_api.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    openai_error,
)
from tutorial_api.serving import answer_or_cancel, start_generation, stream_or_timeout

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

# Our names for request fields, as OpenAI's clients know them.
_OPENAI_PARAM = {"prompt": "messages", "history": "messages", "max_length": "max_tokens"}
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 503)}


@router.get("/models", response_model=ModelList)
async def list_models(request: Request):
    """the one model this server runs; requests may name it or not."""
    return ModelList(data=[ModelCard(id=request.app.state.model_name)])


@router.post("/chat/completions", response_model=ChatCompletion, responses={
    **_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "with `stream`: server-sent events"}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """a chat completion; with `stream`, `chat.completion.chunk` events and a final `[DONE]`."""
    budgets = {name: value for name in ("max_tokens", "max_completion_tokens") if (value := getattr(body, name))}
    budget_field = min(budgets, key=budgets.get, default=None)
    engine = request.app.state.engine
    if engine.legacy:
        return openai_error(400, "This model's remote code has its own chat(): it is served on POST / only.", "model")
    try:
        generation = start_generation(
            request,
            [{"role": message.role, "content": message.text} for message in body.messages],
            # Unlike the tutorial's max_length, OpenAI's budget leaves the whole context to the answer.
            max_length=context_length(engine.model, engine.tokenizer),
            max_new_tokens=budgets.get(budget_field),
            budget_field=budget_field,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop or (),
        )
    except ChatInputError as error:
        return openai_error(400, str(error), _OPENAI_PARAM.get(error.field, error.field))
    completion_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), request.app.state.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_events(request, generation, completion_id, created, model, include_usage))
    content = await answer_or_cancel(request, generation)
    if content is None:
        return openai_error(499, "The client disconnected.", None)
    return ChatCompletion(
        id=completion_id, created=created, model=model, usage=_usage(generation),
        choices=[{"message": {"content": content}, "finish_reason": generation.finish_reason}],
    )


async def _events(request, generation, completion_id, created, model, include_usage):
    def event(choices, **extra):
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": choices, **({"usage": None} if include_usage else {}), **extra}
        return format_sse_event(data_str=json.dumps(chunk, ensure_ascii=False))

    def delta(content, finish_reason=None):
        return event([{"index": 0, "delta": content, "finish_reason": finish_reason}])

    try:
        yield delta({"role": "assistant", "content": ""})
        async for piece in stream_or_timeout(request, generation):
            yield delta({"content": piece})
        yield delta({}, generation.finish_reason)
        if include_usage:
            yield event([], usage=_usage(generation).model_dump())
        yield format_sse_event(data_str="[DONE]")
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
        refusal = isinstance(error, Refusal)
        detail = {"message": error.detail if refusal else str(error), "type": "server_error",
                  "code": error.code if refusal else None}
        yield format_sse_event(data_str=ErrorResponse(error=detail).model_dump_json())


def _usage(generation) -> Usage:
    return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                 total_tokens=generation.prompt_tokens + generation.completion_tokens)

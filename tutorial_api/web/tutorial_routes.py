"""The original tutorial's `POST /`, served by the app's backend."""

from fastapi import APIRouter, Request

from tutorial_api.conversation import build_messages, tutorial_sampling
from tutorial_api.web.admission import answer_or_cancel, start_generation
from tutorial_api.web.errors import Refusal
from tutorial_api.web.tutorial_schemas import ChatError, ChatRequest, ChatResponse, now

router = APIRouter()


@router.post(
    "/",
    response_model=ChatResponse,
    responses={status: {"model": ChatError} for status in (413, 422, 500, 502, 503)},
)
async def create_chat(body: ChatRequest, request: Request):
    """Answer `prompt` after `history`, as the original tutorial's endpoint does."""
    options = {"max_length": body.max_length, "top_p": body.top_p, "temperature": body.temperature}
    engine = request.app.state.engine
    if engine.uses_model_chat:
        response, history = await engine.model_chat(body.prompt, body.history, **options)
        return ChatResponse(response=response, history=history, time=now())
    # The answer stops at the server's answer_tokens, or sooner where max_length (prompt and answer
    # together) says so. max_length bounds the answer alone too, which holds an upstream that cannot
    # count tokens within it.
    answer_tokens = request.app.state.settings.answer_tokens
    generation = await start_generation(
        request,
        build_messages(body.prompt, body.history),
        max_length=body.max_length,
        max_new_tokens=min(answer_tokens, body.max_length or answer_tokens),
        budget_field=None if body.max_length is None else "max_length",
        **tutorial_sampling(body.temperature, body.top_p),
    )
    response = await answer_or_cancel(request, generation)
    if response is None:
        raise Refusal(499, "The client disconnected.")
    response = response.strip()
    return ChatResponse(
        response=response, history=[*(body.history or []), [body.prompt, response]], time=now()
    )

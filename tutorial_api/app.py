"""the chat API: the original tutorial's `POST /` and a `GET /health`, on a model loaded once at start-up."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tutorial_api.chat import ChatInputError
from tutorial_api.engine import Engine
from tutorial_api.models import load_model
from tutorial_api.schemas import TIME_FORMAT, ChatError, ChatRequest, ChatResponse, Health
from tutorial_api.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter()


def create_app(model=None, *, device=None, dtype=None) -> FastAPI:
    """the FastAPI app serving `model` (a preset, hub id or folder; default $TUTORIAL_API_MODEL)."""
    model_name = model or Settings().model

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("Loading model %s", model_name)
        loaded_model, tokenizer = await asyncio.to_thread(load_model, model_name, device=device, dtype=dtype)
        app.state.engine = Engine(loaded_model, tokenizer)
        logger.info("Model %s is ready", model_name)
        try:
            yield
        finally:
            app.state.engine.close()

    app = FastAPI(
        title="tutorial_api",
        summary="The FastAPI chat tutorial's API, made correct: POST / answers a prompt with history.",
        lifespan=lifespan,
    )
    app.state.model_name = model_name
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.include_router(router)
    return app


@router.post("/", response_model=ChatResponse, responses={422: {"model": ChatError}})
async def create_chat(body: ChatRequest, request: Request):
    """answer `prompt` after `history`, as the original tutorial's endpoint does."""
    started = time.perf_counter()
    try:
        response, history = await request.app.state.engine.chat(
            body.prompt, body.history,
            max_length=body.max_length, top_p=body.top_p, temperature=body.temperature,
        )
    except ChatInputError as error:
        return _error(422, error.field, str(error))
    # %r escapes newlines and other control characters, so user text cannot forge log lines.
    logger.info(
        "POST / prompt=%r history_turns=%d answer_chars=%d seconds=%.2f",
        body.prompt[:80], len(body.history or []), len(response), time.perf_counter() - started,
    )
    return ChatResponse(response=response, history=history, time=_now())


@router.get("/health", response_model=Health)
async def health(request: Request):
    """200 once the model is loaded and the server accepts requests."""
    return Health(model=request.app.state.model_name)


def _now() -> str:
    return datetime.now().strftime(TIME_FORMAT)


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse(ChatError(status=status, field=field, message=message, time=_now()).model_dump(), status)


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """pydantic's errors in the tutorial's shape, naming the first offending field."""
    problems = [_describe(problem) for problem in error.errors()]
    return _error(422, problems[0][0], "; ".join(message for _, message in problems))


def _describe(problem: dict) -> tuple[str, str]:
    location = problem["loc"][1:] if problem["loc"][:1] == ("body",) else problem["loc"]
    if problem["type"] == "json_invalid":
        return "body", f"The body is not valid JSON: {problem['ctx']['error']}."
    if not location:
        return "body", "The body must be a JSON object, sent with Content-Type: application/json."
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    return field, f"{field}: {problem['msg']}"

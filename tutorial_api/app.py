"""the chat API: the tutorial's `POST /`, the OpenAI-compatible `/v1`, and `GET /health`, on one engine."""

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from tutorial_api import openai_api, tutorial_routes
from tutorial_api.engine import Engine
from tutorial_api.models import load_model
from tutorial_api.openai_api import openai_error
from tutorial_api.schemas import Health
from tutorial_api.settings import Settings
from tutorial_api.tutorial_routes import tutorial_error

logger = logging.getLogger(__name__)

DESCRIPTION = """
`POST /` is the original tutorial's endpoint, unchanged on the wire. `/v1/chat/completions` and `/v1/models`
speak OpenAI's API, so the `openai` client works with `base_url` pointing here. The server runs one model:
a request's `model` field may name it or anything else.
"""


def create_app(model=None, *, device=None, dtype=None, max_batch_size=16, max_waiting=64) -> FastAPI:
    """the FastAPI app serving `model`: a preset, hub id or folder (default $TUTORIAL_API_MODEL),
    or a `(model, tokenizer)` pair already loaded."""
    loaded = model if isinstance(model, tuple) else None
    model_name = (loaded[0].name_or_path or type(loaded[0]).__name__) if loaded else model or Settings().model

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("Loading model %s", model_name)
        loaded_model, tokenizer = loaded or await asyncio.to_thread(load_model, model_name, device=device, dtype=dtype)
        app.state.engine = Engine(loaded_model, tokenizer, max_batch_size=max_batch_size, max_waiting=max_waiting)
        logger.info("Model %s is ready", model_name)
        try:
            yield
        finally:
            app.state.engine.close()

    app = FastAPI(title="tutorial_api", description=DESCRIPTION, lifespan=lifespan)
    app.state.model_name = model_name
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(tutorial_routes.router)
    app.include_router(openai_api.router)
    app.add_api_route("/health", _health, methods=["GET"], response_model=Health)
    return app


async def _health(request: Request) -> Health:
    """200 once the model is loaded, with how many requests are generating or waiting."""
    return Health(model=request.app.state.model_name, active_requests=request.app.state.engine.active)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


async def _invalid_request(request: Request, error: RequestValidationError):
    """pydantic's errors in each API's own shape, naming the first offending field."""
    problems = [_describe(problem) for problem in error.errors()]
    message = "; ".join(message for _, message in problems)
    if _is_openai(request):
        return openai_error(400, message, problems[0][0])
    return tutorial_error(422, problems[0][0], message)


async def _http_error(request: Request, error: HTTPException):
    if _is_openai(request):
        return openai_error(error.status_code, str(error.detail), None, headers=error.headers)
    return tutorial_error(error.status_code, "", str(error.detail), headers=error.headers)


def _describe(problem: dict) -> tuple[str, str]:
    location = problem["loc"][1:] if problem["loc"][:1] == ("body",) else problem["loc"]
    if problem["type"] == "json_invalid":
        return "body", f"The body is not valid JSON: {problem['ctx']['error']}."
    if not location:
        return "body", "The body must be a JSON object, sent with Content-Type: application/json."
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    return field, f"{field}: {problem['msg']}"

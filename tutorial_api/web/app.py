"""The chat API (the tutorial's `POST /`, the OpenAI-compatible `/v1`), `/health`, `/metrics`.

For a browser: the chat page at `GET /`, the teacher's dashboard at `GET /dashboard` (`pages.py`).

One backend answers them all: the kit's own engine, or an OpenAI-compatible upstream server.
"""

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException

from tutorial_api.backend import ChatInputError
from tutorial_api.engine.engine import Engine
from tutorial_api.engine.thread_policy import release_openmp_threads
from tutorial_api.models import load_model
from tutorial_api.settings import Settings
from tutorial_api.upstream import Upstream
from tutorial_api.web import openai_routes, tokenize_routes, tutorial_routes
from tutorial_api.web.access import keys_from, require_key
from tutorial_api.web.docs import add_docs
from tutorial_api.web.errors import (
    CatchAll,
    UTF8JSONResponse,
    http_error,
    invalid_request,
    unservable_chat,
)
from tutorial_api.web.limits import BodyLimit, Slots, concurrency_slot
from tutorial_api.web.metrics import Metrics, add_metrics
from tutorial_api.web.openai_schemas import ErrorResponse
from tutorial_api.web.pages import add_pages
from tutorial_api.web.request_log import RequestLog
from tutorial_api.web.tutorial_schemas import ChatError, Health

logger = logging.getLogger(__name__)

DESCRIPTION = """
`POST /` is the original tutorial's endpoint, unchanged on the wire. `/v1/chat/completions` and
`/v1/models` speak OpenAI's API, so the `openai` client works with `base_url` pointing here. The
server runs one model: a request's `model` field may name it or anything else.
"""


def create_app(
    model=None, settings: Settings | None = None, *, device=None, dtype=None, **overrides
) -> FastAPI:
    """Return the chat API's FastAPI app, serving `model`.

    `model` is a preset, hub id or folder (default: the settings' model), or a `(model, tokenizer)`
    pair already loaded. `settings` default to the environment's; `overrides` change any of their
    fields, e.g. `create_app("tiny-qwen2", api_keys=["alice:s3cret"], max_new_tokens=64)`, and
    `dtype` may be a torch dtype too. With an `upstream`
    (`create_app(upstream="http://gpu-server:8000/v1")`) no model is loaded: that server generates.
    """
    settings = replace(settings or Settings(), **overrides)
    loaded = model if isinstance(model, tuple) else None
    if loaded:
        # The caller's thread loaded the model; the engine's worker computes from now on.
        release_openmp_threads()
        model_name = loaded[0].name_or_path or type(loaded[0]).__name__
    else:
        model_name = model or settings.model

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        """Open the backend before the first request, and close it after the last."""
        if settings.upstream:
            app.state.engine = Upstream(
                settings.upstream,
                model=settings.upstream_model,
                api_key=settings.upstream_api_key,
                count_prompts=settings.max_prompt_tokens is not None,
            )
            try:
                app.state.model_name = await app.state.engine.open()
                logger.info(
                    "Answering with %s through %s",
                    app.state.model_name,
                    app.state.engine.logged_url,
                )
                yield
            finally:
                await app.state.engine.close()
            return
        logger.info("Loading model %s", model_name)
        loaded_model, tokenizer = loaded or await asyncio.to_thread(
            _load_for_engine,
            model_name,
            device=device,
            dtype=settings.dtype if dtype is None else dtype,
            trust_remote_code=settings.trust_remote_code,
        )
        app.state.engine = Engine(
            loaded_model,
            tokenizer,
            max_batch_size=settings.max_batch_size,
            max_waiting=settings.max_waiting,
            prefix_cache_mb=settings.prefix_cache_mb,
        )
        app.state.dtype = str(loaded_model.dtype).removeprefix("torch.")
        logger.info(
            "Model %s is ready, computing in %s on %s",
            model_name,
            app.state.dtype,
            loaded_model.device,
        )
        try:
            yield
        finally:
            app.state.engine.close()

    app = FastAPI(
        title="tutorial_api",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=UTF8JSONResponse,
    )
    app.state.model_name = model_name
    # Set once the kit's own engine has loaded; an upstream server does not tell its dtype.
    app.state.dtype = None
    app.state.settings = settings
    app.state.keys = keys_from(settings)
    per_key = settings.max_concurrent_per_key
    app.state.slots = Slots(per_key) if per_key else None
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ChatInputError, unservable_chat)
    add_pages(app)  # first: GET / shares its path with POST /
    app.include_router(tutorial_routes.router, **_guards(app, ChatError))
    app.include_router(openai_routes.router, **_guards(app, ErrorResponse))
    app.include_router(tokenize_routes.router, **_guards(app, ChatError))
    unavailable = {"model": Health, "description": "the engine cannot generate now, and why"}
    app.add_api_route(
        "/health",
        _health,
        methods=["GET"],
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: unavailable},
    )
    add_docs(app)
    app.state.metrics = Metrics(app, upstream=bool(settings.upstream))
    add_metrics(app, app.state.metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(CatchAll)
    # Added last, so outermost: it logs every request, CORS preflights and refusals too.
    app.add_middleware(RequestLog, metrics=app.state.metrics)
    return app


def _load_for_engine(model_name: str, **options):
    """Load the model on a helper thread, then free that thread's OpenMP threads for the engine."""
    try:
        return load_model(model_name, **options)
    finally:
        release_openmp_threads()


def _guards(app: FastAPI, error_model) -> dict:
    """Return a router's key check and concurrency slot, as the settings ask, and their answers."""
    settings, dependencies, responses = app.state.settings, [], {}
    if app.state.keys:
        dependencies.append(Depends(require_key))
        responses[401] = {"model": error_model, "description": "a missing or unknown API key"}
    if app.state.slots:
        dependencies.append(Depends(concurrency_slot, scope="request"))
        responses[429] = {
            "model": error_model,
            "description": "too many requests in flight for this key",
        }
    if settings.request_timeout is not None:
        responses[504] = {
            "model": error_model,
            "description": "no answer within the request timeout",
        }
    return {"dependencies": dependencies, "responses": responses}


async def _health(request: Request):
    """Report whether the server can generate: 200, or 503 with the reason.

    200 while the engine (or the upstream server) can generate, with how many requests are
    generating or waiting; 503 with the reason while it cannot.
    """
    engine = request.app.state.engine
    unavailable_reason = await engine.health()
    health = Health(
        status="unavailable" if unavailable_reason else "ok",
        model=request.app.state.model_name,
        dtype=request.app.state.dtype,
        active_requests=engine.active,
        reason=unavailable_reason,
    )
    if unavailable_reason:
        return UTF8JSONResponse(health.model_dump(exclude_none=True), 503)
    return health

"""tutorial_api: from FastAPI's hello world to a chat model served from a notebook cell.

What the notebooks import lives at the top (hello, conversation, client, server, models, exercises);
the HTTP layer is in `web/`, the kit's own engine in `engine/`, their contract in `backend.py`. A
request's path:

    POST / or /v1/chat/completions    web/tutorial_routes.py, web/openai_routes.py
    admission within the limits       web/admission.py, web/limits.py
    backend.prepare, backend.start    engine/engine.py (the kit's own) or upstream.py (vLLM)
    the worker's step                 engine/batch.py: schedule, join or prefill, decode, drop
    next token, its text              engine/sampler.py, engine/generation.py, engine/text_stream.py
    the answer, streamed or whole     back in the route, as the tutorial's JSON or OpenAI's events

The public names are imported on first use, so that `import tutorial_api.hello` (notebook 1) and
the client start without loading torch and transformers.
"""

import importlib

_HOMES = {
    "PRESETS": "models",
    "ModelNotAvailable": "models",
    "load_model": "models",
    "ChatInputError": "backend",
    "chat": "conversation",
    "create_app": "web.app",
    "get_completion": "client",
    "PortInUse": "server",
    "start_server": "server",
    "Settings": "settings",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'tutorial_api' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tutorial_api.{_HOMES[name]}"), name)
    globals()[name] = value  # found once, then a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *__all__])

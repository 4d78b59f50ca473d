"""The HTTP layer: the FastAPI app, its routes, schemas and errors, keys, limits, request log.

It calls a backend (`tutorial_api.backend`) and nothing else of the engine; each backend error
becomes an HTTP status here, in `errors.py`.
"""

"""Refusals and request errors, answered in each API's own error shape.

The tutorial's on `POST /`, OpenAI's on `/v1`; an unexpected error too, with its details only in the
server's log.
"""

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tutorial_api.backend import BackendBusy, BackendError, BackendStopped, ChatInputError
from tutorial_api.upstream import UpstreamError
from tutorial_api.web.openai_schemas import ErrorResponse
from tutorial_api.web.tutorial_schemas import ChatError, now

logger = logging.getLogger(__name__)

# The HTTP status and OpenAI error code of each backend error; an upstream's error brings its own.
_BACKEND_STATUS = {BackendBusy: (503, "server_busy"), BackendStopped: (503, "server_unavailable")}
# Our names for request fields, as OpenAI's clients know them.
_OPENAI_PARAM = {"prompt": "messages", "history": "messages", "max_length": "max_tokens"}


class UTF8JSONResponse(JSONResponse):
    """JSON whose content type names its charset: Windows PowerShell 5.1 needs it for Chinese."""

    def init_headers(self, headers=None) -> None:
        """Set the headers; OpenAPI still documents the media type as plain application/json."""
        super().init_headers({"content-type": "application/json; charset=utf-8", **(headers or {})})


def openai_error(
    status: int,
    message: str,
    param: str | None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers=None,
) -> JSONResponse:
    """Return OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = ErrorResponse(error={"message": message, "type": kind, "param": param, "code": code})
    return UTF8JSONResponse(body.model_dump(), status, headers=headers)


def tutorial_error(status: int, field: str, message: str, headers=None) -> JSONResponse:
    """Return the error shape of `POST /`: the HTTP status, the field to fix, and why."""
    body = ChatError(status=status, field=field, message=message, time=now())
    return UTF8JSONResponse(body.model_dump(), status, headers=headers)


class Refusal(HTTPException):
    """A request the server will not serve: `field` names what to fix, `code` is OpenAI's."""

    def __init__(
        self, status: int, message: str, *, field: str = "", code: str | None = None, headers=None
    ):
        super().__init__(status, message, headers)
        self.field = field
        self.code = code


def backend_refusal(error: BackendError) -> Refusal:
    """Return a backend's error as the server's refusal, with its HTTP status and Retry-After."""
    if isinstance(error, UpstreamError):
        status, code = error.status, error.code
    else:
        status, code = _BACKEND_STATUS.get(type(error), (500, "server_error"))
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return Refusal(status, str(error), field=error.field, code=code, headers=headers)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


async def http_error(request: Request, error: HTTPException):
    """Answer a refusal, or FastAPI's and Starlette's own errors, in the request's API's shape."""
    if error.status_code == 400 and not isinstance(error, Refusal):
        # FastAPI's answer to a body it cannot read as text; POST / answers every bad body with 422.
        error = Refusal(
            400 if _is_openai(request) else 422,
            "The body is not valid JSON: it must be UTF-8 text.",
            field="body",
        )
    field, code = getattr(error, "field", ""), getattr(error, "code", None)
    if _is_openai(request):
        kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
        return openai_error(
            error.status_code, str(error.detail), field or None, kind, code, headers=error.headers
        )
    return tutorial_error(error.status_code, field, str(error.detail), headers=error.headers)


async def unservable_chat(request: Request, error: ChatInputError):
    """Answer a chat the model cannot serve: 422 on `POST /`, 400 on `/v1`, naming the field."""
    if _is_openai(request):
        return await http_error(
            request, Refusal(400, str(error), field=_OPENAI_PARAM.get(error.field, error.field))
        )
    return await http_error(request, Refusal(422, str(error), field=error.field))


async def invalid_request(request: Request, error: RequestValidationError):
    """Answer pydantic's errors in each API's own shape, naming the first offending field."""
    problems = [_describe(problem) for problem in error.errors()]
    message = "; ".join(message for _, message in problems)
    if _is_openai(request):
        return openai_error(400, message, problems[0][0])
    return tutorial_error(422, problems[0][0], message)


def _describe(problem: dict) -> tuple[str, str]:
    location = problem["loc"][1:] if problem["loc"][:1] == ("body",) else problem["loc"]
    if problem["type"] == "json_invalid":
        return "body", f"The body is not valid JSON: {problem['ctx']['error']}."
    if not location:
        return "body", "The body must be a JSON object, sent with Content-Type: application/json."
    field = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in location
    ).lstrip(".")
    return field, f"{field}: {problem['msg']}"


class CatchAll:
    """ASGI middleware: an error no handler expected becomes a 500 in its API's shape.

    It is logged under the request's id; a response already under way is cut off instead.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            logger.exception("Request %s failed", scope.get("state", {}).get("request_id", "-"))
            if started:
                raise
            request = Request(scope, receive)
            answer = await http_error(
                request,
                Refusal(
                    500,
                    "The server failed to answer; its log has the details "
                    "under this request's X-Request-ID.",
                    code="server_error",
                ),
            )
            await answer(scope, receive, send)

"""Request and response bodies of the tutorial's `POST /`, and its error shape."""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# One earlier turn: [the user's message, the assistant's answer].
HistoryPair = Annotated[list[str], Field(min_length=2, max_length=2)]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"


class ChatRequest(BaseModel):
    """The original tutorial's request; omitted or null settings take the tutorial's defaults."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={"examples": [{"prompt": "你好", "history": []}]},
    )

    prompt: str = Field(
        min_length=1,
        description="the user's new message",
    )
    history: list[HistoryPair] | None = Field(
        default=None,
        description="earlier turns as [user, assistant] pairs, oldest first",
    )
    max_length: int | None = Field(
        default=None,
        ge=1,
        description="total token budget, prompt and history included (default 2048)",
    )
    top_p: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="nucleus sampling mass (default 0.7)",
    )
    temperature: float | None = Field(
        default=None,
        ge=0,
        le=2,
        description="0 for greedy decoding, higher for more varied answers (default 0.95)",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        """Refuse a prompt of whitespace only: min_length=1 lets " " through."""
        if not prompt.strip():
            raise ValueError("prompt must contain some text, not only whitespace")
        return prompt


class ChatResponse(BaseModel):
    """The original tutorial's answer: the reply, the updated history, a status and a timestamp."""

    response: str
    history: list[HistoryPair]
    status: int = Field(200, description="always 200, as in the original tutorial")
    time: str = Field(
        pattern=_TIME_PATTERN,
        description="local time of the answer, YYYY-MM-DD HH:MM:SS",
    )


class ChatError(BaseModel):
    """What `POST /` answers to a request it cannot serve: the status, the field to fix, and why."""

    status: int
    field: str
    message: str
    time: str = Field(pattern=_TIME_PATTERN)


class Health(BaseModel):
    """What `GET /health` answers: whether the server can generate, with what, how busy it is."""

    status: Literal["ok", "unavailable"] = "ok"
    model: str
    dtype: str | None = Field(
        default=None,
        description="the number format the model computes in, e.g. bfloat16 "
        "(the kit's own engine; absent in front of an upstream)",
    )
    active_requests: int = Field(description="requests generating or waiting")
    reason: str | None = Field(
        default=None,
        description="why the server cannot generate now (with 503 only)",
    )


def now() -> str:
    """Return the local time as the tutorial writes it: YYYY-MM-DD HH:MM:SS."""
    return datetime.now().strftime(TIME_FORMAT)

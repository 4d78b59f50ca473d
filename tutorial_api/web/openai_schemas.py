"""Request and response bodies of the OpenAI-compatible `/v1/chat/completions` and `/v1/models`."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Strict, as the JSON schema says: `"temperature": false` is refused, not read as 0.
STRICT = ConfigDict(strict=True)
# Stop strings: as many as OpenAI takes, each far longer than any end marker a chat needs.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


class TextPart(BaseModel):
    """One text part of a message's content, as OpenAI's clients may send it."""

    model_config = STRICT

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One message of the conversation: who says it, and the text, whole or in parts."""

    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def for_template(self) -> dict:
        """Return the message as the chat template takes it; `developer` becomes `system`."""
        if isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    """How to stream: whether a last chunk carries the token usage."""

    model_config = STRICT

    include_usage: bool = False


# OpenAI's request fields this server does not implement: refused by name, not silently ignored.
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
)


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request.

    `model` may name the served model or anything else: there is one model. Fields in UNSUPPORTED
    are refused; other unknown fields are ignored.
    """

    model_config = ConfigDict(
        strict=True,
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m",
                    "messages": [{"role": "user", "content": "你好"}],
                    "max_tokens": 64,
                }
            ]
        },
    )

    model: str | None = Field(default=None, description="ignored: the server has one model")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="new tokens at most")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="new tokens at most (newer name)"
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="0 for greedy decoding (default: the model's, else 1)"
    )
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="default: the model's, else 1"
    )
    presence_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="lowers tokens already used"
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="lowers tokens by how often they were used"
    )
    logprobs: bool = Field(default=False, description="the log-probability of each answer token")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="with logprobs: this many likeliest tokens at each position",
    )
    stop: str | list[str] | None = Field(
        default=None,
        description=f"up to {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters "
        "that end the answer",
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="makes sampling repeatable"
    )
    n: int = Field(default=1, ge=1, le=1, description="only 1 answer per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _few_and_short(cls, stop):
        """Return the stop strings as a list; refuse too many, or too long a one."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages):
        """Refuse a conversation that does not end with the user's message: nothing to answer."""
        if messages[-1].role != "user":
            raise ValueError("the last message must come from the user")
        return messages

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top_logprobs, info):
        """Refuse top_logprobs without logprobs, as OpenAI does."""
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return top_logprobs

    def unsupported(self) -> list[str]:
        """Return the fields this request sets that the server does not implement."""
        return [name for name in UNSUPPORTED if (self.model_extra or {}).get(name) is not None]


class PromptTokensDetails(BaseModel):
    """What became of the prompt's tokens."""

    cached_tokens: int = Field(
        description="the prompt's tokens whose keys and values a recent request had computed"
    )


class Usage(BaseModel):
    """How many tokens the request took: its prompt's, its answer's, and both together."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    """The answer, as a message from the assistant."""

    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    """A token, its log-probability, and its UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """An answer token's log-probability, with the likeliest tokens at its position."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """The log-probabilities of the answer's tokens, in order."""

    content: list[TokenLogprob]


class Choice(BaseModel):
    """The one answer, how it ended, and its log-probabilities if asked for."""

    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    """OpenAI's chat completion: the answer to a request asked without streaming."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    """The served model, as `/v1/models` lists it."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tutorial_api"


class ModelList(BaseModel):
    """What `/v1/models` answers: the one model this server runs."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """What went wrong, the request field at fault if any, and a code a program can test."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail

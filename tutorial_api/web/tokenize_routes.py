"""`POST /tokenize`, as vLLM has it: how many tokens a chat takes, and the model's context.

A kit serving through this server (as its upstream) asks it, to keep max_length and
max_prompt_tokens exact.
"""

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from tutorial_api.web.errors import Refusal
from tutorial_api.web.openai_schemas import STRICT, Message

router = APIRouter(tags=["tokens"])


class TokenizeRequest(BaseModel):
    """A chat to count, as OpenAI's messages; `model` is ignored, as on /v1."""

    model_config = STRICT

    model: str | None = None
    messages: list[Message] = Field(
        min_length=1, description="counted with the assistant's turn opened"
    )


class TokenCount(BaseModel):
    """The chat's token count, and the model's context."""

    count: int = Field(description="the chat's tokens after the chat template")
    max_model_len: int = Field(description="the model's context: prompt and answer together")


@router.post("/tokenize", response_model=TokenCount)
async def tokenize(body: TokenizeRequest, request: Request):
    """Count the tokens the chat takes, as the model reads it."""
    messages = [message.for_template() for message in body.messages]
    counted = await request.app.state.engine.count(messages)
    if counted is None:
        raise Refusal(
            404, "This server cannot count tokens: its upstream server has no POST /tokenize."
        )
    count, max_model_len = counted
    return TokenCount(count=count, max_model_len=max_model_len)

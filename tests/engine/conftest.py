"""Fixtures for the engine's tests: a fresh engine per scenario, and the prompts they send."""

import asyncio
from functools import partial

import pytest

from tutorial_api.conversation import build_messages, prepare
from tutorial_api.engine.engine import Engine


@pytest.fixture
def prompts():
    """Prompts of many lengths, in two languages."""
    return [
        "你好",
        "Tell me a story",
        "What is FastAPI?",
        "Question number 3",
        "给这个故事起一个标题",
        "A longer question about the many uses of batching in servers",
        "Hi",
        "Why?",
    ]


@pytest.fixture
def run_engine():
    """Run `scenario(engine, submit)` on a fresh engine inside an event loop; return its result.

    `await submit(prompt, stop=(), **options)` starts a chat of one prompt and returns its
    Generation.
    """

    def run(model_and_tokenizer, scenario, **engine_options):
        model, tokenizer = model_and_tokenizer

        async def submit(engine, prompt, stop=(), **options):
            prepared = prepare(model, tokenizer, build_messages(prompt), **options)
            return await engine.start(prepared, stop=stop)

        async def main():
            engine = Engine(model, tokenizer, **engine_options)
            try:
                return await scenario(engine, partial(submit, engine))
            finally:
                engine.close()

        return asyncio.run(main())

    return run


@pytest.fixture
def first_piece():
    """Wait until a generation has decoded its first token: it is in the running batch."""

    async def wait(generation, timeout=10.0):
        for _ in range(int(timeout / 0.001)):
            if generation.completion_tokens:
                return
            await asyncio.sleep(0.001)
        raise AssertionError("no token within the timeout")

    return wait

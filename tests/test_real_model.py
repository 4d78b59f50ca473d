"""the real offline default model, end to end."""

import asyncio

import pytest
import requests
import torch

from tutorial_api import chat, create_app, load_model, start_server
from tutorial_api.chat import build_messages, prepare
from tutorial_api.engine import Engine
from tutorial_api.models import cpu_has_native_bf16

pytestmark = pytest.mark.real_model


def test_greedy_answer_names_paris(smollm2):
    response, history = chat(*smollm2, "What is the capital of France?", temperature=0, max_new_tokens=30)
    assert "Paris" in response
    assert history == [["What is the capital of France?", response]]


def test_served_on_the_tutorials_port_with_the_tutorials_request():
    server = start_server(create_app(), port=6006, log_level="warning")
    try:
        answer = requests.post("http://127.0.0.1:6006", headers={"Content-Type": "application/json"},
                               json={"prompt": "What is the capital of France?", "history": [], "temperature": 0})
    finally:
        server.stop()
    body = answer.json()
    assert "Paris" in body["response"]
    assert body["history"] == [["What is the capital of France?", body["response"]]]


# English and Chinese prompts whose greedy answers, 32 tokens long, bf16 leaves word for word as they are in fp32.
SAME_IN_BF16 = ["What is the capital of France?", "What is 2 + 2?", "Give me three tips for learning Python.",
                "Write a haiku about the sea.", "你好", "用一句话介绍一下你自己。", "中国的首都是哪里？"]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16, so dtype auto computes in float32 "
                                                      "here: there is no bf16 answer of the default to compare")
def test_the_default_models_greedy_answers_in_bf16_equal_its_answers_in_fp32():
    answers = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_model("smollm2-135m", dtype=dtype)
        assert model.dtype == getattr(torch, dtype)
        answers[dtype] = [chat(model, tokenizer, prompt, temperature=0, max_new_tokens=32)[0] for prompt in SAME_IN_BF16]
    assert answers["bfloat16"] == answers["float32"]
    assert all(answers["float32"])


def test_a_chats_next_turn_from_the_prefix_cache_answers_as_computed_afresh():
    model, tokenizer = load_model("smollm2-135m", dtype="float32")  # bf16 rounds differently at each batch shape
    first, follow_up = "What is the capital of France?", "And what is the capital of Italy?"

    async def two_turns(prefix_cache_mb):
        engine = Engine(model, tokenizer, prefix_cache_mb=prefix_cache_mb)
        try:
            answer = await engine.submit(prepare(model, tokenizer, build_messages(first), max_new_tokens=24,
                                                 temperature=0)).text()
            turn = engine.submit(prepare(model, tokenizer, build_messages(follow_up, [[first, answer]]),
                                         max_new_tokens=24, temperature=0))
            return answer, await turn.text(), turn.cached_tokens
        finally:
            engine.close()

    afresh, cached = asyncio.run(two_turns(0)), asyncio.run(two_turns(256))
    assert cached[:2] == afresh[:2] and "Rome" in cached[1]
    assert afresh[2] == 0 and cached[2] > len(tokenizer(afresh[0]).input_ids)  # the first turn's prompt and answer

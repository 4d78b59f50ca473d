import asyncio

import pytest
import torch

from tutorial_api import chat
from tutorial_api.chat import build_messages, prepare
from tutorial_api.engine import Engine, EngineBusy

PROMPTS = ["你好", "Tell me a story", "What is FastAPI?", "Question number 3", "给这个故事起一个标题",
           "A longer question about the many uses of batching in servers", "Hi", "Why?"]


def run(tiny, scenario, **engine_options):
    """run `scenario(engine, submit)` on a fresh engine inside an event loop."""
    model, tokenizer = tiny

    async def main():
        engine = Engine(model, tokenizer, **engine_options)
        try:
            return await scenario(engine, lambda prompt, seed=None, stop=(), **options: engine.submit(
                prepare(model, tokenizer, build_messages(prompt), **options), seed=seed, stop=stop))
        finally:
            engine.close()

    return asyncio.run(main())


def test_staggered_concurrent_requests_match_one_at_a_time_greedy(tiny):
    budgets = [5, 30, 12, 30, 7, 20, 30, 3]
    expected = [chat(*tiny, p, max_new_tokens=n, temperature=0)[0] for p, n in zip(PROMPTS, budgets)]

    async def scenario(engine, submit):
        async def one(index):
            await asyncio.sleep(0.01 * index)
            return (await submit(PROMPTS[index], max_new_tokens=budgets[index], temperature=0).text()).strip()

        answers = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        return answers, engine.largest_batch

    answers, largest_batch = run(tiny, scenario)
    assert answers == expected
    assert largest_batch > 1


def test_batching_decodes_many_requests_in_few_steps(tiny):
    async def scenario(engine, submit):
        generations = [submit(p, max_new_tokens=16, temperature=0) for p in PROMPTS]
        await asyncio.gather(*(g.text() for g in generations))
        return engine.steps, sum(g.completion_tokens for g in generations)

    steps, tokens = run(tiny, scenario)
    assert steps < tokens / 4, f"{steps} decoding steps for {tokens} tokens: requests were not batched"


def test_each_request_keeps_its_own_sampling(tiny):
    greedy_alone = chat(*tiny, PROMPTS[1], max_new_tokens=12, temperature=0)[0]

    async def scenario(engine, submit):
        greedy = submit(PROMPTS[1], max_new_tokens=12, temperature=0)
        seeded = [submit(PROMPTS[1], max_new_tokens=12, temperature=1.0, top_p=1.0, seed=s) for s in (5, 5, 6)]
        return [await g.text() for g in [greedy, *seeded]]

    greedy, first, same_seed, other_seed = run(tiny, scenario)
    assert greedy.strip() == greedy_alone
    assert first == same_seed
    assert first != other_seed


def test_stop_strings_and_budgets_set_the_finish_reason(tiny):
    reference = chat(*tiny, PROMPTS[2], max_new_tokens=20, temperature=0)[0]
    stop_word = reference.split()[3]

    async def scenario(engine, submit):
        stopped = submit(PROMPTS[2], max_new_tokens=20, temperature=0, stop=[stop_word])
        budget = submit(PROMPTS[2], max_new_tokens=20, temperature=0)
        return (await stopped.text(), stopped.finish_reason), (await budget.text(), budget.finish_reason, budget.completion_tokens)

    (stopped_text, stopped_reason), (text, reason, tokens) = run(tiny, scenario)
    assert stopped_reason == "stop" and stop_word not in stopped_text
    assert reference.startswith(stopped_text.strip())
    assert (reason, tokens) == ("length", 20) and text.strip() == reference


def test_a_cancelled_request_leaves_within_one_step(tiny):
    async def scenario(engine, submit):
        long = submit(PROMPTS[1], max_new_tokens=900, temperature=0)
        pieces = long.stream()
        await pieces.__anext__()
        await pieces.aclose()
        steps_at_cancel = engine.steps
        await wait_until_idle(engine)
        return engine.steps - steps_at_cancel, long.finish_reason, long.completion_tokens

    steps_after, reason, tokens = run(tiny, scenario)
    assert steps_after <= 2
    assert reason == "cancelled" and tokens < 900


def test_a_full_queue_refuses_at_once(tiny):
    async def scenario(engine, submit):
        running = submit(PROMPTS[0], max_new_tokens=900, temperature=0)
        while not engine.steps:
            await asyncio.sleep(0.001)
        waiting = submit(PROMPTS[1], max_new_tokens=5, temperature=0)
        with pytest.raises(EngineBusy):
            submit(PROMPTS[2], max_new_tokens=5, temperature=0)
        running.cancel()
        return await waiting.text(), waiting.finish_reason

    _, reason = run(tiny, scenario, max_batch_size=1, max_waiting=1)
    assert reason == "length"


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(tiny):
    model, tokenizer = tiny

    async def scenario(engine, submit):
        broken = prepare(model, tokenizer, build_messages("hi"), max_new_tokens=5)
        broken.input_ids = torch.full_like(broken.input_ids, model.config.vocab_size + 10)
        with pytest.raises(IndexError):
            await engine.submit(broken).text()
        healthy = submit("hi", max_new_tokens=5, temperature=0)
        text = await healthy.text()
        await wait_until_idle(engine)
        return text, healthy.finish_reason

    assert run(tiny, scenario)[1] == "length"


async def wait_until_idle(engine, timeout=5.0):
    """the worker drops finished rows just after it sends their last piece."""
    for _ in range(int(timeout / 0.001)):
        if not engine.active:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{engine.active} requests still active")

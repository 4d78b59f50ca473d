import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import pytest
import torch

from tutorial_api import chat, engine as engine_module
from tutorial_api.chat import build_messages, prepare
from tutorial_api.engine import Engine, EngineBusy, EngineError, EngineStopped

PROMPTS = ["你好", "Tell me a story", "What is FastAPI?", "Question number 3", "给这个故事起一个标题",
           "A longer question about the many uses of batching in servers", "Hi", "Why?"]


def run(tiny, scenario, **engine_options):
    """run `scenario(engine, submit)` on a fresh engine inside an event loop."""
    model, tokenizer = tiny

    async def main():
        engine = Engine(model, tokenizer, **engine_options)
        try:
            return await scenario(engine, partial(submit_to, engine, model, tokenizer))
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


def test_newcomers_prefill_in_groups_within_the_token_budget_and_still_batch(tiny, faulty, monkeypatch):
    prefills = []  # (rows, padded width) of each prefill
    model = faulty(fails=lambda call, input_ids: input_ids.shape[1] > 1 and prefills.append(tuple(input_ids.shape)))
    widest = max(prepare(*tiny, build_messages(p)).input_ids.shape[1] for p in PROMPTS)
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS_CPU", 3 * widest)

    async def scenario(engine, submit):
        generations = [submit(p, max_new_tokens=8, temperature=0) for p in PROMPTS * 2]
        await asyncio.gather(*(g.text() for g in generations))
        return engine.largest_batch

    largest_batch = run((model, tiny[1]), scenario)
    assert sum(rows for rows, _ in prefills) == 2 * len(PROMPTS)
    assert all(rows * width <= 3 * widest for rows, width in prefills), prefills
    assert largest_batch > 3  # the groups joined one batch


@pytest.mark.parametrize("prefix_cache_mb", [256, 0])
def test_a_chats_next_turn_computes_only_what_is_new_and_answers_as_it_would_without(tiny, faulty, prefix_cache_mb):
    prefilled = []  # the new tokens of each prefill
    model = faulty(fails=lambda call, input_ids: input_ids.shape[1] > 1 and prefilled.append(input_ids.shape[1]))

    async def scenario(engine, submit):
        first_answer = await submit(PROMPTS[1], max_new_tokens=12, temperature=0).text()
        generation = engine.submit(prepare(*tiny, build_messages(PROMPTS[2], [[PROMPTS[1], first_answer]]),
                                           max_new_tokens=12, temperature=0))
        return first_answer, await generation.text(), generation.cached_tokens

    first_answer, answer, cached = run((model, tiny[1]), scenario, prefix_cache_mb=prefix_cache_mb)
    history = [[PROMPTS[1], first_answer]]
    assert answer.strip() == chat(*tiny, PROMPTS[2], history, max_new_tokens=12, temperature=0)[0]
    first_prompt, next_prompt = (prepare(*tiny, build_messages(p, h)).input_ids.shape[1]
                                 for p, h in ((PROMPTS[1], []), (PROMPTS[2], history)))
    assert cached == (first_prompt + 11 if prefix_cache_mb else 0)  # its prompt, and its answer but the last token
    assert prefilled == [first_prompt, next_prompt - cached]


def test_newcomers_reusing_prefixes_of_any_length_or_none_are_admitted_together_and_answer_as_alone(tiny, faulty):
    model, tokenizer = tiny
    history = [[PROMPTS[1], "Once upon a time"]]
    prepared = [prepare(model, tokenizer, build_messages(PROMPTS[2], history), max_new_tokens=10, temperature=0),
                prepare(model, tokenizer, build_messages(PROMPTS[3], history), max_new_tokens=10, temperature=0),
                prepare(model, tokenizer, build_messages(PROMPTS[0]), max_new_tokens=10, temperature=0)]
    no_template = tokenizer("Once upon a time there was", return_tensors="pt").input_ids  # shares no first token
    prepared.append(replace(prepared[0], input_ids=no_template))
    prepared.append(prepare(model, tokenizer, build_messages(PROMPTS[1]), max_new_tokens=10, temperature=0))
    prefill_rows = []
    held = faulty(fails=lambda call, input_ids: input_ids.shape[1] > 1 and prefill_rows.append(input_ids.shape[0]))

    async def alone(engine, submit):
        answers = []
        for one in prepared:
            generation = engine.submit(one)
            await generation.text()
            answers.append(generation.tokens)
        return answers

    async def together(engine, submit):
        await submit(PROMPTS[1], max_new_tokens=6, temperature=0).text()
        held.gate = threading.Event()
        submit(PROMPTS[4], max_new_tokens=1, temperature=0)
        await asyncio.to_thread(held.entered.wait)  # the worker is busy: the newcomers all wait for the next step
        generations = [engine.submit(p) for p in prepared]
        held.gate.set()
        await asyncio.gather(*(g.text() for g in generations))
        return [g.tokens for g in generations], [g.cached_tokens for g in generations]

    expected = run(tiny, alone, prefix_cache_mb=0)
    answers, cached = run((held, tokenizer), together)
    assert answers == expected
    assert cached[0] == cached[1] > cached[2] > cached[3] == 0
    assert cached[4] == prepared[4].input_ids.shape[1] - 1  # all but its last token: it joins with no prefill
    assert prefill_rows[-1] == len(prepared) - 1


def test_a_prompt_cached_but_for_its_last_token_joins_the_running_rows_with_no_prefill_and_answers_as_alone(tiny,
                                                                                                          faulty):
    forwards = []  # each forward's input ids: [rows, new tokens]
    held = faulty(fails=lambda call, input_ids: forwards.append(tuple(input_ids.shape)))

    async def scenario(engine, submit):
        await submit(PROMPTS[1], max_new_tokens=3, temperature=0).text()  # its prompt stays in the prefix cache
        running = submit(PROMPTS[0], max_new_tokens=30, temperature=0)
        await first_piece(running)
        held.gate = threading.Event()
        await asyncio.to_thread(held.entered.wait)  # the worker is in a step: the newcomer waits for the next
        forwards.clear()
        again = submit(PROMPTS[1], max_new_tokens=10, temperature=0)
        held.gate.set()
        answers = await asyncio.gather(running.text(), again.text())
        return [answer.strip() for answer in answers], again.prompt_tokens - again.cached_tokens

    answers, computed = run((held, tiny[1]), scenario)
    assert answers == [chat(*tiny, PROMPTS[0], max_new_tokens=30, temperature=0)[0],
                       chat(*tiny, PROMPTS[1], max_new_tokens=10, temperature=0)[0]]
    assert computed == 1
    assert forwards[:2] == [(1, 1), (2, 1)]  # the step it waited for, then one step for both rows


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


def test_a_failed_prefill_fails_only_its_newcomers_while_the_batch_goes_on(tiny, faulty):
    prefills = []
    model = faulty(fails=lambda call, input_ids: prefills.append(input_ids.shape[1] > 1) or prefills.count(True) == 2
                   and prefills[-1])  # the second request's prefill

    async def scenario(engine, submit):
        running = submit(PROMPTS[1], max_new_tokens=20, temperature=0)
        await first_piece(running)
        with pytest.raises(EngineError) as failure:
            await submit(PROMPTS[2], max_new_tokens=5, temperature=0).text()
        return await running.text(), running.finish_reason, str(failure.value)

    _, reason, message = run((model, tiny[1]), scenario)
    assert reason == "length"
    assert "secret" not in message  # the cause goes to the log, not to the client


def test_a_failed_decode_while_newcomers_join_fails_them_all_and_the_engine_goes_on(tiny, faulty):
    prefills = []

    def decode_right_after_a_second_prefill(call, input_ids):
        prefills.append(input_ids.shape[1] > 1)
        return len(prefills) > 2 and prefills[-2] and prefills.count(True) == 2 and not prefills[-1]

    model = faulty(fails=decode_right_after_a_second_prefill)

    async def scenario(engine, submit):
        running = submit(PROMPTS[1], max_new_tokens=900, temperature=0)
        await first_piece(running)
        newcomer = submit(PROMPTS[2], max_new_tokens=900, temperature=0)
        outcomes = await asyncio.wait_for(asyncio.gather(running.text(), newcomer.text(), return_exceptions=True), 20)
        after = await submit("hi", max_new_tokens=3, temperature=0).text()
        return outcomes, after, engine.active, engine.problem

    outcomes, after, active, problem = run((model, tiny[1]), scenario, max_batch_size=4)
    assert all(isinstance(outcome, EngineError) for outcome in outcomes), outcomes
    assert after and active == 0 and problem is None


def test_a_finished_request_keeps_its_finish_reason(tiny):
    async def scenario(engine, submit):
        done = submit("hi", max_new_tokens=2, temperature=0)
        text = await done.text()
        done.finish("error", EngineError("a late failure"))
        return text, done.finish_reason, engine.active

    text, reason, active = run(tiny, scenario)
    assert text and reason == "length" and active == 0


def test_a_cancelled_waiting_request_gives_its_place_to_the_next(slow_tiny):
    async def scenario(engine, submit):
        running = submit(PROMPTS[0], max_new_tokens=900, temperature=0)
        await first_piece(running)
        waiting = submit(PROMPTS[1], max_new_tokens=5, temperature=0)
        waiting.cancel()
        next_one = submit(PROMPTS[2], max_new_tokens=3, temperature=0)  # the queue holds one: this one fits now
        running.cancel()
        return waiting.finish_reason, await next_one.text(), next_one.finish_reason

    cancelled, _, reason = run(slow_tiny, scenario, max_batch_size=1, max_waiting=1)
    assert (cancelled, reason) == ("cancelled", "length")


def test_a_request_being_prefilled_counts_as_active(tiny, faulty):
    model = faulty()
    model.gate = threading.Event()

    async def scenario(engine, submit):
        generation = submit("hi", max_new_tokens=3, temperature=0)
        await asyncio.to_thread(model.entered.wait)
        seen = engine.active, generation.state
        model.gate.set()
        await generation.text()
        return seen

    assert run((model, tiny[1]), scenario) == (1, "prefilling")


def test_closing_ends_every_request_with_an_error_and_refuses_new_ones(slow_tiny):
    model, tokenizer = slow_tiny

    async def main():
        engine = Engine(model, tokenizer, max_batch_size=1)
        submit = partial(submit_to, engine, model, tokenizer)
        running = submit(PROMPTS[0], max_new_tokens=900, temperature=0)
        await first_piece(running)
        waiting = submit(PROMPTS[1], max_new_tokens=900, temperature=0)
        engine.close()
        outcomes = await asyncio.wait_for(asyncio.gather(running.text(), waiting.text(), return_exceptions=True), 5)
        with pytest.raises(EngineStopped):
            submit("hi", max_new_tokens=3)
        return outcomes, engine.active

    outcomes, active = asyncio.run(main())
    assert all(isinstance(outcome, EngineStopped) for outcome in outcomes), outcomes
    assert active == 0


class WorkerKilled(BaseException):
    """an error no step guard catches: it ends the worker thread."""


def test_a_dead_worker_fails_its_requests_and_says_so(tiny, faulty):
    model = faulty(fails=lambda call, input_ids: call == 2, error=WorkerKilled())

    async def scenario(engine, submit):
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(submit(PROMPTS[1], max_new_tokens=20, temperature=0).text(), 10)
        with pytest.raises(EngineStopped):
            submit("hi", max_new_tokens=3)
        return engine.problem

    problem = run((model, tiny[1]), scenario)
    assert "restart the server" in problem


def test_health_is_lost_after_failed_steps_and_back_once_it_generates(tiny, faulty):
    model = faulty(fails=lambda call, input_ids: call <= 3)

    async def scenario(engine, submit):
        for _ in range(3):
            with pytest.raises(EngineError):
                await submit("hi", max_new_tokens=3).text()
        lost = engine.problem
        await submit("hi", max_new_tokens=3).text()
        return lost, engine.problem

    lost, back = run((model, tiny[1]), scenario)
    assert "3 generation steps failed" in lost and back is None


class ContendedModel:
    """the tiny model as if another program took a core after its first `calm` calls: from then on, a call with
    more than one thread waits 0.1 s for it. Records the thread count each call ran with."""

    def __init__(self, model, calm=6):
        self._model, self._calm = model, calm
        self.threads: list[int] = []

    def __call__(self, **kwargs):
        self.threads.append(torch.get_num_threads())
        if len(self.threads) > self._calm and self.threads[-1] > 1:
            time.sleep(0.1)
        return self._model(**kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_the_worker_decodes_with_the_thread_count_its_policy_chooses(tiny, caplog):
    model = ContendedModel(tiny[0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two to choose from, on any machine: new threads start with the count last set
    try:
        async def scenario(engine, submit):
            await submit(PROMPTS[1], max_new_tokens=40, temperature=0).text()

        with caplog.at_level(logging.INFO, logger="tutorial_api.thread_policy"):
            run((model, tiny[1]), scenario)
        with ThreadPoolExecutor(1) as fresh:
            after = fresh.submit(torch.get_num_threads).result()
    finally:
        torch.set_num_threads(before)
    assert len(model.threads) > 30 and model.threads[0] == 2
    assert set(model.threads[-20:]) == {1}
    assert "CPU threads for decoding: 1 instead of 2" in caplog.text
    assert after == 2, "the worker left new threads with its own count"


def submit_to(engine, model, tokenizer, prompt, stop=(), **options):
    return engine.submit(prepare(model, tokenizer, build_messages(prompt), **options), stop=stop)


async def first_piece(generation, timeout=10.0):
    """wait until the generation has decoded its first token: it is in the running batch."""
    for _ in range(int(timeout / 0.001)):
        if generation.completion_tokens:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("no token within the timeout")


async def wait_until_idle(engine, timeout=5.0):
    """the worker drops finished rows just after it sends their last piece."""
    for _ in range(int(timeout / 0.001)):
        if not engine.active:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{engine.active} requests still active")

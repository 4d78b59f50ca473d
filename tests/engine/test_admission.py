"""Admission: newcomers join the running batch, in prefill groups, reusing cached prefixes."""

import asyncio
import threading
from dataclasses import replace

import pytest

from tutorial_api import chat
from tutorial_api.backend import BackendBusy
from tutorial_api.conversation import build_messages, prepare
from tutorial_api.engine import engine as engine_module


def test_staggered_requests_match_one_at_a_time_greedy(tiny, prompts, run_engine):
    """Staggered concurrent requests answer as one at a time, greedily, and batch."""
    budgets = [5, 30, 12, 30, 7, 20, 30, 3]
    expected = [
        chat(*tiny, p, max_new_tokens=n, temperature=0)[0]
        for p, n in zip(prompts, budgets, strict=True)
    ]

    async def scenario(engine, submit):
        async def one(index):
            await asyncio.sleep(0.01 * index)
            generation = await submit(prompts[index], max_new_tokens=budgets[index], temperature=0)
            return (await generation.text()).strip()

        answers = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return answers, engine.largest_batch

    answers, largest_batch = run_engine(tiny, scenario)
    assert answers == expected
    assert largest_batch > 1


def test_batching_decodes_many_requests_in_few_steps(tiny, prompts, run_engine):
    async def scenario(engine, submit):
        generations = [await submit(p, max_new_tokens=16, temperature=0) for p in prompts]
        await asyncio.gather(*(g.text() for g in generations))
        return engine.steps, sum(g.completion_tokens for g in generations)

    steps, tokens = run_engine(tiny, scenario)
    assert steps < tokens / 4, (
        f"{steps} decoding steps for {tokens} tokens: requests were not batched"
    )


def test_newcomers_prefill_in_groups_within_the_token_budget(
    tiny, faulty, monkeypatch, prompts, run_engine
):
    """Newcomers prefill in groups within the prefill token budget and still batch."""
    prefills = []  # (rows, padded width) of each prefill
    model = faulty(
        fails=lambda call, input_ids: (
            input_ids.shape[1] > 1 and prefills.append(tuple(input_ids.shape))
        )
    )
    widest = max(prepare(*tiny, build_messages(p)).input_ids.shape[1] for p in prompts)
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS_CPU", 3 * widest)

    async def scenario(engine, submit):
        generations = [await submit(p, max_new_tokens=8, temperature=0) for p in prompts * 2]
        await asyncio.gather(*(g.text() for g in generations))
        return engine.largest_batch

    largest_batch = run_engine((model, tiny[1]), scenario)
    assert sum(rows for rows, _ in prefills) == 2 * len(prompts)
    assert all(rows * width <= 3 * widest for rows, width in prefills), prefills
    # the groups joined one batch
    assert largest_batch > 3


@pytest.mark.parametrize("prefix_cache_mb", [256, 0], ids=["prefix_cache", "no_prefix_cache"])
def test_a_chats_next_turn_computes_only_what_is_new(
    tiny, faulty, prefix_cache_mb, prompts, run_engine
):
    """A chat's next turn computes only what is new and answers as it would without the cache."""
    prefilled = []  # the new tokens of each prefill
    model = faulty(
        fails=lambda call, input_ids: (
            input_ids.shape[1] > 1 and prefilled.append(input_ids.shape[1])
        )
    )

    async def scenario(engine, submit):
        first = await submit(prompts[1], max_new_tokens=12, temperature=0)
        first_answer = await first.text()
        next_turn = prepare(
            *tiny,
            build_messages(prompts[2], [[prompts[1], first_answer]]),
            max_new_tokens=12,
            temperature=0,
        )
        generation = await engine.start(next_turn)
        return first_answer, await generation.text(), generation.cached_tokens

    first_answer, answer, cached = run_engine(
        (model, tiny[1]), scenario, prefix_cache_mb=prefix_cache_mb
    )
    history = [[prompts[1], first_answer]]
    assert answer.strip() == chat(*tiny, prompts[2], history, max_new_tokens=12, temperature=0)[0]
    first_prompt, next_prompt = (
        prepare(*tiny, build_messages(p, h)).input_ids.shape[1]
        for p, h in ((prompts[1], []), (prompts[2], history))
    )
    # its prompt, and its answer but the last token
    assert cached == (first_prompt + 11 if prefix_cache_mb else 0)
    assert prefilled == [first_prompt, next_prompt - cached]


def test_newcomers_with_any_prefix_or_none_join_together(tiny, faulty, prompts, run_engine):
    """Newcomers reusing prefixes of any length, or none, join together and answer as alone."""
    model, tokenizer = tiny
    history = [[prompts[1], "Once upon a time"]]
    prepared = [
        prepare(
            model, tokenizer, build_messages(prompts[2], history), max_new_tokens=10, temperature=0
        ),
        prepare(
            model, tokenizer, build_messages(prompts[3], history), max_new_tokens=10, temperature=0
        ),
        prepare(model, tokenizer, build_messages(prompts[0]), max_new_tokens=10, temperature=0),
    ]
    # shares no first token
    no_template = tokenizer("Once upon a time there was", return_tensors="pt").input_ids
    prepared.append(replace(prepared[0], input_ids=no_template))
    prepared.append(
        prepare(model, tokenizer, build_messages(prompts[1]), max_new_tokens=10, temperature=0)
    )
    prefill_rows = []
    held = faulty(
        fails=lambda call, input_ids: (
            input_ids.shape[1] > 1 and prefill_rows.append(input_ids.shape[0])
        )
    )

    async def alone(engine, submit):
        answers = []
        for one in prepared:
            generation = await engine.start(one)
            await generation.text()
            answers.append(generation.answer_ids)
        return answers

    async def together(engine, submit):
        warm_up = await submit(prompts[1], max_new_tokens=6, temperature=0)
        await warm_up.text()
        held.gate = threading.Event()
        await submit(prompts[4], max_new_tokens=1, temperature=0)
        # the worker is busy: the newcomers all wait for the next step
        await asyncio.to_thread(held.entered.wait)
        generations = [await engine.start(p) for p in prepared]
        held.gate.set()
        await asyncio.gather(*(g.text() for g in generations))
        return [g.answer_ids for g in generations], [g.cached_tokens for g in generations]

    expected = run_engine(tiny, alone, prefix_cache_mb=0)
    answers, cached = run_engine((held, tokenizer), together)
    assert answers == expected
    assert cached[0] == cached[1] > cached[2] > cached[3] == 0
    # all but its last token: it joins with no prefill
    assert cached[4] == prepared[4].input_ids.shape[1] - 1
    assert prefill_rows[-1] == len(prepared) - 1


def test_a_prompt_cached_but_its_last_token_skips_prefill(
    tiny, faulty, prompts, run_engine, first_piece
):
    """A prompt cached but for its last token joins the running rows with no prefill, as alone."""
    forwards = []  # each forward's input ids: [rows, new tokens]
    held = faulty(fails=lambda call, input_ids: forwards.append(tuple(input_ids.shape)))

    async def scenario(engine, submit):
        # its prompt stays in the prefix cache
        cached = await submit(prompts[1], max_new_tokens=3, temperature=0)
        await cached.text()
        running = await submit(prompts[0], max_new_tokens=30, temperature=0)
        await first_piece(running)
        held.gate = threading.Event()
        # the worker is in a step: the newcomer waits for the next
        await asyncio.to_thread(held.entered.wait)
        forwards.clear()
        again = await submit(prompts[1], max_new_tokens=10, temperature=0)
        held.gate.set()
        answers = await asyncio.gather(running.text(), again.text())
        return [answer.strip() for answer in answers], again.prompt_tokens - again.cached_tokens

    answers, computed = run_engine((held, tiny[1]), scenario)
    assert answers == [
        chat(*tiny, prompts[0], max_new_tokens=30, temperature=0)[0],
        chat(*tiny, prompts[1], max_new_tokens=10, temperature=0)[0],
    ]
    assert computed == 1
    # the step it waited for, then one step for both rows
    assert forwards[:2] == [(1, 1), (2, 1)]


def test_a_full_queue_refuses_at_once(tiny, prompts, run_engine):
    async def scenario(engine, submit):
        running = await submit(prompts[0], max_new_tokens=900, temperature=0)
        while not engine.steps:
            await asyncio.sleep(0.001)
        waiting = await submit(prompts[1], max_new_tokens=5, temperature=0)
        with pytest.raises(BackendBusy):
            await submit(prompts[2], max_new_tokens=5, temperature=0)
        running.cancel()
        return await waiting.text(), waiting.finish_reason

    _, reason = run_engine(tiny, scenario, max_batch_size=1, max_waiting=1)
    assert reason == "length"


def test_a_request_being_prefilled_counts_as_active(tiny, faulty, run_engine):
    model = faulty()
    model.gate = threading.Event()

    async def scenario(engine, submit):
        generation = await submit("hi", max_new_tokens=3, temperature=0)
        await asyncio.to_thread(model.entered.wait)
        seen = engine.active, generation.status
        model.gate.set()
        await generation.text()
        return seen

    assert run_engine((model, tiny[1]), scenario) == (1, "prefilling")

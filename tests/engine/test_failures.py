"""Failures and health: a failed step fails only its requests, and /health says when it cannot go
on.
"""

import asyncio
import threading

import pytest

from tutorial_api import chat
from tutorial_api.backend import BackendError, BackendStopped


def test_a_failed_prefill_fails_only_its_newcomers(tiny, faulty, prompts, run_engine, first_piece):
    """A failed prefill fails only its newcomers while the batch goes on."""
    prefills = []
    # the second request's prefill
    model = faulty(
        fails=lambda call, input_ids: (
            prefills.append(input_ids.shape[1] > 1) or prefills.count(True) == 2 and prefills[-1]
        )
    )

    async def scenario(engine, submit):
        running = await submit(prompts[1], max_new_tokens=20, temperature=0)
        await first_piece(running)
        with pytest.raises(BackendError) as failure:
            newcomer = await submit(prompts[2], max_new_tokens=5, temperature=0)
            await newcomer.text()
        return await running.text(), running.finish_reason, str(failure.value)

    _, reason, message = run_engine((model, tiny[1]), scenario)
    assert reason == "length"
    assert "secret" not in message  # the cause goes to the log, not to the client


def test_a_failed_decode_fails_the_batch_and_the_engine_goes_on(
    tiny, faulty, prompts, run_engine, first_piece
):
    """A failed decode while newcomers join fails them all, and the engine goes on."""
    prefills = []

    def decode_right_after_a_second_prefill(call, input_ids):
        prefills.append(input_ids.shape[1] > 1)
        return len(prefills) > 2 and prefills[-2] and prefills.count(True) == 2 and not prefills[-1]

    model = faulty(fails=decode_right_after_a_second_prefill)

    async def scenario(engine, submit):
        running = await submit(prompts[1], max_new_tokens=900, temperature=0)
        await first_piece(running)
        newcomer = await submit(prompts[2], max_new_tokens=900, temperature=0)
        outcomes = await asyncio.wait_for(
            asyncio.gather(running.text(), newcomer.text(), return_exceptions=True), 20
        )
        later = await submit("hi", max_new_tokens=3, temperature=0)
        after = await later.text()
        return outcomes, after, engine.active, engine.unavailable_reason

    outcomes, after, active, reason = run_engine((model, tiny[1]), scenario, max_batch_size=4)
    assert all(isinstance(outcome, BackendError) for outcome in outcomes), outcomes
    assert after and active == 0 and reason is None


def test_closing_ends_every_request_and_refuses_new_ones(
    slow_tiny, prompts, run_engine, first_piece
):
    """Closing ends every request with an error and refuses new ones."""

    async def scenario(engine, submit):
        running = await submit(prompts[0], max_new_tokens=900, temperature=0)
        await first_piece(running)
        waiting = await submit(prompts[1], max_new_tokens=900, temperature=0)
        engine.close()
        outcomes = await asyncio.wait_for(
            asyncio.gather(running.text(), waiting.text(), return_exceptions=True), 5
        )
        with pytest.raises(BackendStopped):
            await submit("hi", max_new_tokens=3)
        return outcomes, engine.active

    outcomes, active = run_engine(slow_tiny, scenario, max_batch_size=1)
    assert all(isinstance(outcome, BackendStopped) for outcome in outcomes), outcomes
    assert active == 0


class WorkerKilled(BaseException):
    """An error no step guard catches: it ends the worker thread."""


def test_a_dead_worker_fails_its_requests_and_says_so(tiny, faulty, prompts, run_engine):
    model = faulty(fails=lambda call, input_ids: call == 2, error=WorkerKilled())

    async def scenario(engine, submit):
        generation = await submit(prompts[1], max_new_tokens=20, temperature=0)
        with pytest.raises(BackendStopped):
            await asyncio.wait_for(generation.text(), 10)
        with pytest.raises(BackendStopped):
            await submit("hi", max_new_tokens=3)
        return engine.unavailable_reason

    reason = run_engine((model, tiny[1]), scenario)
    assert "restart the server" in reason


def test_health_is_lost_after_failed_steps_and_back_later(tiny, faulty, run_engine):
    """Health is lost after failed steps and back once the engine generates again."""
    model = faulty(fails=lambda call, input_ids: call <= 3)

    async def scenario(engine, submit):
        for _ in range(3):
            with pytest.raises(BackendError):
                generation = await submit("hi", max_new_tokens=3)
                await generation.text()
        lost = engine.unavailable_reason
        generation = await submit("hi", max_new_tokens=3)
        await generation.text()
        return lost, engine.unavailable_reason

    lost, back = run_engine((model, tiny[1]), scenario)
    assert "3 generation steps failed" in lost and back is None


class NaNLogits:
    """A model like the one it wraps, but with NaN logits in the rows `poison` names for a call."""

    def __init__(self, model, poison):
        self._model, self._poison = model, poison

    def __call__(self, input_ids, **kwargs):
        output = self._model(input_ids=input_ids, **kwargs)
        for row in self._poison(input_ids, kwargs["position_ids"]):
            output.logits[row] = float("nan")
        return output

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_nan_logits_at_prefill_fail_that_row_alone(tiny, prompts, run_engine, first_piece):
    """A newcomer whose logits are NaN fails alone; the running row answers as if alone."""
    prefills = []

    def second_prefill(input_ids, positions):
        prefills.append(input_ids.shape[1] > 1)
        return [0] if prefills.count(True) == 2 and prefills[-1] else []

    async def scenario(engine, submit):
        running = await submit(prompts[1], max_new_tokens=20, temperature=0)
        await first_piece(running)
        broken = await submit(prompts[2], max_new_tokens=20, temperature=1.0)
        with pytest.raises(BackendError) as failure:
            await asyncio.wait_for(broken.text(), 20)
        return await running.text(), str(failure.value), engine.unavailable_reason

    answer, message, reason = run_engine((NaNLogits(tiny[0], second_prefill), tiny[1]), scenario)
    assert answer.strip() == chat(*tiny, prompts[1], max_new_tokens=20, temperature=0)[0]
    assert "NaN" in message and reason is None


def test_nan_logits_while_decoding_fail_that_row_alone(tiny, prompts, run_engine, first_piece):
    """A row whose logits turn NaN mid-answer fails alone, and its keys are not cached."""
    armed, poisoned = threading.Event(), []

    def longest_row_once(input_ids, positions):
        if not armed.is_set() or poisoned or input_ids.shape != (2, 1):
            return []
        poisoned.append(int(positions[:, -1].argmax()))
        return poisoned

    async def scenario(engine, submit):
        broken = await submit(prompts[5], max_new_tokens=40, temperature=1.0)
        healthy = await submit(prompts[0], max_new_tokens=20, temperature=0)
        await first_piece(broken)
        await first_piece(healthy)
        armed.set()
        outcomes = await asyncio.wait_for(
            asyncio.gather(broken.text(), healthy.text(), return_exceptions=True), 20
        )
        # Only the chat template's start (system prompt, "user" turn) is shared with the healthy
        # answer, which the prefix cache may hold by now.
        pairs = zip(broken.prompt_ids, healthy.prompt_ids, strict=False)
        shared = next(i for i, (a, b) in enumerate(pairs) if a != b)
        return outcomes, engine.prefixes.longest(broken.prompt_ids)[0], shared

    model = NaNLogits(tiny[0], longest_row_once)
    (failure, answer), cached, shared = run_engine((model, tiny[1]), scenario)
    assert isinstance(failure, BackendError) and "NaN" in str(failure)
    assert answer.strip() == chat(*tiny, prompts[0], max_new_tokens=20, temperature=0)[0]
    assert cached <= shared


def test_a_failed_prefill_after_a_join_leaves_no_finished_row(
    tiny, faulty, prompts, run_engine, first_piece
):
    """A row that joins and finishes in the step whose prefill then fails never decodes again."""
    armed = threading.Event()
    model = faulty(fails=lambda call, input_ids: armed.is_set() and input_ids.shape[1] > 1)

    async def scenario(engine, submit):
        cached = await submit(prompts[1], max_new_tokens=3, temperature=0)
        await cached.text()
        running = await submit(prompts[0], max_new_tokens=30, temperature=0)
        await first_piece(running)
        model.gate = threading.Event()
        await asyncio.to_thread(model.entered.wait)  # the worker is in a step
        # cached but its last token: it joins, and its one token ends it in the join's step
        joined = await submit(prompts[1], max_new_tokens=1, temperature=0)
        failing = await submit(prompts[2], max_new_tokens=5, temperature=0)
        armed.set()
        model.gate.set()
        with pytest.raises(BackendError):
            await failing.text()
        await joined.text()
        await running.text()
        return joined.completion_tokens, joined.finish_reason, running.finish_reason

    assert run_engine((model, tiny[1]), scenario) == (1, "length", "length")

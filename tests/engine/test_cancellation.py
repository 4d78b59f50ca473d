"""Cancellation: a request the client leaves frees its row, or its place in the queue, at once."""

import asyncio


async def wait_until_idle(engine, timeout=5.0):
    """Wait until no request is active: finished rows leave just after their last piece."""
    for _ in range(int(timeout / 0.001)):
        if not engine.active:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{engine.active} requests still active")


def test_a_cancelled_request_leaves_within_one_step(tiny, prompts, run_engine):
    async def scenario(engine, submit):
        long = await submit(prompts[1], max_new_tokens=900, temperature=0)
        pieces = long.stream()
        await pieces.__anext__()
        await pieces.aclose()
        steps_at_cancel = engine.steps
        await wait_until_idle(engine)
        return engine.steps - steps_at_cancel, long.finish_reason, long.completion_tokens

    steps_after, reason, tokens = run_engine(tiny, scenario)
    assert steps_after <= 2
    assert reason == "cancelled" and tokens < 900


def test_a_cancelled_waiting_request_gives_its_place_to_the_next(
    slow_tiny, prompts, run_engine, first_piece
):
    async def scenario(engine, submit):
        running = await submit(prompts[0], max_new_tokens=900, temperature=0)
        await first_piece(running)
        waiting = await submit(prompts[1], max_new_tokens=5, temperature=0)
        waiting.cancel()
        # the queue holds one: this one fits now
        next_one = await submit(prompts[2], max_new_tokens=3, temperature=0)
        running.cancel()
        return waiting.finish_reason, await next_one.text(), next_one.finish_reason

    cancelled, _, reason = run_engine(slow_tiny, scenario, max_batch_size=1, max_waiting=1)
    assert (cancelled, reason) == ("cancelled", "length")

"""Each request's own sampling, and how its answer ends: a stop string, its budget, once only."""

from tutorial_api import chat
from tutorial_api.backend import BackendError, FinishReason


def test_each_request_keeps_its_own_sampling(tiny, prompts, run_engine):
    greedy_alone = chat(*tiny, prompts[1], max_new_tokens=12, temperature=0)[0]

    async def scenario(engine, submit):
        greedy = await submit(prompts[1], max_new_tokens=12, temperature=0)
        seeded = [
            await submit(prompts[1], max_new_tokens=12, temperature=1.0, top_p=1.0, seed=s)
            for s in (5, 5, 6)
        ]
        return [await g.text() for g in [greedy, *seeded]]

    greedy, first, same_seed, other_seed = run_engine(tiny, scenario)
    assert greedy.strip() == greedy_alone
    assert first == same_seed
    assert first != other_seed


def test_stop_strings_and_budgets_set_the_finish_reason(tiny, prompts, run_engine):
    reference = chat(*tiny, prompts[2], max_new_tokens=20, temperature=0)[0]
    stop_word = reference.split()[3]

    async def scenario(engine, submit):
        stopped = await submit(prompts[2], max_new_tokens=20, temperature=0, stop=[stop_word])
        budget = await submit(prompts[2], max_new_tokens=20, temperature=0)
        stopped_text = await stopped.text()
        budget_text = await budget.text()
        return (stopped_text, stopped.finish_reason), (
            budget_text,
            budget.finish_reason,
            budget.completion_tokens,
        )

    (stopped_text, stopped_reason), (text, reason, tokens) = run_engine(tiny, scenario)
    assert stopped_reason == "stop" and stop_word not in stopped_text
    assert reference.startswith(stopped_text.strip())
    assert (reason, tokens) == ("length", 20) and text.strip() == reference


def test_a_finished_request_keeps_its_finish_reason(tiny, run_engine):
    async def scenario(engine, submit):
        done = await submit("hi", max_new_tokens=2, temperature=0)
        text = await done.text()
        done.finish(FinishReason.ERROR, BackendError("a late failure"))
        return text, done.finish_reason, engine.active

    text, reason, active = run_engine(tiny, scenario)
    assert text and reason == "length" and active == 0

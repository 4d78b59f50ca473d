"""The worker's CPU threads: it decodes with the count its thread policy chooses."""

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch


class ContendedModel:
    """The tiny model as if another program took a core after its first `calm` calls.

    From then on, a call with more than one thread waits 0.1 s for it. Records the thread count
    each call ran with.
    """

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


def test_the_worker_decodes_with_the_thread_count_of_its_policy(tiny, caplog, prompts, run_engine):
    """The worker decodes with the thread count its policy chooses, and leaves others' alone."""
    model = ContendedModel(tiny[0])
    before = torch.get_num_threads()
    # two to choose from, on any machine: new threads start with the count last set
    torch.set_num_threads(2)
    try:

        async def scenario(engine, submit):
            generation = await submit(prompts[1], max_new_tokens=40, temperature=0)
            await generation.text()

        with caplog.at_level(logging.INFO, logger="tutorial_api.engine.thread_policy"):
            run_engine((model, tiny[1]), scenario)
        with ThreadPoolExecutor(1) as fresh:
            after = fresh.submit(torch.get_num_threads).result()
    finally:
        torch.set_num_threads(before)
    assert len(model.threads) > 30 and model.threads[0] == 2
    assert set(model.threads[-20:]) == {1}
    assert "CPU threads for decoding: 1 instead of 2" in caplog.text
    assert after == 2, "the worker left new threads with its own count"

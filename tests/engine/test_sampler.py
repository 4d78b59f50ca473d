import asyncio
import copy
from types import SimpleNamespace

import pytest
import torch

from tutorial_api import chat
from tutorial_api.conversation import build_messages, prepare
from tutorial_api.engine.engine import Engine
from tutorial_api.engine.sampler import sample, settle

PROMPT = "Tell me a story"


@pytest.fixture(scope="module")
def configured(tiny):
    """The tiny model with a generation config of its own, as chat models ship one: top-k, top-p, a
    repetition penalty and a temperature.
    """
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    model.generation_config.update(
        do_sample=True, top_k=8, top_p=0.9, temperature=0.8, repetition_penalty=1.3
    )
    return model, tokenizer


def engine_answer(model, tokenizer, **options):
    """the engine's answer to PROMPT, alone in its batch."""

    async def main():
        engine = Engine(model, tokenizer)
        try:
            prepared = prepare(model, tokenizer, build_messages(PROMPT), **options)
            generation = await engine.start(prepared)
            return await generation.text()
        finally:
            engine.close()

    return asyncio.run(main())


def test_a_seeded_request_samples_as_generate_does(configured):
    """A seeded request samples as generate does, with the model's own config."""
    model, tokenizer = configured
    for seed in (3, 4):
        torch.manual_seed(seed)
        expected = chat(model, tokenizer, PROMPT, max_new_tokens=12, temperature=0.8, top_p=0.9)[0]
        assert (
            engine_answer(
                model, tokenizer, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=seed
            ).strip()
            == expected
        )


def test_greedy_applies_the_models_repetition_penalty(configured, tiny):
    """Greedy decoding applies the model's repetition penalty as generate does."""
    model, tokenizer = configured
    expected = chat(model, tokenizer, PROMPT, max_new_tokens=16, temperature=0)[0]
    assert engine_answer(model, tokenizer, max_new_tokens=16, temperature=0).strip() == expected
    assert (
        expected != chat(*tiny, PROMPT, max_new_tokens=16, temperature=0)[0]
    )  # the penalty changed it


def test_a_request_without_sampling_values_takes_the_models(configured, tiny):
    settled = settle(configured[0].generation_config)
    assert (
        settled.do_sample,
        settled.temperature,
        settled.top_k,
        settled.top_p,
        settled.repetition_penalty,
    ) == (True, 0.8, 8, 0.9, 1.3)
    assert (
        settle(tiny[0].generation_config, temperature=0.5).top_k == 0
    )  # no top-k unless the model sets one


def rows(*settings, tokens=()):
    """Stand-ins for generations: the sampler reads their settings, ids and seed's generator."""
    return [
        SimpleNamespace(
            sampling=setting,
            prompt_ids=[1],
            answer_ids=list(tokens),
            random=lambda device, s=setting: torch.Generator(device).manual_seed(s.seed),
        )
        for setting in settings
    ]


def test_top_p_keeps_only_the_likeliest_tokens(tiny):
    config = tiny[0].generation_config
    logits = torch.tensor([[4.0, 3.9, 0.0, 0.0, 0.0, 0.0]]).repeat(2, 1)
    picked = [
        sample(
            logits,
            rows(
                settle(config, temperature=1.0, top_p=0.5, seed=seed),
                settle(config, temperature=1.0, top_p=1.0, seed=seed),
            ),
        )
        for seed in range(40)
    ]
    assert {narrow for narrow, _ in picked} == {0}  # token 0 alone holds half the mass
    assert len({wide for _, wide in picked}) > 1


def test_presence_and_frequency_penalties_lower_used_tokens(tiny):
    config = tiny[0].generation_config
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert sample(logits, rows(settle(config, temperature=0), tokens=[0, 0])) == [0]
    assert sample(
        logits, rows(settle(config, temperature=0, presence_penalty=1.5), tokens=[0, 0])
    ) == [1]
    assert sample(
        logits, rows(settle(config, temperature=0, frequency_penalty=0.6), tokens=[0, 0])
    ) == [1]
    assert sample(
        logits, rows(settle(config, temperature=0, frequency_penalty=0.4), tokens=[0, 0])
    ) == [0]


def test_log_probabilities_are_the_models_own(tiny):
    model, tokenizer = tiny
    prepared = prepare(
        model, tokenizer, build_messages(PROMPT), max_new_tokens=1, temperature=0, top_logprobs=3
    )
    with torch.inference_mode():
        expected = torch.log_softmax(model(prepared.input_ids).logits[0, -1].float(), -1).topk(3)

    async def main():
        engine = Engine(model, tokenizer)
        try:
            generation = await engine.start(prepared)
            await generation.text()
            return generation.logprobs
        finally:
            engine.close()

    [(token, logprob, top)] = asyncio.run(main())
    assert token == top[0][0] == int(expected.indices[0])
    assert [i for i, _ in top] == expected.indices.tolist()
    assert logprob == pytest.approx(float(expected.values[0]), abs=1e-4)


@pytest.mark.gpu
def test_mixed_sampling_requests_share_a_batch_on_the_gpu(configured):
    """Seeded, penalised and plain requests share a batch on the GPU."""
    model, tokenizer = configured
    model = copy.deepcopy(model).to("cuda")
    options = [
        {"seed": 5},
        {},
        {"seed": 5},
        {"presence_penalty": 1.0, "top_logprobs": 2},
        {"temperature": 0},
    ]

    async def main():
        engine = Engine(model, tokenizer)
        try:
            generations = [
                await engine.start(
                    prepare(model, tokenizer, build_messages(PROMPT), max_new_tokens=8, **option)
                )
                for option in options
            ]
            return [await generation.text() for generation in generations], generations[3].logprobs
        finally:
            engine.close()

    (first, _, same_seed, _, greedy), logprobs = asyncio.run(main())
    assert first == same_seed
    assert len(logprobs) == 8 and all(len(top) == 2 for _, _, top in logprobs)
    assert greedy.strip() == chat(model, tokenizer, PROMPT, max_new_tokens=8, temperature=0)[0]

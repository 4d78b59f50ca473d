import asyncio
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tutorial_api import chat
from tutorial_api.conversation import build_messages, prepare
from tutorial_api.engine.engine import Engine
from tutorial_api.engine.sampler import Sampling, distribution, sample, settle

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


def test_a_seeded_request_answers_the_same_every_time(configured):
    """A seeded request, sampled by the model's own config, gives the same answer on every run."""
    model, tokenizer = configured
    options = {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9}
    first, again, other = (
        engine_answer(model, tokenizer, seed=seed, **options) for seed in (3, 3, 4)
    )
    assert first == again
    assert first != other


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


def rows(*settings, tokens=(), prompt=(1,)):
    """Stand-ins for generations: the sampler reads their settings, ids and seed's generator."""
    return [
        SimpleNamespace(
            sampling=setting,
            prompt_ids=list(prompt),
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


def reference(logits, setting, history, answer=()):
    """transformers' probabilities, in generate's order, after OpenAI's penalties on the answer."""
    counts = torch.bincount(torch.tensor(answer, dtype=torch.long), minlength=logits.shape[-1])
    counts = counts.float()
    scores = logits - setting.presence_penalty * (counts > 0) - setting.frequency_penalty * counts
    processors = LogitsProcessorList()
    if setting.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(setting.repetition_penalty))
    if setting.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(setting.temperature))
    if setting.top_k:
        processors.append(TopKLogitsWarper(setting.top_k))
    if setting.top_p < 1.0:
        processors.append(TopPLogitsWarper(setting.top_p))
    if setting.min_p is not None:
        processors.append(MinPLogitsWarper(setting.min_p))
    input_ids = torch.tensor([list(history)] * len(logits), dtype=torch.long)
    return torch.softmax(processors(input_ids, scores), dim=-1)


def drawn_from(logits, generations):
    """The probabilities [rows, vocab] the sampler draws each row's token from."""
    dense = torch.zeros_like(logits)
    for part, ids, probabilities in distribution(logits, generations):
        dense[part] = probabilities if ids is None else dense[part].scatter(1, ids, probabilities)
    return dense


def logits_of(seed, rows, vocab, scale=3.0):
    """Random logits [rows, vocab], the same for a seed."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def tied_at_the_kth(seed, k):
    """Random logits [2, 1000] where three more tokens tie with each row's k-th likeliest."""
    logits = logits_of(seed, 2, 1000)
    kth = logits.topk(k).values[:, -1:]
    return logits.scatter(1, torch.tensor([[3, 500, 999]] * 2), kth.expand(2, 3))


def tied_at_the_top(seed):
    """Random logits [2, 1000] where forty tokens tie for the likeliest, more than top-k sees."""
    logits = logits_of(seed, 2, 1000)
    logits[:, 100:140] = 20.0
    return logits


SMALL = torch.tensor(
    [
        [2.0, 2.0, 0.5, 1.0, 1.0, 1.0, -1.0, 0.0, 3.0, -2.0, 1.0, 0.2],
        [0.0, 1.5, 1.5, 1.5, 0.3, -0.5, 1.5, 0.0, 0.0, 2.5, -1.0, 0.7],
    ]
)
QWEN = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1}
CASES = {
    "ties at the k-th": (SMALL, {"top_k": 4}, [], []),
    "ties at top-p's boundary": (SMALL, {"top_p": 0.5}, [], []),
    "ties at both": (SMALL, {"top_k": 3, "top_p": 0.5, "temperature": 0.5}, [], []),
    "qwen's config": (tied_at_the_kth(1, 20), QWEN, [5, 7, 7, 40, 999], [12, 5, 3]),
    "top-p, min-p and openai's penalties": (
        logits_of(2, 3, 500),
        {"temperature": 0.9, "top_p": 0.95, "min_p": 0.05, "presence_penalty": 0.5},
        [1, 2],
        [4, 4, 9, 30],
    ),
    "top-p alone, qwen's vocabulary": (logits_of(3, 2, 151936), {"top_p": 0.8}, [], []),
    "a nucleus wider than the candidates": (logits_of(4, 2, 1000, 0.01), {"top_p": 0.9}, [], []),
    "ties past the candidates": (tied_at_the_top(5), {"top_k": 2}, [], []),
}


@pytest.mark.parametrize("case", CASES)
def test_kept_probabilities_match_transformers(case):
    """The sampler draws from the probabilities of transformers' processors in generate's order."""
    logits, options, prompt, answer = CASES[case]
    setting = Sampling(do_sample=True, **options)
    generations = rows(*[setting] * len(logits), tokens=answer, prompt=prompt)
    expected = reference(logits, setting, [*prompt, *answer], answer)
    drawn = drawn_from(logits, generations)
    assert torch.equal(drawn > 0, expected > 0)  # the same tokens kept
    torch.testing.assert_close(drawn, expected, rtol=1e-5, atol=1e-7)


def test_the_cases_reach_ties_and_the_whole_vocabulary():
    """The cases above do split tied tokens and do take the whole-vocabulary path."""
    logits, options, _, _ = CASES["ties at top-p's boundary"]
    kept = reference(logits, Sampling(do_sample=True, **options), []) > 0
    assert kept[0, 0] != kept[0, 1]  # of two tokens tied at 2.0, one kept
    assert kept[1, [1, 2, 3, 6]].sum() == 2  # of four tied at 1.5, two kept
    for case in ("a nucleus wider than the candidates", "ties past the candidates"):
        logits, options, _, _ = CASES[case]
        setting = Sampling(do_sample=True, **options)
        parts = distribution(logits, rows(setting, setting))
        assert any(ids is None for _, ids, _ in parts)


def test_penalties_follow_the_answer_as_it_grows():
    """Each step penalises the prompt and the answer so far, as generate would from scratch."""
    setting = Sampling(
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.2,
    )
    [generation] = rows(setting, prompt=[5, 9, 9, 2])
    logits = logits_of(6, 1, 300, 1.0)
    for _ in range(6):
        history = generation.prompt_ids + generation.answer_ids
        expected = reference(logits, setting, history, generation.answer_ids)
        torch.testing.assert_close(drawn_from(logits, [generation]), expected)
        generation.answer_ids.append(int(expected.argmax()))  # the penalties bite next step
    assert len(set(generation.answer_ids)) > 1


CHI_SQUARE_AT_ONE_IN_A_THOUSAND = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_kept_probabilities(seeded):
    """Thousands of draws fit the reference probabilities (chi-square), none outside the kept."""
    options = {"temperature": 0.7, "top_k": 5, "top_p": 0.9}
    logits = torch.tensor([[1.0, 0.2, 2.0, -0.5, 1.5, 0.0, 0.9, -1.0]])
    expected = reference(logits, Sampling(do_sample=True, **options), [])[0]
    draws = 6000
    settings = [
        Sampling(do_sample=True, seed=draw if seeded else None, **options) for draw in range(draws)
    ]
    torch.manual_seed(0)
    tokens = sample(logits.repeat(draws, 1), rows(*settings))
    counts = torch.bincount(torch.tensor(tokens), minlength=8).float()
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi_square = ((counts - draws * expected) ** 2 / (draws * expected))[kept].sum()
    assert chi_square < CHI_SQUARE_AT_ONE_IN_A_THOUSAND[int(kept.sum()) - 1]


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

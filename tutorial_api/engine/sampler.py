"""The one sampler: the model's GenerationConfig with a request's own values on top, row by row.

`chat()` hands the same settings to `generate()`; the engine applies them with transformers' own
logits processors, one call for each group of rows that share their settings, so both pick tokens
the same way.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Below this temperature sampling picks the likeliest token anyway, and dividing by it can overflow.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens; `top_logprobs` None asks for no log-probabilities."""

    do_sample: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    top_logprobs: int | None = None

    @property
    def greedy_as_is(self) -> bool:
        """Tell whether the raw logits' argmax will do, with nothing to record (the fast path)."""
        return not self.do_sample and self._unpenalised and self.top_logprobs is None

    @property
    def _unpenalised(self) -> bool:
        """Tell whether no penalty applies."""
        openai_penalties = (self.presence_penalty, self.frequency_penalty)
        return self.repetition_penalty == 1.0 and not any(openai_penalties)

    def generate_options(self) -> dict:
        """Return the same settings as `generate()` arguments."""
        options = {"do_sample": self.do_sample, "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            options |= {
                "temperature": self.temperature,
                "top_k": self.top_k,
                "top_p": self.top_p,
                "min_p": self.min_p,
            }
        return options


def settle(
    generation_config,
    *,
    temperature=None,
    top_p=None,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    seed=None,
    top_logprobs=None,
) -> Sampling:
    """Return a request's sampling: its own values, else the model's, else neutral ones.

    The model's values come from its generation config; the neutral ones change nothing
    (temperature 1, no top-k, top-p 1, no penalty). Temperature 0 is greedy.
    """

    def configured(name, neutral):
        """Return the generation config's value for `name`, else `neutral`."""
        value = getattr(generation_config, name, None)
        return neutral if value is None else value

    temperature = configured("temperature", 1.0) if temperature is None else temperature
    return Sampling(
        do_sample=temperature >= GREEDY_BELOW,
        temperature=temperature,
        top_k=configured("top_k", 0),
        top_p=configured("top_p", 1.0) if top_p is None else top_p,
        min_p=configured("min_p", None),
        repetition_penalty=float(configured("repetition_penalty", 1.0)),
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        seed=seed,
        top_logprobs=top_logprobs,
    )


def sample(logits: torch.Tensor, generations) -> list[int]:
    """Return the next token of each row of `logits` [rows, vocab], by its generation's settings."""
    settings = [generation.sampling for generation in generations]
    if all(setting.greedy_as_is for setting in settings):
        # In float32, as torch's CPU argmax over bf16 logits is several times slower.
        return logits.float().argmax(-1).tolist()
    scores = _penalised(logits.float(), generations)  # scores: [rows, vocab]
    tokens = torch.empty(len(settings), dtype=torch.long, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for row, setting in enumerate(settings):
        groups.setdefault(_group_key(setting), []).append(row)
    for key, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        repetition_penalty, do_sample = key[:2]
        history = None
        if repetition_penalty != 1.0:
            history = _history(generations, rows, scores.shape[-1], logits.device)
        group_scores = _processors(*key)(history, scores[index])
        group = [generations[row] for row in rows]
        tokens[index] = _draw(group_scores, group) if do_sample else group_scores.argmax(-1)
    return tokens.tolist()


def _draw(scores: torch.Tensor, generations) -> torch.Tensor:
    """Draw one token per row from the softmax of `scores` [rows, vocab].

    Seeded rows draw each from their own generator, the others in one call.
    """
    probabilities = torch.softmax(scores, dim=-1)
    unseeded = [
        row for row, generation in enumerate(generations) if generation.sampling.seed is None
    ]
    tokens = torch.empty(len(generations), dtype=torch.long, device=scores.device)
    if unseeded:
        tokens[unseeded] = torch.multinomial(probabilities[unseeded], 1).squeeze(1)
    for row, generation in enumerate(generations):
        if generation.sampling.seed is not None:
            random = generation.random(scores.device)
            tokens[row] = torch.multinomial(probabilities[row : row + 1], 1, generator=random)[0, 0]
    return tokens


def _group_key(setting: Sampling) -> tuple:
    """Return the settings rows must share to be processed together, as `_processors` takes them."""
    if not setting.do_sample:
        return setting.repetition_penalty, False, None, None, None, None
    return (
        setting.repetition_penalty,
        True,
        setting.temperature,
        setting.top_k,
        setting.top_p,
        setting.min_p,
    )


@lru_cache(maxsize=64)
def _processors(
    repetition_penalty, do_sample, temperature, top_k, top_p, min_p
) -> LogitsProcessorList:
    """Return transformers' processors for one group of settings, in `generate()`'s order."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        if min_p is not None:
            processors.append(MinPLogitsWarper(min_p))
    return processors


def _history(generations, rows, vocab_size, device) -> torch.Tensor:
    """Return each row's prompt and answer so far, as [rows, longest].

    Shorter rows are right-padded with `vocab_size`, an id the repetition penalty drops.
    """
    tokens = [generations[row].prompt_ids + generations[row].answer_ids for row in rows]
    width = max(map(len, tokens))
    padded = [t + [vocab_size] * (width - len(t)) for t in tokens]
    return torch.tensor(padded, device=device)


def _penalised(scores: torch.Tensor, generations) -> torch.Tensor:
    """Apply OpenAI's presence and frequency penalties for the tokens each row has generated."""
    rows = [
        row
        for row, g in enumerate(generations)
        if (g.sampling.presence_penalty or g.sampling.frequency_penalty) and g.answer_ids
    ]
    if not rows:
        return scores
    device = scores.device
    # counts: [penalised rows, vocab], how often each token appears in the row's answer
    counts = torch.zeros(len(rows), scores.shape[-1], device=device)
    for i, row in enumerate(rows):
        answer = generations[row].answer_ids
        counts[i].index_add_(
            0, torch.tensor(answer, device=device), torch.ones(len(answer), device=device)
        )
    settings = [generations[row].sampling for row in rows]
    presence = torch.tensor([s.presence_penalty for s in settings], device=device)
    frequency = torch.tensor([s.frequency_penalty for s in settings], device=device)
    index = torch.tensor(rows, device=device)
    scores = scores.clone()
    scores[index] -= presence[:, None] * (counts > 0) + frequency[:, None] * counts
    return scores


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], generations
) -> dict[int, tuple[float, list]]:
    """Return the log-probabilities each row's generation asked for, by row.

    For each such row: the chosen token's log-probability and the likeliest alternatives,
    `(logprob, [(token, logprob), ...])`, by the model's own distribution (before temperature and
    penalties).
    """
    rows = [row for row, g in enumerate(generations) if g.sampling.top_logprobs is not None]
    if not rows:
        return {}
    index = torch.tensor(rows, device=logits.device)
    # logprobs: [asking rows, vocab]
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    # picked: [asking rows, 1]
    picked = torch.tensor([tokens[row] for row in rows], device=logits.device)[:, None]
    chosen = logprobs.gather(1, picked)  # chosen: [asking rows, 1]
    widest = max(generations[row].sampling.top_logprobs for row in rows)
    top_values, top_ids = logprobs.topk(widest, dim=-1)  # each [asking rows, widest]
    asked = {}
    for i, row in enumerate(rows):
        wanted = generations[row].sampling.top_logprobs
        ids, values = top_ids[i, :wanted].tolist(), top_values[i, :wanted].tolist()
        asked[row] = (chosen[i, 0].item(), list(zip(ids, values, strict=True)))
    return asked

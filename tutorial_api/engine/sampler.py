"""The one sampler: the model's GenerationConfig with a request's own values on top, row by row.

`chat()` hands the same settings to `generate()`; the engine draws from the same distribution as
transformers' processors in `generate()`'s order (repetition penalty, temperature, top-k, top-p,
min-p), one group of rows that share their settings at a time. Its cost follows the tokens it
keeps: top-k (or, without it, top-p) first picks a few candidates, and the rest works on those.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Below this temperature sampling picks the likeliest token anyway, and dividing by it can overflow.
GREEDY_BELOW = 1e-5
# Candidates beyond top-k's k, to see whether tokens tied with the k-th go on past them.
TIE_MARGIN = 16
# Top-p without top-k looks at this many likeliest tokens; a wider nucleus takes the vocabulary.
TOP_P_CANDIDATES = 256
# Scores per block when looking for the largest: a row's first pass reads only their maxima.
BLOCK = 128
# The attribute of a generation where the sampler keeps that row's token ids (a `_Tokens`).
_TOKENS = "_sampler_tokens"


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
    groups: dict[tuple, list[int]] = {}
    for row, setting in enumerate(settings):
        groups.setdefault(_group_key(setting), []).append(row)
    if len(groups) == 1:
        return _group_tokens(logits, generations).tolist()
    tokens = torch.empty(len(settings), dtype=torch.long, device=logits.device)
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = _group_tokens(logits[index], [generations[row] for row in rows])
    return tokens.tolist()


def distribution(
    logits: torch.Tensor, generations
) -> list[tuple[list[int], torch.Tensor | None, torch.Tensor]]:
    """Return what rows sharing sampled settings draw from, as parts `(rows, ids, probabilities)`.

    `logits` [rows, vocab] are the model's; the penalties, temperature, top-k, top-p and min-p come
    from the generations. A part's ids and probabilities are [len(rows), candidates] where the
    kept tokens lie among the candidates; elsewhere ids is None and the probabilities cover the
    vocabulary.
    """
    setting = generations[0].sampling
    scores = _penalised(logits.float(), generations)  # scores: [rows, vocab]
    every_row = list(range(len(generations)))
    vocab = scores.shape[-1]
    if setting.top_k:
        width = min(vocab, setting.top_k + TIE_MARGIN)
    elif setting.top_p < 1.0:
        width = min(vocab, TOP_P_CANDIDATES)
    else:
        return [(every_row, None, _whole_vocabulary(scores, setting))]
    ids, values, complete = _kept(scores, setting, width)  # each [rows, width], but complete [rows]
    probabilities = values.softmax(-1)
    if width == vocab:
        return [(every_row, ids, probabilities)]
    incomplete = (~complete).nonzero().squeeze(1).tolist()  # one look per group, not per row
    if not incomplete:
        return [(every_row, ids, probabilities)]
    parts = [(incomplete, None, _whole_vocabulary(scores[incomplete], setting))]
    rest = [row for row in every_row if row not in incomplete]
    if rest:
        parts.append((rest, ids[rest], probabilities[rest]))
    return parts


def _group_tokens(logits: torch.Tensor, generations) -> torch.Tensor:
    """Return the next token [rows] of rows sharing their settings (`_group_key`)."""
    if not generations[0].sampling.do_sample:
        return _penalised(logits.float(), generations).argmax(-1)
    parts = distribution(logits, generations)
    tokens = torch.empty(len(generations), dtype=torch.long, device=logits.device)
    for rows, ids, probabilities in parts:
        picked = _draw(probabilities, [generations[row] for row in rows])  # picked: [len(rows)]
        if ids is not None:
            picked = ids.gather(1, picked[:, None]).squeeze(1)
        if len(parts) == 1:
            return picked
        tokens[rows] = picked
    return tokens


def _kept(
    scores: torch.Tensor, setting: Sampling, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the `width` likeliest tokens of each row, their scores where kept, and completeness.

    `(ids, values, complete)`: ids and values [rows, width] in ascending order, values -inf where
    temperature, top-k, top-p and min-p remove the token; complete [rows] is False where tokens past
    the candidates may be kept too.
    """
    values, ids = _top(scores, width)  # each [rows, width]
    values = values / setting.temperature
    # Ascending, ties by token id: the order transformers' top-p adds up in (its sort's, on short
    # rows; on a whole vocabulary its order among ties is unspecified).
    ids, by_id = ids.sort()
    values, ascending = values.gather(1, by_id).sort(stable=True)
    ids = ids.gather(1, ascending)
    complete = torch.full(ids.shape[:1], width == scores.shape[-1], device=scores.device)
    if setting.top_k:
        kth = width - min(setting.top_k, width)
        removed = values < values[:, kth : kth + 1]
        complete |= removed[:, 0]  # else tokens tied with the k-th may lie past the candidates
        values = values.masked_fill(removed, -torch.inf)
    if setting.top_p < 1.0:
        values, top_p_complete = _top_p(values, scores, setting, width)
        if not setting.top_k:
            complete |= top_p_complete
    if setting.min_p is not None:
        probabilities = values.softmax(-1)
        removed = probabilities < setting.min_p * probabilities.amax(-1, keepdim=True)
        removed[:, -1] = False
        values = values.masked_fill(removed, -torch.inf)
    return ids, values, complete


def _top(scores: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the `width` largest `scores` of each row and their ids, as `torch.topk` does.

    Through the blocks with the largest maxima, as each of those holds a score at least as large
    as any outside them: a pass over the vocabulary several times cheaper than `torch.topk`'s.
    """
    rows, vocab = scores.shape
    blocks = vocab // BLOCK
    if blocks <= width:
        return torch.topk(scores, width)
    maxima = scores[:, : blocks * BLOCK].view(rows, blocks, BLOCK).amax(-1)  # [rows, blocks]
    chosen = maxima.topk(width).indices  # [rows, width]
    offsets = torch.arange(BLOCK, device=scores.device)
    inside = (chosen[:, :, None] * BLOCK + offsets).flatten(1)  # [rows, width * BLOCK]
    past_the_blocks = torch.arange(blocks * BLOCK, vocab, device=scores.device)
    ids = torch.cat([inside, past_the_blocks.expand(rows, -1)], dim=1)
    values, where = scores.gather(1, ids).topk(width)
    return values, ids.gather(1, where)


def _top_p(
    values: torch.Tensor, scores: torch.Tensor, setting: Sampling, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return candidates' `values` [rows, width] (ascending) after top-p, and top-p's completeness.

    Without top-k the tokens past the candidates hold the rest of the row's mass, counted first as
    transformers' ascending sum does; a row is complete where those and the smallest candidate's
    ties are all removed.
    """
    rest = values.new_zeros(values.shape[0], 1)
    if setting.top_k or width == scores.shape[-1]:
        probabilities = values.softmax(-1)
    else:
        whole = torch.logsumexp(scores / setting.temperature, dim=-1, keepdim=True)  # [rows, 1]
        probabilities = (values - whole).exp()
        rest = (1.0 - probabilities.sum(-1, keepdim=True)).clamp(min=0.0)
    removed = rest + probabilities.cumsum(-1) <= 1.0 - setting.top_p
    removed[:, -1] = False
    smallest_ties = (values == values[:, :1]).sum(-1, keepdim=True) - 1  # [rows, 1]
    complete = removed.gather(1, smallest_ties).squeeze(1)
    return values.masked_fill(removed, -torch.inf), complete


def _whole_vocabulary(scores: torch.Tensor, setting: Sampling) -> torch.Tensor:
    """Return the probabilities [rows, vocab] of penalised `scores` by transformers' own warpers."""
    warpers = _warpers(setting.temperature, setting.top_k, setting.top_p, setting.min_p)
    return torch.softmax(warpers(None, scores), dim=-1)


def _draw(probabilities: torch.Tensor, generations) -> torch.Tensor:
    """Draw one position per row of `probabilities` [rows, n].

    Seeded rows draw each from their own generator, the others in one call.
    """
    unseeded = [
        row for row, generation in enumerate(generations) if generation.sampling.seed is None
    ]
    if len(unseeded) == len(generations):
        return torch.multinomial(probabilities, 1).squeeze(1)
    positions = torch.empty(len(generations), dtype=torch.long, device=probabilities.device)
    if unseeded:
        positions[unseeded] = torch.multinomial(probabilities[unseeded], 1).squeeze(1)
    for row, generation in enumerate(generations):
        if generation.sampling.seed is not None:
            random = generation.random(probabilities.device)
            draw = torch.multinomial(probabilities[row : row + 1], 1, generator=random)
            positions[row] = draw[0, 0]
    return positions


def _group_key(setting: Sampling) -> tuple:
    """Return the settings rows must share to be sampled together."""
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
def _warpers(temperature, top_k, top_p, min_p) -> LogitsProcessorList:
    """Return transformers' warpers for one group of settings, in `generate()`'s order."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers


class _Tokens:
    """One row's prompt and answer ids on the logits' device, for its penalties, grown in place."""

    def __init__(self, device):
        self.ids = torch.empty(0, dtype=torch.long, device=device)  # ids: [capacity]
        self.length = 0  # ids recorded
        self.prompt_length = 0  # of them, the prompt's
        self.answer_length = 0  # of the generation's answer_ids, how many are recorded

    def append(self, new: torch.Tensor) -> None:
        """Record `new` ids after the others, doubling the storage when full."""
        end = self.length + len(new)
        if end > len(self.ids):
            grown = self.ids.new_empty(max(2 * end, 64))
            grown[: self.length] = self.ids[: self.length]
            self.ids = grown
        self.ids[self.length : end] = new
        self.length = end


def _recorded(generations, vocab_size: int, device) -> list[_Tokens]:
    """Return each generation's `_Tokens`, brought up to date with one copy to the device."""
    states, missing = [], []
    for generation in generations:
        state = getattr(generation, _TOKENS, None)
        prompt = []
        if state is None:
            state = _Tokens(device)
            # Ids past the logits can be neither penalised nor drawn.
            prompt = [token for token in generation.prompt_ids if token < vocab_size]
            state.prompt_length = len(prompt)
            setattr(generation, _TOKENS, state)
        answer = generation.answer_ids[state.answer_length :]
        state.answer_length += len(answer)
        states.append(state)
        missing.append(prompt + answer)
    flat = torch.tensor([token for new in missing for token in new], device=device)
    start = 0
    for state, new in zip(states, missing, strict=True):
        state.append(flat[start : start + len(new)])
        start += len(new)
    return states


def _positions(rows: list[int], tokens: list[_Tokens], vocab_size: int, *, answers_only: bool):
    """Return where `rows`' recorded ids lie in `scores.view(-1)`, and which of `rows` each is of.

    Only the answers' ids where `answers_only`; each as a tensor [recorded ids].
    """
    pieces = [t.ids[t.prompt_length if answers_only else 0 : t.length] for t in tokens]
    lengths = [len(piece) for piece in pieces]
    device = tokens[0].ids.device
    owner = torch.repeat_interleave(
        torch.arange(len(rows), device=device),
        torch.tensor(lengths, device=device),
        output_size=sum(lengths),  # known here, so the GPU need not report it
    )
    row_starts = torch.tensor(rows, device=device) * vocab_size
    return row_starts[owner] + torch.cat(pieces), owner


def _penalised(scores: torch.Tensor, generations) -> torch.Tensor:
    """Return `scores` [rows, vocab] penalised by each row's settings, on a copy where any applies.

    OpenAI's presence and frequency penalties for the answer's ids first, then the repetition
    penalty for the prompt's and the answer's, as `generate()` applies it.
    """
    rows = [row for row, g in enumerate(generations) if not g.sampling._unpenalised]
    if not rows:
        return scores
    device, vocab_size = scores.device, scores.shape[-1]
    tokens = _recorded([generations[row] for row in rows], vocab_size, device)
    settings = [generations[row].sampling for row in rows]
    scores = scores.clone()
    flat = scores.view(-1)
    openai = [i for i, s in enumerate(settings) if s.presence_penalty or s.frequency_penalty]
    if openai:
        where, owner = _positions(
            [rows[i] for i in openai], [tokens[i] for i in openai], vocab_size, answers_only=True
        )
        presence = torch.tensor([settings[i].presence_penalty for i in openai], device=device)
        frequency = torch.tensor([settings[i].frequency_penalty for i in openai], device=device)
        flat[where] -= presence[owner]  # once per token, as repeated positions write the same value
        flat.index_put_((where,), -frequency[owner], accumulate=True)  # once per use
    repeated = [i for i, s in enumerate(settings) if s.repetition_penalty != 1.0]
    if repeated:
        where, owner = _positions(
            [rows[i] for i in repeated],
            [tokens[i] for i in repeated],
            vocab_size,
            answers_only=False,
        )
        penalty = torch.tensor([settings[i].repetition_penalty for i in repeated], device=device)
        penalty = penalty[owner]
        picked = flat[where]
        flat[where] = torch.where(picked < 0, picked * penalty, picked / penalty)
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

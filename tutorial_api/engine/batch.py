"""The rows decoding together: their key/value cache, attention mask and next input tokens.

Rows are left-padded: every row's newest token sits in the last column, the mask hides each row's
padding, and positions count only a row's real tokens. Newcomers join between steps; finished rows
leave.
"""

import logging

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tutorial_api.backend import BackendError, FinishReason, RequestStatus
from tutorial_api.engine.decode_step import decode_step_for
from tutorial_api.engine.generation import Generation
from tutorial_api.engine.prefix_cache import PrefixCache
from tutorial_api.engine.sampler import sample, token_logprobs

logger = logging.getLogger(__name__)


class PrefillFailed(RuntimeError):
    """The newcomers' prefill failed; the running rows are untouched."""


class Batch:
    """The rows decoding together; rows that finish leave their keys and values to `prefixes`."""

    def __init__(self, model, prefixes: PrefixCache):
        self.model = model
        self.prefixes = prefixes
        self.rows: list[Generation] = []
        # each layer's keys and values: [rows, kv_heads, columns, head_dim]
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 0 over padding
        self.next_tokens: list[int] = []  # each row's next input token, in row order
        self._decode_step = decode_step_for(model)

    def admit(self, newcomers: list[Generation], prefixes: list) -> None:
        """Bring newcomers into the batch from the end of their cached prefixes; decode a step.

        A newcomer whose prompt is cached but for its last token needs no prefill, as in vLLM: it
        joins the running rows at once, and its first token comes from their step, which runs first
        as the shorter wait. The others are prefilled together, their first tokens streamed before
        the running rows' step. `prefixes` are each newcomer's cached keys and values, from
        `PrefixCache.longest`.
        """
        joining = [
            row
            for row, generation in enumerate(newcomers)
            if prefixes[row] and generation.prompt_tokens - generation.cached_tokens == 1
        ]
        prefilling = [row for row in range(len(newcomers)) if row not in joining]
        running_rows_stepped = False
        if joining:
            self._join([newcomers[row] for row in joining], [prefixes[row] for row in joining])
            self.decode()
            running_rows_stepped = True
        if prefilling:
            self._prefill(
                [newcomers[row] for row in prefilling],
                [prefixes[row] for row in prefilling],
                decode_running_rows=not running_rows_stepped,
            )

    def decode(self) -> None:
        """Decode one token for every row."""
        count = len(self.rows)
        self.mask = torch.cat(
            [self.mask, self.mask.new_ones(count, 1)], dim=1
        )  # [rows, columns + 1]
        input_ids = torch.tensor(self.next_tokens, device=self.model.device)[:, None]  # [rows, 1]
        positions = (
            self.mask.sum(-1, keepdim=True) - 1
        )  # [rows, 1]: real tokens before each row's new one
        logits = self._decode_step(input_ids, self.mask, positions, self.cache)  # [rows, vocab]
        self.next_tokens = self._next_tokens(logits, self.rows)

    def drop_finished(self) -> None:
        """Remove finished and cancelled rows, and the cache columns no remaining row attends to.

        A finished row leaves its keys and values to the prefix cache first.
        """
        for generation in self.rows:
            if generation.cancelled:
                generation.finish(FinishReason.CANCELLED)
        keep = [row for row, g in enumerate(self.rows) if g.status != RequestStatus.DONE]
        if len(keep) == len(self.rows):
            return
        for row, generation in enumerate(self.rows):
            # A failed row's keys and values may be what broke it: never reused.
            failed = generation.finish_reason == FinishReason.ERROR
            if generation.status == RequestStatus.DONE and not failed:
                self._remember(row, generation)
        self.rows = [self.rows[row] for row in keep]
        self.next_tokens = [self.next_tokens[row] for row in keep]
        if not keep:
            self.cache = self.mask = None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
        self.mask = self.mask[keep]
        first_used = int(
            self.mask.any(dim=0).float().argmax()
        )  # columns before it are padding in every row
        if first_used:
            self.mask = self.mask[:, first_used:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first_used:]
                layer.values = layer.values[:, :, first_used:]

    def _join(self, newcomers: list[Generation], prefixes: list) -> None:
        """Add newcomers cached but for their prompt's last token, which becomes their input."""
        past = max(g.cached_tokens for g in newcomers)
        cache = DynamicCache(_left_padded(newcomers, prefixes, past), config=self.model.config)
        padding = [[0] * (past - g.cached_tokens) + [1] * g.cached_tokens for g in newcomers]
        mask = torch.tensor(padding, device=self.model.device)  # [newcomers, past]
        for generation in newcomers:
            generation.status = RequestStatus.RUNNING
        self._add(newcomers, cache, mask, [g.prompt_ids[-1] for g in newcomers])

    def _prefill(
        self, newcomers: list[Generation], prefixes: list, decode_running_rows: bool
    ) -> None:
        """Prefill newcomers together, stream their first tokens, then add them as rows.

        Unless `decode_running_rows` is False, the running rows decode a step in between. Each
        newcomer is its cached prefix left-padded to the longest, then its new tokens left-padded to
        the most.
        """
        device = self.model.device
        past = max(g.cached_tokens for g in newcomers)
        width = max(g.prompt_tokens - g.cached_tokens for g in newcomers)
        input_ids, mask = [], []
        for generation in newcomers:
            cached, new = (
                generation.cached_tokens,
                generation.prompt_ids[generation.cached_tokens :],
            )
            input_ids.append([0] * (width - len(new)) + new)
            mask.append(
                [0] * (past - cached) + [1] * cached + [0] * (width - len(new)) + [1] * len(new)
            )
        input_ids = torch.tensor(input_ids, device=device)  # [newcomers, width]
        mask = torch.tensor(mask, device=device)  # [newcomers, past + width]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # [newcomers, width]
        prefix_states = _left_padded(newcomers, prefixes, past) if past else None
        cache = DynamicCache(prefix_states, config=self.model.config)
        try:
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception as error:
            raise PrefillFailed from error
        logits = output.logits[:, -1]  # [newcomers, vocab]
        for generation in newcomers:
            generation.status = RequestStatus.RUNNING
        first_tokens = self._next_tokens(logits, newcomers)
        if self.rows and decode_running_rows:
            self.decode()
        self._add(newcomers, cache, mask, first_tokens)

    def _add(
        self,
        newcomers: list[Generation],
        cache: DynamicCache,
        mask: torch.Tensor,
        next_tokens: list[int],
    ) -> None:
        """Add newcomers as rows after the running ones, merging caches and masks."""
        if self.rows:
            cache, mask = _merge(self.cache, self.mask, cache, mask)
        self.cache, self.mask = cache, mask
        self.rows += newcomers
        self.next_tokens += next_tokens

    def _next_tokens(self, logits: torch.Tensor, rows: list[Generation]) -> list[int]:
        """Choose each row's next token and hand it over; a row whose logits broke fails alone.

        A failed row's token is a placeholder, never fed back: the row leaves at the step's end.
        """
        # logits: [rows, vocab]; a row's max is finite unless it holds NaN, +inf or nothing finite
        finite = torch.isfinite(logits.amax(-1)).tolist()
        if all(finite):
            tokens = self._sample(logits, rows)
            self._deliver(logits, rows, tokens)
            return tokens
        for generation in (g for g, ok in zip(rows, finite, strict=True) if not ok):
            logger.error("Request %s: the model's logits are not finite", generation.label or "-")
            generation.finish(
                FinishReason.ERROR,
                BackendError(
                    "The model computed no usable scores for this answer's next token (NaN or "
                    "infinity), so it was stopped; the server's log names the request."
                ),
            )
        healthy = [row for row, ok in enumerate(finite) if ok]
        tokens = [0] * len(rows)
        if healthy:
            index = torch.tensor(healthy, device=logits.device)
            healthy_rows = [rows[row] for row in healthy]
            chosen = self._sample(logits[index], healthy_rows)
            self._deliver(logits[index], healthy_rows, chosen)
            for row, token in zip(healthy, chosen, strict=True):
                tokens[row] = token
        return tokens

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[Generation]) -> list[int]:
        """Choose each row's next token from its logits, with the row's own sampling settings."""
        return sample(logits, rows)

    @staticmethod
    def _deliver(logits: torch.Tensor, rows: list[Generation], tokens: list[int]) -> None:
        """Hand each row's token (with its logprobs, where asked for) to its request."""
        logprobs = token_logprobs(logits, tokens, rows)
        for row, (generation, token) in enumerate(zip(rows, tokens, strict=True)):
            generation.accept(token, logprobs.get(row))

    def _remember(self, row: int, generation: Generation) -> None:
        """Give the prefix cache a finished row's keys and values, and the tokens they are of.

        Those are the prompt and the answer but its last token, which was never fed back.
        """
        columns = self.mask[row].nonzero().squeeze(1)  # the row's real tokens
        tokens = tuple((generation.prompt_ids + generation.answer_ids)[: len(columns)])
        states = [
            (layer.keys[row : row + 1, :, columns], layer.values[row : row + 1, :, columns])
            for layer in self.cache.layers
        ]
        self.prefixes.store(tokens, states, generation.cache_scope)


def _left_padded(newcomers: list[Generation], prefixes: list, past: int) -> list:
    """Return each layer's (keys, values) for newcomers, cached prefixes left-padded to `past`.

    A newcomer without a cached prefix is all padding.
    """
    model_states = next(states for states in prefixes if states)

    def padded(states, cached: int, layer: int, which: int) -> torch.Tensor:
        if states is None:
            like = model_states[layer][which]  # [1, kv_heads, tokens, head_dim]
            return like.new_zeros(1, like.shape[1], past, like.shape[3])
        return F.pad(states[layer][which][:, :, :cached], (0, 0, past - cached, 0))

    rows = list(zip(newcomers, prefixes, strict=True))
    return [
        tuple(
            torch.cat([padded(states, g.cached_tokens, layer, which) for g, states in rows])
            for which in (0, 1)
        )
        for layer in range(len(model_states))
    ]


def _merge(cache_a, mask_a, cache_b, mask_b):
    """Return one cache and mask for two groups of rows, left-padding the narrower one."""
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(tensor, columns, dim_from_end):
        missing = width - columns
        return F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else tensor

    columns_a, columns_b = mask_a.shape[1], mask_b.shape[1]
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        # keys, values: [rows, kv_heads, columns, head_dim]; columns are dim 2, the second from the
        # end
        layer_a.keys = torch.cat([pad(layer_a.keys, columns_a, 2), pad(layer_b.keys, columns_b, 2)])
        layer_a.values = torch.cat(
            [pad(layer_a.values, columns_a, 2), pad(layer_b.values, columns_b, 2)]
        )
    merged_mask = torch.cat([pad(mask_a, columns_a, 1), pad(mask_b, columns_b, 1)])
    return cache_a, merged_mask

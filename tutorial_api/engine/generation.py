"""One request's record in the engine: settings, tokens, streamed text, how it ended."""

import threading

import torch

from tutorial_api.backend import Answer, FinishReason, RequestStatus
from tutorial_api.engine.text_stream import TextStream


class Generation(Answer):
    """One request's whole life in the engine, from WAITING to DONE.

    `finish` ends it exactly once; later calls change nothing.
    """

    def __init__(
        self, prepared, tokenizer, eos_ids, engine, *, stop=(), label="", cache_scope=None
    ):
        super().__init__(label)
        self.cache_scope = cache_scope  # whose prefix cache entries it may reuse and leave
        self.prompt_ids: list[int] = prepared.input_ids[0].tolist()
        self.answer_ids: list[int] = []
        self.max_new_tokens = prepared.max_new_tokens
        self.sampling = prepared.sampling
        self.cached_tokens = 0  # of the prompt's, found in the prefix cache when admitted
        # (token, its logprob, [(alternative, its logprob), ...]) for each answer token, where asked
        # for
        self.logprobs: list[tuple[int, float, list]] = []
        self._eos_ids = eos_ids
        self._engine = engine
        self._random: torch.Generator | None = None
        self._text = TextStream(tokenizer, stop)
        self._ending = threading.Lock()

    @property
    def prompt_tokens(self) -> int:
        """Count the prompt's tokens."""
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """Count the answer's tokens so far."""
        return len(self.answer_ids)

    def cancel(self) -> None:
        """End at once if still waiting, else leave the batch at the next decoding step."""
        self._cancelled = True
        self._engine.cancel(self)

    def random(self, device) -> torch.Generator:
        """Return this request's own random numbers, from its seed, on the logits' device."""
        if self._random is None:
            self._random = torch.Generator(device=device).manual_seed(self.sampling.seed)
        return self._random

    def accept(self, token: int, logprob: tuple[float, list] | None = None) -> None:
        """Record a token and stream its text; finish at an end token, a stop string or the budget.

        Runs on the worker. `logprob` is the token's log-probability and alternatives, where asked
        for.
        """
        if token in self._eos_ids:
            self.finish(FinishReason.STOP)
            return
        self.answer_ids.append(token)
        if logprob is not None:
            self.logprobs.append((token, *logprob))
        piece, hit_stop = self._text.add(token)
        self._send(piece)
        if hit_stop:
            self.finish(FinishReason.STOP)
        elif len(self.answer_ids) >= self.max_new_tokens:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason, error: Exception | None = None) -> None:
        """End with `reason`, or with `error` for the client; only the first call counts."""
        with self._ending:
            if self.status == RequestStatus.DONE:
                return
            self.status = RequestStatus.DONE
        # Before the last piece: a client holding its whole answer no longer counts as active.
        self._engine.release(self)
        if error is None:
            self._send(self._text.flush())
            self.finish_reason = reason
            self._end_stream()
        else:
            self.finish_reason = FinishReason.ERROR
            self._send(error)

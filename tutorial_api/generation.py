"""one request's record: what every generator (the kit's engine, an upstream server) offers the routes, the text
streamed to its client and how it ended, and the engine's own record with its settings and tokens."""

import asyncio
import threading
import time

import torch

from tutorial_api.text_stream import TextStream

_DONE = object()


class StreamedAnswer:
    """what a route holds of a request, whoever generates it: the text pieces as they come (`stream`, `text`),
    `cancel`, the token counts and finish reason for the log, and `started` for the request timeout."""

    def __init__(self, label=""):
        self.label = label
        self.state = "waiting"
        self.finish_reason: str | None = None
        self.started = time.perf_counter()
        self._cancelled = False
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue = asyncio.Queue()

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None  # of the prompt's, reused rather than computed; None where it is not known

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """stop generating: each generator frees its slot its own way."""
        raise NotImplementedError

    def _end_stream(self) -> None:
        self._send(_DONE)

    async def stream(self, ping_every: float | None = None):
        """the answer as text pieces, as they are decoded, and None after each `ping_every` seconds without one;
        raises the engine's error that ended it; leaving early cancels the generation."""
        try:
            while True:
                try:
                    async with asyncio.timeout(ping_every):  # a timer, not a task: cheap for every piece
                        piece = await self._pieces.get()
                except TimeoutError:
                    yield None
                    continue
                if piece is _DONE:
                    return
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            if self.state != "done":
                self.cancel()

    async def text(self) -> str:
        return "".join([piece async for piece in self.stream()])

    def _send(self, item) -> None:
        """queue a text piece, `_DONE` or an error for the client; safe from any thread."""
        if item == "":
            return
        try:
            self._loop.call_soon_threadsafe(self._pieces.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is gone: nobody is listening any more


class Generation(StreamedAnswer):
    """one request's whole life in the engine (waiting, prefilling, running, done): its settings, the text it
    streams, and how it ended. `finish` ends it once; later calls change nothing."""

    def __init__(self, prepared, tokenizer, eos_ids, engine, *, stop=(), label=""):
        super().__init__(label)
        self.prompt = prepared.input_ids[0].tolist()
        self.max_new_tokens = prepared.max_new_tokens
        self.sampling = prepared.sampling
        self.cached_tokens = 0  # set when it is admitted (see `PrefixCache`)
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []  # (token, its logprob, [(alternative, logprob), ...])
        self._eos_ids = eos_ids
        self._engine = engine
        self._random: torch.Generator | None = None
        self._text = TextStream(tokenizer, stop)
        self._ending = threading.Lock()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        """end at once if still waiting, else leave the batch at the next decoding step."""
        self._cancelled = True
        self._engine.withdraw(self)

    def random(self, device) -> torch.Generator:
        """this request's own random numbers, from its seed, on the device of the logits it samples from."""
        if self._random is None:
            self._random = torch.Generator(device=device).manual_seed(self.sampling.seed)
        return self._random

    def accept(self, token: int, logprob: tuple[float, list] | None = None) -> None:
        """record a token (and its log-probabilities, when asked for) and stream its text, ending the generation at
        an end token, a stop string or its budget. Runs on the worker."""
        if token in self._eos_ids:
            self.finish("stop")
            return
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append((token, *logprob))
        piece, hit_stop = self._text.add(token)
        self._send(piece)
        if hit_stop:
            self.finish("stop")
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str, error: Exception | None = None) -> None:
        """end the generation with `reason`, or with `error` for its client; only the first call counts."""
        with self._ending:
            if self.state == "done":
                return
            self.state = "done"
        self._engine.forget(self)  # before the last piece: a client holding its answer no longer counts as active
        if error is None:
            self._send(self._text.flush())
            self.finish_reason = reason
            self._send(_DONE)
        else:
            self.finish_reason = "error"
            self._send(error)

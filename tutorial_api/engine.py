"""the generation engine: one worker thread owns the model and decodes concurrent requests as one batch.

Requests join the running batch between decoding steps (continuous batching) and leave it as soon as they
finish or are cancelled. Each keeps its own sampling settings, seed, stop strings and token budget.
"""

import asyncio
import logging
import threading
import time
from collections import deque

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tutorial_api.chat import chat
from tutorial_api.text_stream import TextStream

logger = logging.getLogger(__name__)

_DONE = object()


class EngineBusy(RuntimeError):
    """the waiting queue is full: the client should retry shortly."""


class Generation:
    """one request inside the engine: its settings, the text it streams, and how it ended."""

    def __init__(self, prepared, tokenizer, eos_ids, *, seed=None, stop=()):
        self.prompt = prepared.input_ids[0].tolist()
        self.max_new_tokens = prepared.max_new_tokens
        self.sampling = prepared.sampling
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.started = time.perf_counter()
        self._eos_ids = eos_ids
        self._random = torch.Generator().manual_seed(seed) if seed is not None else None
        self._text = TextStream(tokenizer, stop)
        self._cancelled = False
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """leave the batch at the next decoding step."""
        self._cancelled = True

    async def stream(self):
        """the answer as text pieces, as they are decoded; leaving early cancels the generation."""
        try:
            while (piece := await self._pieces.get()) is not _DONE:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            if self.finish_reason is None:
                self.cancel()

    async def text(self) -> str:
        return "".join([piece async for piece in self.stream()])

    # The methods below run on the engine's worker thread.

    def choose(self, logits: torch.Tensor) -> int:
        """the next token from this row's logits, by its own temperature, top_p and seed."""
        if not self.sampling["do_sample"]:
            return int(logits.argmax())
        probabilities = torch.softmax(logits.float() / self.sampling["temperature"], dim=-1)
        top_p = self.sampling["top_p"]
        if top_p < 1:
            sorted_probabilities, order = probabilities.sort(descending=True)
            outside = sorted_probabilities.cumsum(-1) - sorted_probabilities > top_p
            probabilities = probabilities.scatter(0, order, sorted_probabilities.masked_fill(outside, 0))
        return int(torch.multinomial(probabilities, 1, generator=self._random))

    def accept(self, token: int) -> bool:
        """record a token and stream its text; True once the generation has finished."""
        if token in self._eos_ids:
            return self.finish("stop")
        self.tokens.append(token)
        piece, hit_stop = self._text.add(token)
        self._send(piece)
        if hit_stop:
            return self.finish("stop")
        if len(self.tokens) >= self.max_new_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: str) -> bool:
        self._send(self._text.flush())
        self.finish_reason = reason
        self._send(_DONE)
        return True

    def fail(self, error: BaseException) -> None:
        self.finish_reason = "error"
        self._send(error)

    def _send(self, item) -> None:
        if item == "":
            return
        try:
            self._loop.call_soon_threadsafe(self._pieces.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is gone: nobody is listening any more


class Engine:
    """owns the model; admits requests to a bounded queue and decodes them together on one worker thread."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_waiting: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.steps = 0
        self.largest_batch = 0
        self._eos_ids = _eos_ids(model, tokenizer)
        self._waiting: deque[Generation] = deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._batch = _Batch(model)
        self._legacy_turn = asyncio.Lock()
        self._worker = threading.Thread(target=self._run, name="tutorial-api-engine", daemon=True)
        self._worker.start()

    @property
    def legacy(self) -> bool:
        """Qwen-7B-Chat's remote code decodes with its own model.chat: one request at a time, no batching."""
        return callable(getattr(self.model, "chat", None))

    async def legacy_chat(self, prompt, history, **options):
        """`chat()` for a legacy model, off the event loop, one request at a time: `(response, history)`."""
        async with self._legacy_turn:
            return await asyncio.to_thread(chat, self.model, self.tokenizer, prompt, history, **options)

    @property
    def active(self) -> int:
        """how many requests are decoding or waiting; a finished one no longer counts, even before it leaves the batch."""
        return sum(1 for generation in self._batch.rows if generation.finish_reason is None) + len(self._waiting)

    def submit(self, prepared, *, seed=None, stop=()) -> Generation:
        """queue a prepared chat; raises EngineBusy when the queue is full. Call from the event loop."""
        generation = Generation(prepared, self.tokenizer, self._eos_ids, seed=seed, stop=stop)
        with self._wakeup:
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(generation)
            self._wakeup.notify()
        return generation

    def close(self) -> None:
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._worker.join()
        shutting_down = RuntimeError("the server is shutting down")
        for generation in [*self._batch.rows, *self._waiting]:
            generation.fail(shutting_down)

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as error:  # noqa: BLE001 - a failed step must not kill the worker
                    logger.exception("Generation failed; failing the requests in this batch")
                    for generation in self._batch.rows:
                        generation.fail(error)
                    self._batch = _Batch(self.model)

    def _wait_for_work(self) -> bool:
        """block until a request waits or decodes; False once the engine is closing."""
        with self._wakeup:
            while not self._closing and not self._waiting and not self._batch.rows:
                self._wakeup.wait()
            return not self._closing

    def _step(self) -> None:
        with self._wakeup:
            room = self.max_batch_size - len(self._batch.rows)
            newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        newcomers = [g for g in newcomers if not (g.cancelled and g.finish("cancelled"))]
        if newcomers:
            self._batch.admit(newcomers)
        elif self._batch.rows:
            self._batch.decode()
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(self._batch.rows))
        self._batch.drop_finished()
        if not self._batch.rows and torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Batch:
    """the rows decoding together: their key/value cache, attention mask and next input tokens."""

    def __init__(self, model):
        self.model = model
        self.rows: list[Generation] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.next_tokens: list[int] = []
        self.finished: set[int] = set()

    def admit(self, newcomers: list[Generation]) -> None:
        """prefill the newcomers together (left-padded), then merge them into the running batch."""
        device = self.model.device
        width = max(g.prompt_tokens for g in newcomers)
        input_ids = torch.tensor([[0] * (width - g.prompt_tokens) + g.prompt for g in newcomers], device=device)
        mask = torch.tensor([[0] * (width - g.prompt_tokens) + [1] * g.prompt_tokens for g in newcomers], device=device)
        cache = DynamicCache(config=self.model.config)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        except Exception as error:  # noqa: BLE001 - only the newcomers fail; the running batch is untouched
            logger.exception("Prefill failed for %d new requests", len(newcomers))
            for generation in newcomers:
                generation.fail(error)
            return
        if self.rows:
            self.decode()
            cache, mask = _merge(self.cache, self.mask, cache, mask)
        self.cache, self.mask = cache, mask
        first_new_row = len(self.rows)
        self.rows += newcomers
        self.next_tokens += [0] * len(newcomers)
        self._take(logits, first_new_row)

    def decode(self) -> None:
        """one decoding step for every row in the batch."""
        count = len(self.rows)
        device = self.model.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(count, 1)], dim=1)
        logits = self.model(
            input_ids=torch.tensor(self.next_tokens, device=device)[:, None],
            attention_mask=self.mask,
            position_ids=self.mask.sum(-1, keepdim=True) - 1,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        self._take(logits, 0)

    def _take(self, logits: torch.Tensor, first_row: int) -> None:
        """choose each row's next token from its logits, starting at batch row `first_row`."""
        for row, row_logits in enumerate(logits, start=first_row):
            token = self.rows[row].choose(row_logits)
            self.next_tokens[row] = token
            if self.rows[row].accept(token):
                self.finished.add(row)

    def drop_finished(self) -> None:
        """remove finished and cancelled rows, and the cache columns no remaining row attends to."""
        for row, generation in enumerate(self.rows):
            if generation.cancelled and row not in self.finished:
                generation.finish("cancelled")
                self.finished.add(row)
        if not self.finished:
            return
        keep = [row for row in range(len(self.rows)) if row not in self.finished]
        self.rows = [self.rows[row] for row in keep]
        self.next_tokens = [self.next_tokens[row] for row in keep]
        self.finished = set()
        if not keep:
            self.cache = self.mask = None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
        self.mask = self.mask[keep]
        first_used = int(self.mask.any(dim=0).float().argmax())
        if first_used:
            self.mask = self.mask[:, first_used:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first_used:]
                layer.values = layer.values[:, :, first_used:]


def _merge(cache_a, mask_a, cache_b, mask_b):
    """one cache and mask for two batches of rows, left-padding the shorter one."""
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(tensor, length_dim_size, dim_from_end):
        missing = width - length_dim_size
        return F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else tensor

    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):
        layer_a.keys = torch.cat([pad(layer_a.keys, mask_a.shape[1], 2), pad(layer_b.keys, mask_b.shape[1], 2)])
        layer_a.values = torch.cat([pad(layer_a.values, mask_a.shape[1], 2), pad(layer_b.values, mask_b.shape[1], 2)])
    return cache_a, torch.cat([pad(mask_a, mask_a.shape[1], 1), pad(mask_b, mask_b.shape[1], 1)])


def _eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}

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

from tutorial_api.chat import chat, prepare
from tutorial_api.decode_step import decode_step_for, plain_cache
from tutorial_api.generation import Generation
from tutorial_api.models import context_length
from tutorial_api.packed_linear import pack_linear_layers
from tutorial_api.prefix_cache import PrefixCache
from tutorial_api.sampler import sample, token_logprobs
from tutorial_api.settings import PREFIX_CACHE_MB
from tutorial_api.thread_policy import ThreadPolicy, release_openmp_threads

logger = logging.getLogger(__name__)

# After this many steps in a row fail, /health reports the engine unavailable until a step succeeds again.
_UNHEALTHY_AFTER_FAILED_STEPS = 3
# Newcomers prefill together up to this many new prompt tokens a step (past what the prefix cache holds), padding
# included, one newcomer at least; the rest join at the next steps. Every running stream waits for a step's prefill:
# on the kit's 2-core test machine 512 tokens take about 0.3 s, four pasted 512-token prompts at once 1.2 s. Smaller
# groups give a burst its first tokens sooner but cost throughput: groups of 128 tokens took 16 requests arriving
# together from 320 to 210 ms to their first token at p50, for 9% fewer tokens a second. A GPU prefills a few thousand
# tokens in about the time of one.
PREFILL_TOKENS_CPU = 512
PREFILL_TOKENS_GPU = 4096


class EngineError(RuntimeError):
    """a generation the engine cannot serve or finish: `status` is the HTTP status that fits, the message is safe
    to show a client (the cause is in the server's log); `retry_after` seconds, when trying again soon helps."""

    status = 500
    code = "server_error"
    field = ""
    retry_after: int | None = None


class EngineBusy(EngineError):
    """the waiting queue is full: the client should retry shortly."""

    status = 503
    code = "server_busy"
    retry_after = 1


class EngineStopped(EngineError):
    """the engine is shutting down, or its worker thread has stopped."""

    status = 503
    code = "server_unavailable"


class Engine:
    """owns the model; admits requests to a bounded queue and decodes them together on one worker thread. On a CPU
    it packs the model's linear layers for oneDNN first (see `packed_linear`), and the creating thread gives back
    its OpenMP threads, so the worker's are the only ones (see `release_openmp_threads`). A newcomer whose prompt
    starts as a recent conversation did reuses that one's keys and values, up to `prefix_cache_mb` of them."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_waiting: int = 64,
                 prefix_cache_mb: int = PREFIX_CACHE_MB):
        pack_linear_layers(model)
        release_openmp_threads()
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.prefill_tokens = PREFILL_TOKENS_CPU if model.device.type == "cpu" else PREFILL_TOKENS_GPU
        self.steps = 0
        self.largest_batch = 0
        self.failed_steps = 0  # in a row, since the last step that worked
        self._eos_ids = _eos_ids(model, tokenizer)
        self._live: set[Generation] = set()  # every request not yet done, whatever its state
        self._waiting: deque[Generation] = deque()
        self._wakeup = threading.Condition()  # reentrant: a generation ending under it calls `forget`
        self._closing = False
        self._stopped = False
        self.prefixes = PrefixCache(prefix_cache_mb * 2**20 if plain_cache(model) else 0)
        self._batch = _Batch(model, self.prefixes)
        self._threads: ThreadPolicy | None = None  # the worker's, on a CPU
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
        """how many requests are waiting, prefilling or decoding; a finished one no longer counts."""
        return len(self._live)

    @property
    def problem(self) -> str | None:
        """why the engine cannot generate now, or None while it can."""
        if self._closing:
            return "The server is shutting down."
        if self._stopped or not self._worker.is_alive():
            return "The generation worker has stopped after an internal error; restart the server."
        if self.failed_steps >= _UNHEALTHY_AFTER_FAILED_STEPS:
            return f"The last {self.failed_steps} generation steps failed; see the server's log."
        return None

    async def health(self) -> str | None:
        """why the engine cannot generate now, or None: what /health reports, for this engine or an upstream."""
        return self.problem

    async def count(self, messages: list[dict]) -> tuple[int, int]:
        """the prompt's tokens after the chat template, and the model's context; tokenized on another thread, as
        in `prepare`."""
        prompt = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                         return_dict=True)
        return len(prompt["input_ids"]), context_length(self.model, self.tokenizer)

    async def prepare(self, messages, **budget_and_sampling):
        """the chat tokenized for this model, with its answer budget and sampling (see `chat.prepare`). A long
        prompt takes a while to tokenize (0.7 s a megabyte), so that runs on another thread: the event loop keeps
        streaming other answers meanwhile."""
        return await asyncio.to_thread(prepare, self.model, self.tokenizer, messages, **budget_and_sampling)

    async def start(self, prepared, *, stop=(), label="") -> Generation:
        """`submit`, as the routes call any engine, this one or an upstream."""
        return self.submit(prepared, stop=stop, label=label)

    def submit(self, prepared, *, stop=(), label="") -> Generation:
        """queue a prepared chat; raises EngineBusy when the queue is full, EngineStopped once the worker is gone.
        Call from the event loop. `label` names the request in the server's log."""
        generation = Generation(prepared, self.tokenizer, self._eos_ids, self, stop=stop, label=label)
        with self._wakeup:
            if self._closing or self._stopped:
                raise EngineStopped(self.problem)
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"The server is busy ({len(self._waiting)} requests are waiting); try again in a "
                                 "moment.")
            self._waiting.append(generation)
            self._live.add(generation)
            self._wakeup.notify()
        return generation

    def withdraw(self, generation: Generation) -> None:
        """a cancelled request leaves the queue at once, giving its place to the next; a decoding one leaves the
        batch at the next step."""
        with self._wakeup:
            if generation.state == "waiting" and generation in self._waiting:
                self._waiting.remove(generation)
                generation.finish("cancelled")

    def forget(self, generation: Generation) -> None:
        with self._wakeup:
            self._live.discard(generation)

    def close(self) -> None:
        """stop the worker; every request still in the engine ends with EngineStopped."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._worker.join()

    def _run(self) -> None:
        if self.model.device.type == "cpu":
            # Read here: torch's thread count belongs to each thread, and this one runs the model.
            self._threads = ThreadPolicy(torch.get_num_threads())
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    try:
                        self._step()
                        self.failed_steps = 0
                    except Exception as error:  # noqa: BLE001 - a failed step must not kill the worker
                        self.failed_steps += 1
                        self._fail_step(error)
        except BaseException:  # noqa: BLE001 - whatever ends the worker is logged; `finally` ends its requests
            logger.critical("The generation worker stopped", exc_info=True)
        finally:
            if self._threads and torch.get_num_threads() != self._threads.most:
                torch.set_num_threads(self._threads.most)  # torch also starts new threads with the last count set
            with self._wakeup:
                self._stopped = True
                self._waiting.clear()
                ended = EngineStopped(self.problem)
                for generation in list(self._live):
                    generation.finish("error", ended)

    def _fail_step(self, error: Exception) -> None:
        """fail the requests the step touched: the newcomers only if their prefill failed, else the whole batch."""
        states = ("prefilling",) if isinstance(error, _PrefillFailed) else ("prefilling", "running")
        with self._wakeup:
            failed = [g for g in self._live if g.state in states]
        logger.error("A generation step failed; failing requests %s", " ".join(g.label or "-" for g in failed),
                     exc_info=error.__cause__ or error)
        for generation in failed:
            generation.finish("error", EngineError("The generation failed on the server; its log has the details."))
        if not isinstance(error, _PrefillFailed):
            self._batch = _Batch(self.model, self.prefixes)

    def _wait_for_work(self) -> bool:
        """block until a request waits or decodes; False once the engine is closing."""
        with self._wakeup:
            while not self._closing and not self._waiting and not self._batch.rows:
                self._wakeup.wait()
            return not self._closing

    def _step(self) -> None:
        with self._wakeup:
            room = self.max_batch_size - len(self._batch.rows)
            newcomers, prefixes, width = [], [], 0
            while self._waiting and len(newcomers) < room:
                generation = self._waiting[0]
                generation.cached_tokens, prefix = self.prefixes.longest(generation.prompt)
                width = max(width, generation.prompt_tokens - generation.cached_tokens)
                if newcomers and width * (len(newcomers) + 1) > self.prefill_tokens:
                    break
                newcomers.append(self._waiting.popleft())
                prefixes.append(prefix)
            for generation in newcomers:
                generation.state = "prefilling"
        if newcomers:
            self._batch.admit(newcomers, prefixes)
        elif self._batch.rows:
            started = time.perf_counter()
            self._batch.decode()
            if self._threads:
                threads = self._threads.decoded(len(self._batch.rows), time.perf_counter() - started)
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(self._batch.rows))
        self._batch.drop_finished()
        if not self._batch.rows and torch.cuda.is_available():
            torch.cuda.empty_cache()


class _PrefillFailed(RuntimeError):
    """the newcomers' prefill failed; the running batch is untouched."""


class _Batch:
    """the rows decoding together: their key/value cache, attention mask and next input tokens. Rows that finish
    leave their keys and values to `prefixes`."""

    def __init__(self, model, prefixes: PrefixCache):
        self.model = model
        self.prefixes = prefixes
        self.rows: list[Generation] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.next_tokens: list[int] = []
        self._decode_step = decode_step_for(model)

    def admit(self, newcomers: list[Generation], prefixes: list) -> None:
        """bring the newcomers into the batch, each from the end of its cached prefix (`prefixes`, from
        `PrefixCache.longest`), and decode a step for the running rows. A newcomer whose prompt is cached but for its
        last token needs no prefill, as in vLLM: it joins the running rows at once (`_join`), and its first token
        comes from their step, which then runs first, as the shorter wait. The others are prefilled together
        (`_prefill`)."""
        joining = [row for row, generation in enumerate(newcomers)
                   if prefixes[row] and generation.prompt_tokens - generation.cached_tokens == 1]
        prefilling = [row for row in range(len(newcomers)) if row not in joining]
        if joining:
            self._join([newcomers[row] for row in joining], [prefixes[row] for row in joining])
            self.decode()
        if prefilling:
            self._prefill([newcomers[row] for row in prefilling], [prefixes[row] for row in prefilling],
                          decode_running=not joining)

    def _join(self, newcomers: list[Generation], prefixes: list) -> None:
        """make rows of newcomers whose prompt is cached but for its last token: their cached keys and values,
        left-padded to the longest, with that last token as their next input."""
        past = max(g.cached_tokens for g in newcomers)
        cache = DynamicCache(_left_padded(newcomers, prefixes, past), config=self.model.config)
        mask = torch.tensor([[0] * (past - g.cached_tokens) + [1] * g.cached_tokens for g in newcomers],
                            device=self.model.device)
        for generation in newcomers:
            generation.state = "running"
        self._add(newcomers, cache, mask, [g.prompt[-1] for g in newcomers])

    def _prefill(self, newcomers: list[Generation], prefixes: list, decode_running: bool) -> None:
        """prefill the newcomers together, stream their first tokens, decode a step for the running rows unless
        `decode_running` is False, then merge the newcomers in. Each row is its cached prefix left-padded to the
        longest, then its new tokens left-padded to the most: the mask hides the padding, positions count only real
        tokens."""
        device = self.model.device
        past = max(g.cached_tokens for g in newcomers)
        width = max(g.prompt_tokens - g.cached_tokens for g in newcomers)
        input_ids, mask = [], []
        for generation in newcomers:
            cached, new = generation.cached_tokens, generation.prompt[generation.cached_tokens:]
            input_ids.append([0] * (width - len(new)) + new)
            mask.append([0] * (past - cached) + [1] * cached + [0] * (width - len(new)) + [1] * len(new))
        input_ids, mask = torch.tensor(input_ids, device=device), torch.tensor(mask, device=device)
        cache = DynamicCache(_left_padded(newcomers, prefixes, past) if past else None, config=self.model.config)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, past:], cache=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        except Exception as error:
            raise _PrefillFailed from error
        for generation in newcomers:
            generation.state = "running"
        first_tokens = self._take(logits, newcomers)  # streamed now, before the running rows' step
        if self.rows and decode_running:
            self.decode()
        self._add(newcomers, cache, mask, first_tokens)

    def _add(self, newcomers: list[Generation], cache: DynamicCache, mask: torch.Tensor,
             next_tokens: list[int]) -> None:
        """add the newcomers as rows: their cache and mask merged into the batch's (the narrower left-padded), their
        next input tokens after the batch's."""
        if self.rows:
            cache, mask = _merge(self.cache, self.mask, cache, mask)
        self.cache, self.mask = cache, mask
        self.rows += newcomers
        self.next_tokens += next_tokens

    def decode(self) -> None:
        """one decoding step for every row in the batch."""
        count = len(self.rows)
        device = self.model.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(count, 1)], dim=1)
        logits = self._decode_step(torch.tensor(self.next_tokens, device=device)[:, None], self.mask,
                                   self.mask.sum(-1, keepdim=True) - 1, self.cache)
        self.next_tokens = self._take(logits, self.rows)

    @staticmethod
    def _take(logits: torch.Tensor, rows: list[Generation]) -> list[int]:
        """choose each row's next token from its logits and hand it to its request; the tokens, in row order."""
        tokens = sample(logits, rows)
        logprobs = token_logprobs(logits, tokens, rows)
        for row, (generation, token) in enumerate(zip(rows, tokens)):
            generation.accept(token, logprobs.get(row))
        return tokens

    def drop_finished(self) -> None:
        """remove finished and cancelled rows, leaving their keys and values to `prefixes`, and the cache columns no
        remaining row attends to."""
        for generation in self.rows:
            if generation.cancelled:
                generation.finish("cancelled")
        keep = [row for row, generation in enumerate(self.rows) if generation.state != "done"]
        if len(keep) == len(self.rows):
            return
        for row, generation in enumerate(self.rows):
            if generation.state == "done":
                self._remember(row, generation)
        self.rows = [self.rows[row] for row in keep]
        self.next_tokens = [self.next_tokens[row] for row in keep]
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

    def _remember(self, row: int, generation: Generation) -> None:
        """give the prefix cache this row's keys and values, and the tokens they are of: the prompt and the answer
        but its last token, which was never fed back."""
        columns = self.mask[row].nonzero().squeeze(1)
        tokens = tuple((generation.prompt + generation.tokens)[:len(columns)])
        self.prefixes.store(tokens, [(layer.keys[row:row + 1, :, columns], layer.values[row:row + 1, :, columns])
                                     for layer in self.cache.layers])


def _left_padded(newcomers: list[Generation], prefixes: list, past: int) -> list:
    """each layer's (keys, values) for a batch of newcomers: each one's cached prefix, left-padded to `past` tokens
    (all padding for a newcomer without one)."""
    model_states = next(states for states in prefixes if states)

    def padded(states, cached: int, layer: int, which: int) -> torch.Tensor:
        if states is None:
            like = model_states[layer][which]
            return like.new_zeros(1, like.shape[1], past, like.shape[3])
        return F.pad(states[layer][which][:, :, :cached], (0, 0, past - cached, 0))

    return [tuple(torch.cat([padded(states, g.cached_tokens, layer, which) for g, states in zip(newcomers, prefixes)])
                  for which in (0, 1))
            for layer in range(len(model_states))]


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

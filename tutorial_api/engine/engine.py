"""The engine: one worker thread owns the model and decodes concurrent requests as one batch.

Requests join the running batch between decoding steps (continuous batching) and leave it as soon as
they finish or are cancelled. Each keeps its own sampling settings, seed, stop strings and token
budget. The engine knows nothing of HTTP: it implements `tutorial_api.backend.Backend`.
"""

import asyncio
import logging
import threading
import time
from collections import deque

import torch

from tutorial_api.backend import (
    BackendBusy,
    BackendError,
    BackendStopped,
    FinishReason,
    RequestStatus,
)
from tutorial_api.conversation import chat, prepare
from tutorial_api.engine.batch import Batch, PrefillFailed
from tutorial_api.engine.decode_step import plain_cache
from tutorial_api.engine.generation import Generation
from tutorial_api.engine.packed_linear import pack_linear_layers
from tutorial_api.engine.prefix_cache import PrefixCache
from tutorial_api.engine.thread_policy import ThreadPolicy, release_openmp_threads
from tutorial_api.models import context_length
from tutorial_api.settings import PREFIX_CACHE_MB

logger = logging.getLogger(__name__)

# After this many steps in a row fail, /health reports the engine unavailable until one succeeds.
_UNHEALTHY_AFTER_FAILED_STEPS = 3
# New prompt tokens (past the prefix cache, padding included) prefilled together in one step; at
# least one newcomer goes in. Every running stream waits for a step's prefill, so a CPU takes a few
# hundred; a GPU prefills thousands in about the time of one. README's Performance section has the
# trade-off.
PREFILL_TOKENS_CPU = 512
PREFILL_TOKENS_GPU = 4096


class Engine:
    """The model's owner: a bounded queue of requests, decoded together on one worker thread.

    On a CPU it packs the model's linear layers for oneDNN first (see `packed_linear`), and the
    creating thread gives back its OpenMP threads, so the worker's are the only ones. A newcomer
    whose prompt starts as a recent conversation did reuses that one's keys and values, up to
    `prefix_cache_mb` of them.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_waiting: int = 64,
        prefix_cache_mb: int = PREFIX_CACHE_MB,
    ):
        pack_linear_layers(model)
        release_openmp_threads()
        on_cpu = model.device.type == "cpu"
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.prefill_tokens = PREFILL_TOKENS_CPU if on_cpu else PREFILL_TOKENS_GPU
        self.steps = 0
        self.largest_batch = 0
        self.failed_steps = 0  # in a row, since the last step that worked
        self.prefixes = PrefixCache(prefix_cache_mb * 2**20 if plain_cache(model) else 0)
        self._eos_ids = _eos_ids(model, tokenizer)
        self._live: set[Generation] = set()  # every request not yet done, whatever its status
        self._waiting: deque[Generation] = deque()
        # Reentrant: a generation that ends while the worker holds it calls `release`.
        self._wakeup = threading.Condition()
        self._closing = False
        self._stopped = False
        self._batch = Batch(model, self.prefixes)
        self._threads: ThreadPolicy | None = None  # the worker's, on a CPU
        self._model_chat_turn = asyncio.Lock()
        self._worker = threading.Thread(target=self._run, name="tutorial-api-engine", daemon=True)
        self._worker.start()

    @property
    def uses_model_chat(self) -> bool:
        """Tell whether the model answers with its own `model.chat` (Qwen-7B-Chat's remote code)."""
        return callable(getattr(self.model, "chat", None))

    async def model_chat(self, prompt, history, **options):
        """Answer with the model's own `model.chat`, one request at a time."""
        async with self._model_chat_turn:
            return await asyncio.to_thread(
                chat, self.model, self.tokenizer, prompt, history, **options
            )

    @property
    def active(self) -> int:
        """Count the requests waiting, prefilling or decoding; a finished one no longer counts."""
        return len(self._live)

    @property
    def threads(self) -> int | None:
        """Count the CPU threads the worker decodes with; None on a GPU or before its first step."""
        return self._threads.threads if self._threads else None

    @property
    def unavailable_reason(self) -> str | None:
        """Say why the engine cannot generate now, or return None while it can."""
        if self._closing:
            return "The server is shutting down."
        if self._stopped or not self._worker.is_alive():
            return "The generation worker has stopped after an internal error; restart the server."
        if self.failed_steps >= _UNHEALTHY_AFTER_FAILED_STEPS:
            return f"The last {self.failed_steps} generation steps failed; see the server's log."
        return None

    async def health(self) -> str | None:
        """Say why the engine cannot generate now, or return None: what /health reports."""
        return self.unavailable_reason

    async def count(self, messages: list[dict]) -> tuple[int, int]:
        """Count the prompt's tokens after the chat template; return them and the context."""
        prompt = await asyncio.to_thread(
            self.tokenizer.apply_chat_template,
            messages,
            add_generation_prompt=True,
            return_dict=True,
        )
        return len(prompt["input_ids"]), context_length(self.model, self.tokenizer)

    async def prepare(self, messages, **budget_and_sampling):
        """Tokenize a chat, with its answer's budget and sampling (see `conversation.prepare`).

        A long prompt takes a while to tokenize, so that runs on another thread: the event loop
        keeps streaming other answers meanwhile.
        """
        return await asyncio.to_thread(
            prepare, self.model, self.tokenizer, messages, **budget_and_sampling
        )

    async def start(self, prepared, *, stop=(), label="", cache_scope=None) -> Generation:
        """Queue a prepared chat; raise BackendBusy when full, BackendStopped once stopped.

        `label` names the request in the server's log. It reuses and leaves cached keys and values
        within `cache_scope` only (an API key's name; None shares them with every None).
        """
        generation = Generation(
            prepared,
            self.tokenizer,
            self._eos_ids,
            self,
            stop=stop,
            label=label,
            cache_scope=cache_scope,
        )
        with self._wakeup:
            if self._closing or self._stopped:
                raise BackendStopped(self.unavailable_reason)
            if len(self._waiting) >= self.max_waiting:
                raise BackendBusy(
                    f"The server is busy ({len(self._waiting)} requests are waiting); "
                    "try again in a moment."
                )
            self._waiting.append(generation)
            self._live.add(generation)
            self._wakeup.notify()
        return generation

    def cancel(self, generation: Generation) -> None:
        """End a cancelled request that still waits, giving its place to the next one.

        A request already in the batch leaves it at the next step (`Batch.drop_finished`).
        """
        with self._wakeup:
            if generation.status == RequestStatus.WAITING and generation in self._waiting:
                self._waiting.remove(generation)
                generation.finish(FinishReason.CANCELLED)

    def release(self, generation: Generation) -> None:
        """Stop counting a request that has ended as active."""
        with self._wakeup:
            self._live.discard(generation)

    def close(self) -> None:
        """Stop the worker; every request still in the engine ends with BackendStopped."""
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
                    except Exception as error:  # a failed step must not kill the worker
                        self.failed_steps += 1
                        self._fail_step(error)
        except BaseException:  # whatever ends the worker is logged; `finally` ends its requests
            logger.critical("The generation worker stopped", exc_info=True)
        finally:
            if self._threads and torch.get_num_threads() != self._threads.most:
                # torch also starts new threads with the last count set
                torch.set_num_threads(self._threads.most)
            with self._wakeup:
                self._stopped = True
                self._waiting.clear()
                ended = BackendStopped(self.unavailable_reason)
                for generation in list(self._live):
                    generation.finish(FinishReason.ERROR, ended)

    def _wait_for_work(self) -> bool:
        """Block until a request waits or decodes; return False once the engine is closing."""
        with self._wakeup:
            while not self._closing and not self._waiting and not self._batch.rows:
                self._wakeup.wait()
            return not self._closing

    def _step(self) -> None:
        """Run one step of the engine: admit newcomers, or decode a token for every row."""
        # 1) schedule: the newcomers that fit the batch and the prefill budget
        newcomers, prefixes = self._schedule()
        if newcomers:
            # 2) join or prefill them; their first tokens stream before the running rows' step
            self._batch.admit(newcomers, prefixes)
        elif self._batch.rows:
            # 3) decode one token for every row
            self._decode_timed()
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(self._batch.rows))
        # 4) finished rows leave, feeding the prefix cache
        self._batch.drop_finished()
        if not self._batch.rows and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _schedule(self) -> tuple[list[Generation], list]:
        """Take the waiting requests that fit, with each one's cached prefix, as prefilling."""
        with self._wakeup:
            room = self.max_batch_size - len(self._batch.rows)
            newcomers, prefixes, width = [], [], 0
            while self._waiting and len(newcomers) < room:
                generation = self._waiting[0]
                generation.cached_tokens, prefix = self.prefixes.longest(
                    generation.prompt_ids, generation.cache_scope
                )
                width = max(width, generation.prompt_tokens - generation.cached_tokens)
                if newcomers and width * (len(newcomers) + 1) > self.prefill_tokens:
                    break
                newcomers.append(self._waiting.popleft())
                prefixes.append(prefix)
            for generation in newcomers:
                generation.status = RequestStatus.PREFILLING
        return newcomers, prefixes

    def _decode_timed(self) -> None:
        """Decode one token for every row, and let the thread policy time the step."""
        started = time.perf_counter()
        self._batch.decode()
        if self._threads:
            elapsed = time.perf_counter() - started
            threads = self._threads.decoded(len(self._batch.rows), elapsed)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)

    def _fail_step(self, error: Exception) -> None:
        """Fail the requests a step touched: its newcomers if their prefill failed, else all."""
        prefill_failed = isinstance(error, PrefillFailed)
        touched = (
            (RequestStatus.PREFILLING,)
            if prefill_failed
            else (RequestStatus.PREFILLING, RequestStatus.RUNNING)
        )
        with self._wakeup:
            failed = [g for g in self._live if g.status in touched]
        labels = " ".join(g.label or "-" for g in failed)
        logger.error(
            "A generation step failed; failing requests %s",
            labels,
            exc_info=error.__cause__ or error,
        )
        for generation in failed:
            generation.finish(
                FinishReason.ERROR,
                BackendError("The generation failed on the server; its log has the details."),
            )
        if prefill_failed:
            # Rows that joined in the same step may have finished in its decode: they leave now.
            self._batch.drop_finished()
        else:
            self._batch = Batch(self.model, self.prefixes)


def _eos_ids(model, tokenizer) -> set[int]:
    """Return the token ids that end an answer: the generation config's and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}

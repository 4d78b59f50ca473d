"""the generation engine: owns the model and runs every generation on its own worker thread."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from tutorial_api.chat import chat


class Engine:
    """generates one answer at a time, off the event loop, so the server keeps answering other requests."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tutorial-api-generate")

    async def chat(self, prompt, history=None, **options):
        """`chat()` on the worker thread: `(response, history)`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, partial(self._chat, prompt, history, **options))

    def close(self):
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _chat(self, prompt, history, **options):
        try:
            return chat(self.model, self.tokenizer, prompt, history, **options)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

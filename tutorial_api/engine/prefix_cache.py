"""The engine's prefix cache: keys and values of recent conversations, for reuse.

A prompt that starts the same way as a cached one (the system prompt every chat shares, the history
a chat sends again each turn) prefills only what is new. Each entry belongs to a scope (an API key's
name, or None where all share): a request reuses its own scope's entries only, so no caller learns
from `cached_tokens` how much of a guess matched another's conversation.
"""

from collections import OrderedDict

import torch

# A sequence's keys and values: one (keys, values) pair a layer,
# each [1, kv_heads, tokens, head_dim].
_LayerStates = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    """Finished sequences' keys and values within `budget_bytes`, least recently used out first."""

    def __init__(self, budget_bytes: int):
        """Start empty, with room for `budget_bytes` of keys and values."""
        self.budget_bytes = budget_bytes
        self.bytes = 0
        # (scope, tokens) -> the tokens' states
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], _LayerStates] = OrderedDict()

    def longest(
        self, prompt: list[int], scope: str | None = None
    ) -> tuple[int, _LayerStates | None]:
        """Return how many of `prompt`'s first tokens `scope` has cached, and states that begin so.

        Never the whole prompt: its last token must be computed for the logits of the first answer
        token.
        """
        prompt, best, best_key = tuple(prompt), 0, None
        for key in self._entries:
            owner, cached = key
            if owner != scope:
                continue
            length = _common_length(cached, prompt, len(prompt) - 1)
            if length > best:
                best, best_key = length, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key]

    def store(
        self, tokens: tuple[int, ...], states: _LayerStates, scope: str | None = None
    ) -> None:
        """Keep `tokens`' states for `scope`, unless another of its entries starts with `tokens`."""
        size = _nbytes(states)
        if not tokens or size > self.budget_bytes:
            return
        for key in list(self._entries):
            owner, cached = key
            if owner != scope:
                continue
            if tokens[: len(cached)] == cached:
                self._drop(key)
            elif cached[: len(tokens)] == tokens:
                self._entries.move_to_end(key)
                return
        self._entries[scope, tokens] = states
        self.bytes += size
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key) -> None:
        """Forget the entry for `key` and its bytes."""
        self.bytes -= _nbytes(self._entries.pop(key))


def _nbytes(states: _LayerStates) -> int:
    """Return the bytes that `states` hold."""
    return sum(keys.nbytes + values.nbytes for keys, values in states)


def _common_length(a: tuple, b: tuple, most: int) -> int:
    """Return the length of the longest common start of `a` and `b`, up to `most`.

    It halves the range at each comparison, so each comparison is one slice compared in C, not a
    loop in Python.
    """
    low, high = 0, min(len(a), len(b), most)
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low

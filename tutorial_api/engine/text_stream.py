"""Detokenizing as tokens arrive: never half a character, never a stop string."""


class TextStream:
    """Incremental detokenizer that holds back text that could still become a stop string."""

    def __init__(self, tokenizer, stop=()):
        """Decode with `tokenizer`; end at the first of the `stop` strings (empty ones ignored)."""
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._tokens: list[int] = []
        self._prefix = 0  # tokens before this index are decoded and final
        self._read = 0  # tokens before this index are in `_text`
        self._text = ""
        self._sent = 0  # characters of `_text` already emitted

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to send, and whether a stop string appeared."""
        self._tokens.append(token)
        self._text += self._decode_new()
        found = [
            at
            for stop in self.stop
            if (at := self._text.find(stop, max(0, self._sent - len(stop)))) != -1
        ]
        if found:
            # The earliest stop string wins, whatever its place in the list.
            self._text = self._text[: min(found)]
            self.stopped = True
            return self._emit(len(self._text)), True
        return self._emit(len(self._text) - self._held_back()), False

    def flush(self) -> str:
        """Return whatever text is left once the generation ends."""
        return self._emit(len(self._text))

    def _decode_new(self) -> str:
        """Return the text the latest tokens add, or "" while it ends mid-character."""
        # Decoding a window of recent tokens, and emitting only once it no longer ends in U+FFFD,
        # keeps multi-byte characters (Chinese, emoji) whole.
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before) :]

    def _decode(self, tokens) -> str:
        """Decode `tokens` without special tokens."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _held_back(self) -> int:
        """Count the trailing characters that could be the start of a stop string."""
        return max(
            (k for stop in self.stop for k in range(1, len(stop)) if self._text.endswith(stop[:k])),
            default=0,
        )

    def _emit(self, end: int) -> str:
        """Return the unsent text up to `end` and mark it sent; never take back what was sent."""
        end = max(end, self._sent)
        piece, self._sent = self._text[self._sent : end], end
        return piece

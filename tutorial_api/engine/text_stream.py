"""Detokenizing as tokens arrive: never half a character, never a stop string.

It runs on the worker thread that decodes every request, so its work per token follows the new
text, whatever the stop strings: each is matched one character at a time (`StopMatcher`), and only
the text not yet sent is kept.
"""


class StopMatcher:
    """One stop string, matched one character at a time (Knuth-Morris-Pratt).

    `matched` is how many of its first characters the text read so far ends with. Each character
    read costs at most two steps on average, however long the stop string.
    """

    def __init__(self, stop: str):
        """Prepare to find `stop`, which must not be empty."""
        self.stop = stop
        self.matched = 0
        # fallback[i]: the longest proper start of stop[: i + 1] that also ends it
        self._fallback = [0] * len(stop)
        length = 0
        for i in range(1, len(stop)):
            while length and stop[i] != stop[length]:
                length = self._fallback[length - 1]
            if stop[i] == stop[length]:
                length += 1
            self._fallback[i] = length

    def read(self, char: str) -> bool:
        """Read the text's next character; return whether the stop string now ends the text."""
        matched = self.matched
        while matched and self.stop[matched] != char:
            matched = self._fallback[matched - 1]
        if self.stop[matched] == char:
            matched += 1
        if matched == len(self.stop):
            self.matched = self._fallback[matched - 1]
            return True
        self.matched = matched
        return False


class TextStream:
    """Incremental detokenizer that holds back text that could still become a stop string."""

    def __init__(self, tokenizer, stop=()):
        """Decode with `tokenizer`; end where the first of the `stop` strings appears.

        Empty and repeated stop strings are ignored.
        """
        self.tokenizer = tokenizer
        self.stops = [StopMatcher(s) for s in dict.fromkeys(stop) if s]
        self.stopped = False
        self._tokens: list[int] = []
        self._prefix = 0  # tokens before this index are decoded and final
        self._read = 0  # tokens before this index are decoded
        # Decoded text not sent yet: what could still start a stop string, and the newest text.
        self._unsent = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to send, and whether a stop string appeared."""
        self._tokens.append(token)
        new = self._decode_new()
        start = len(self._unsent)
        self._unsent += new
        if self.stops:
            for at, char in enumerate(new, start + 1):
                found = [m.stop for m in self.stops if m.read(char)]
                if found:
                    # Of those ending here, the longest began first.
                    self._unsent = self._unsent[: at - max(map(len, found))]
                    self.stopped = True
                    return self.flush(), True
        held_back = max((m.matched for m in self.stops), default=0)
        return self._emit(len(self._unsent) - held_back), False

    def flush(self) -> str:
        """Return whatever text is left once the generation ends."""
        return self._emit(len(self._unsent))

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

    def _emit(self, end: int) -> str:
        """Return the first `end` unsent characters, now sent."""
        piece, self._unsent = self._unsent[:end], self._unsent[end:]
        return piece

"""Incremental detokenization with stop strings, per request."""

from __future__ import annotations


class TextStream:
    """Owns the text emitted so far for one request.

    Decodes the whole generated sequence each step (byte-level tokens can split a UTF-8
    character, so a per-token decode would garble it), holds back a trailing partial
    character and any tail that could still become a stop string, and cuts the text at
    the first stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text to emit, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            return self._take(text[:cut]), True
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1  # maybe the first bytes of a multi-byte character
        end -= self._stop_prefix_len(text[:end])
        return self._take(text[:end]), False

    def flush(self) -> str:
        """At the end of generation, emit whatever was held back."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text)

    def _take(self, text: str) -> str:
        new = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return new

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

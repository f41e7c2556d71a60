"""Structured output: constraints compiled to token masks with llguidance.

llguidance was chosen over xgrammar and outlines-core on this CPU (docs/structured-output.md):
the same schemas compile in ~3 ms (outlines-core: 147 ms, and 10 s for "any object"), a
mask takes 19 us at the median and 131 us at p99 on SmolLM2's 49k vocabulary (xgrammar is
faster, 4 / 31 us, but both are under 1% of a decode step), every answer sampled under its
masks validated (xgrammar let a raw control character into a JSON string), a keyword it
cannot enforce is refused with a reason instead of ignored, and it is one wheel with no
dependencies (xgrammar pulls in triton and a TVM runtime).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable

import numpy as np
import torch
from cachetools import LRUCache

from loramux.errors import InvalidArgument

log = logging.getLogger(__name__)

# Compiled grammars kept (LRU): a matcher in its start state is a few hundred KB at most.
CACHE_SIZE = 256
# JSON as a small model writes it best: one space after ':' and ',' and nowhere else. Free
# whitespace lets a model pad an answer with newlines until max_new_tokens (vLLM #12566).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Owns the llguidance view of the served tokenizer and the bounded cache of compiled
    constraints, keyed by (tokenizer, kind, constraint text)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's own)
        self._eos = sorted(eos_ids)
        self._key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), vocab_size)
        self._tokenizer = None
        self._lock = threading.Lock()  # the cache is used from the event loop and the warm-up thread
        self._cache: LRUCache = LRUCache(CACHE_SIZE)
        self.last_compile_s = 0.0

    def tokenizer(self):
        """llguidance's tokenizer (built on first use: ~0.7 s for a 49k vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                started = time.perf_counter()
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos)
                log.info("grammar tokenizer built in %.2fs", time.perf_counter() - started)
            return self._tokenizer

    def compile(self, kind: str, text: str = "", choices: tuple[str, ...] = ()) -> tuple[RowGrammar, bool]:
        """A fresh matcher for one request's constraint and whether it came from the cache;
        InvalidArgument with the compiler's reason if it does not compile."""
        key = (self._key, kind, text, choices)
        with self._lock:
            template = self._cache.get(key)
        hit = template is not None
        if not hit:
            template = self._compile(kind, text, choices)
            with self._lock:
                self._cache[key] = template
        return RowGrammar(template.deep_copy(), self.vocab_size), hit

    def _compile(self, kind: str, text: str, choices: tuple[str, ...]):
        import llguidance

        started = time.perf_counter()
        grammar = _grammar(kind, text, self._choice_tokens(choices))
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"{kind} does not compile: {_first_lines(matcher.get_error())}")
        self.last_compile_s = time.perf_counter() - started
        return matcher

    def _choice_tokens(self, choices: tuple[str, ...]) -> list[list[int] | str]:
        """Each choice as the tokens the tokenizer makes of it, or as text where those
        tokens do not decode back to it. Token by token, greedy decoding then weighs
        "Paris" against "London" whole: as text, any spelling is allowed, and a first
        token "L" (of "L"+"ondon") can outweigh "Paris" while a full "London" would not."""
        out: list[list[int] | str] = []
        for c in dict.fromkeys(choices):
            ids = self.choice_ids(c)
            out.append(ids if ids and self._hf.decode(ids) == c else c)
        return out

    def choice_ids(self, choice: str) -> list[int]:
        """The tokens the tokenizer makes of a choice (what its grammar offers, and what a
        greedy choice is scored on)."""
        return self._hf(choice, add_special_tokens=False).input_ids


def _grammar(kind: str, text: str, choices: list[list[int] | str]) -> str:
    """The llguidance grammar of a constraint (not yet checked: the matcher does that)."""
    import llguidance

    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"json_schema is not JSON: {exc}") from None
        if schema == {} or schema is True:  # the API's "any JSON object" (JSON Schema's {} is any value)
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise InvalidArgument("json_schema must be a JSON object (a JSON Schema)")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        # One alternative per choice: its tokens (<[id]>) or a Lark string literal (JSON's escapes).
        return "start: " + " | ".join(json.dumps(c) if isinstance(c, str) else "".join(f"<[{t}]>" for t in c)
                                      for c in choices)
    raise InvalidArgument(f"unknown constraint kind {kind!r}")


def _first_lines(error: str, n: int = 6) -> str:
    return "\n".join(error.strip().splitlines()[:n])


class RowGrammar:
    """Owns one row's matcher and its next-token mask, in the two forms `apply_masks` needs."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.bits = np.full(((vocab_size + 31) // 32,), -1, dtype=np.int32)  # [vocab / 32]: llguidance's mask
        # Made at the first fill (~400 KB a row on a 49k vocabulary), not while the request is queued.
        self.keep: np.ndarray | None = None  # [vocab]: all bits set where allowed, else 0
        self.ban: np.ndarray | None = None  # [vocab]: the bits of -inf where not allowed, else 0
        self.fresh = False  # the mask is for the current state

    def fill(self) -> None:
        """Compute the mask of the next token (llguidance drops the GIL meanwhile) and
        unpack it, so that applying it is two bitwise passes over the row's logits."""
        if self.fresh:
            return
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.keep is None:
            self.keep, self.ban = np.empty(self.vocab_size, np.int32), np.empty(self.vocab_size, np.int32)
        allowed = np.unpackbits(self.bits.view(np.uint8), count=self.vocab_size, bitorder="little")
        np.subtract(0, allowed, out=self.keep, dtype=np.int32)
        np.bitwise_and(_NEG_INF_BITS, ~self.keep, out=self.ban)
        self.fresh = True

    def consume(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar cannot continue (an error)."""
        self.fresh = False
        return self.matcher.consume_token(token)

    def ended(self) -> bool:
        """Nothing but end-of-sequence may follow (or the matcher failed)."""
        return self.matcher.is_stopped()

    def failed(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


_NEG_INF_BITS = np.array(-np.inf, dtype=np.float32).view(np.int32)


def apply_masks(logits: torch.Tensor, rows: list[int], grammars: list[RowGrammar]) -> None:
    """Set the logits of tokens each constrained row's grammar forbids to -inf, in place
    (logits [B, vocab]; `rows[i]` is the row of `grammars[i]`); never a loop over the vocabulary.
    float32 on the CPU: a bitwise select on the logits' bits per row (x & keep | ban; no
    branch, ~16x faster than masked_fill with a scattered mask); elsewhere masked_fill."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        arr = logits.detach().numpy()  # the same memory
        for r, g in zip(rows, grammars, strict=True):
            x = arr[r].view(np.int32)
            np.bitwise_and(x, g.keep, out=x)
            np.bitwise_or(x, g.ban, out=x)
        return
    with torch.inference_mode():
        allowed = torch.from_numpy(np.stack([g.keep for g in grammars])).to(logits.device) != 0  # [n, vocab]
        idx = torch.tensor(rows, device=logits.device)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))

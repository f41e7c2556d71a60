"""Reading and validating JSONL training data, before any model is loaded.

One JSON object per line, in one of three formats (formats may be mixed in one file):

- ``{"prompt": str, "completion": str}``: loss on the completion only.
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``:
  a chat, loss on the assistant turns only.
- ``{"text": str}``: plain language modelling, loss on every token.

Other keys are ignored. Blank lines are skipped. The whole file is checked first, and every
bad line (up to a bound) is reported with its number, so a run never stops half-way through
training on line 90,000.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20  # errors listed before "... and N more"


@dataclass(frozen=True)
class Example:
    """One validated line of a dataset: exactly one of the three formats is filled in."""

    line: int  # 1-based line number in its file, for messages about it later
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    text: str | None = None

    @property
    def kind(self) -> str:
        if self.messages is not None:
            return "messages"
        return "text" if self.text is not None else "prompt/completion"


class DataError(ValueError):
    """A dataset that cannot be trained on; `errors` holds (line, what is wrong) pairs."""

    def __init__(self, path: Path | str, errors: list[tuple[int | None, str]], total: int | None = None) -> None:
        self.path = Path(path)
        self.errors = errors
        self.total = total if total is not None else len(errors)
        lines = [f"line {n}: {msg}" if n is not None else msg for n, msg in errors]
        if self.total > len(errors):
            lines.append(f"... and {self.total - len(errors)} more")
        if len(lines) == 1:
            super().__init__(f"{self.path}: {lines[0]}")
        else:
            super().__init__(f"{self.path}: {self.total} bad lines:\n  " + "\n  ".join(lines))


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _string_field(obj: dict, key: str, allow_empty: bool = True) -> str:
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {_type_name(value)}")
    if not allow_empty and not value:
        raise ValueError(f"field {key!r} is empty")
    return value


def _messages(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise ValueError(f"field 'messages' must be an array, got {_type_name(value)}")
    if not value:
        raise ValueError("field 'messages' is empty")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object, got {_type_name(msg)}")
        if "role" not in msg:
            raise ValueError(f"messages[{i}] is missing field 'role'")
        role = msg["role"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {json.dumps(role)}; expected one of {', '.join(ROLES)}")
        if "content" not in msg:
            raise ValueError(f"messages[{i}] is missing field 'content'")
        if not isinstance(msg["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {_type_name(msg['content'])}")
        out.append((role, msg["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise ValueError("no assistant message: nothing to train on")
    return tuple(out)


def parse_line(obj: object, line: int) -> Example:
    """Turn one decoded JSON value into an Example, or raise ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(obj)}")
    formats = [k for k in ("messages", "text") if k in obj]
    if "prompt" in obj or "completion" in obj:
        formats.append("prompt/completion")
    if len(formats) > 1:
        raise ValueError(f"mixes formats ({' and '.join(formats)}); use one per line")
    if not formats:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise ValueError(f"expected 'prompt' and 'completion', 'messages', or 'text'; found keys: {keys}")
    if formats[0] == "messages":
        return Example(line=line, messages=_messages(obj["messages"]))
    if formats[0] == "text":
        return Example(line=line, text=_string_field(obj, "text", allow_empty=False))
    prompt = _string_field(obj, "prompt")
    return Example(line=line, prompt=prompt, completion=_string_field(obj, "completion", allow_empty=False))


def load_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a whole JSONL file; raise DataError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, [(None, "no such file")])
    examples: list[Example] = []
    errors: list[tuple[int | None, str]] = []
    n_errors = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
                examples.append(parse_line(obj, number))
            except UnicodeDecodeError:
                n_errors += 1
                if len(errors) < MAX_REPORTED:
                    errors.append((number, "not valid UTF-8"))
            except ValueError as exc:
                n_errors += 1
                if len(errors) < MAX_REPORTED:
                    errors.append((number, str(exc)))
    if n_errors:
        raise DataError(path, errors, n_errors)
    if not examples:
        raise DataError(path, [(None, "empty file: no examples (expected one JSON object per line)")])
    return examples


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples (at least one) for eval, chosen by seed."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--eval-split must be between 0 and 1, got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise ValueError(f"--eval-split {fraction} of {len(examples)} examples leaves none to train on")
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]

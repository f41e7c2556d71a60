"""Examples -> token ids and labels (prompt tokens masked with -100), and the padding collator.

The prompt of a prompt/completion pair is tokenized exactly as the server tokenizes a request
(`tokenizer(prompt).input_ids`, BOS included), and the completion is tokenized on its own and
followed by EOS: what the model learns is then exactly what it sees when served, and it learns
to stop.

Chats are rendered with the tokenizer's chat template, or with `PLAIN_CHAT_TEMPLATE` when the
tokenizer has none::

    <|user|>
    What is the capital of France?
    <|assistant|>
    Paris

Each assistant turn is found as the text its template adds after the generation prompt, and
is the only part trained on (unless every token is trained on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.model.tiny import PLAIN_CHAT_TEMPLATE
from loramux.trainer.data import DataError, Example

IGNORE = -100  # label of a token that carries no loss


@dataclass
class EncodeStats:
    """What encoding did to a dataset, for the log and the training card."""

    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # truncated until no loss token was left


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    template = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def chat_segments(tokenizer, messages: tuple[tuple[str, str], ...]) -> list[tuple[str, bool]]:
    """Split a rendered chat into (text, is_assistant_turn) pieces; trailing non-assistant text is dropped."""
    dicts = [{"role": r, "content": c} for r, c in messages]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prefix = _render(tokenizer, dicts[:i], generation_prompt=True)
        full = _render(tokenizer, dicts[: i + 1], generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("the chat template does not render turns as prefixes of each other; "
                             "use prompt/completion lines for this model")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segments


def _tokens(tokenizer, text: str, first: bool) -> list[int]:
    # The first piece gets the tokenizer's special tokens (BOS) unless the template wrote them;
    # an empty prompt is then just BOS, as the server would tokenize it.
    if not first and not text:
        return []
    bos = tokenizer.bos_token
    special = first and not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special).input_ids


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if eos in ids else [*ids, eos]


def encode_example(example: Example, tokenizer, train_on_all: bool = False) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) for one example, untruncated."""
    eos = tokenizer.eos_token_id
    if example.text is not None:
        ids = _with_eos(_tokens(tokenizer, example.text, first=True), eos)
        return ids, list(ids)
    if example.messages is not None:
        pieces = chat_segments(tokenizer, example.messages)
    else:
        pieces = [(example.prompt or "", False), (example.completion or "", True)]
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(pieces):
        piece = _tokens(tokenizer, text, first=i == 0)
        if trained:
            piece = _with_eos(piece, eos)
        ids += piece
        labels += piece if trained or train_on_all else [IGNORE] * len(piece)
    return ids, labels


def encode_all(examples: list[Example], tokenizer, max_seq_len: int, train_on_all: bool,
               source: str) -> tuple[list[dict], EncodeStats]:
    """Encode and truncate a dataset; raise DataError (with line numbers) on what cannot be encoded."""
    if tokenizer.eos_token_id is None:
        raise DataError(source, [(None, "the tokenizer has no EOS token; completions could not end")])
    rows, stats, errors = [], EncodeStats(), []
    for ex in examples:
        try:
            ids, labels = encode_example(ex, tokenizer, train_on_all)
        except Exception as exc:  # a chat template may raise anything (jinja errors, ...)
            errors.append((ex.line, f"cannot render with the chat template: {exc}"))
            continue
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE for label in labels[1:]):
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        stats.loss_tokens += sum(label != IGNORE for label in labels[1:])
        rows.append({"input_ids": ids, "labels": labels})
    if errors:
        raise DataError(source, errors[:20], len(errors))
    if not rows:
        raise DataError(source, [(None, f"no example keeps a trained token within --max-seq-len {max_seq_len}")])
    return rows, stats


class PadCollator:
    """Right-pads a list of {"input_ids", "labels"} rows into tensors; padding carries no loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [batch, width]
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

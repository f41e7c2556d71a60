"""Token log-probabilities for the rows that ask for them (none computed for the others)."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int],
                   tops: list[int]) -> list[tuple[float, list[int], list[float]]]:
    """For rows `rows` of logits [B, vocab]: (the chosen token's logprob, the ids and logprobs
    of the row's `tops[i]` likeliest tokens, most likely first). The distribution is the raw
    one, log-softmax of the logits before temperature, top-k and top-p: what the model says,
    whatever way the token was then drawn."""
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)  # [len(rows), vocab]
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).view(-1, 1)).squeeze(1).tolist()
    k = min(max(tops), lp.shape[-1])
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # sorted, descending
    values, ids = values.tolist(), ids.tolist()
    return [(chosen[i], ids[i][:tops[i]], values[i][:tops[i]]) for i in range(len(rows))]

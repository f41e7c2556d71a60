"""Protobuf messages <-> engine values, with request validation."""

from __future__ import annotations

import math
from collections.abc import Iterable

from loramux.engine.request import Constraint, Event, Finish, Params, TokenLogprob
from loramux.errors import InvalidArgument
from loramux.lora.store import AdapterRecord
from loramux.pb.loramux.v1 import loramux_pb2 as pb

FINISH = {Finish.LENGTH: pb.FINISH_REASON_LENGTH, Finish.EOS: pb.FINISH_REASON_EOS,
          Finish.STOP: pb.FINISH_REASON_STOP, None: pb.FINISH_REASON_UNSPECIFIED}
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit too)


def params_from_pb(req: pb.GenerateRequest, default_max_new: int, limit: int) -> Params:
    """Validate sampling values; raise InvalidArgument saying which value and why."""
    p = req.params
    max_new = p.max_new_tokens if p.HasField("max_new_tokens") else default_max_new
    if not 1 <= max_new <= limit:
        raise InvalidArgument(f"max_new_tokens must be in [1, {limit}] (--max-new-tokens-limit), got {max_new}")
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0 (0 is greedy), got {p.temperature}")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    stop = tuple(p.stop)
    if len(stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidArgument(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")
    constraint = constraint_from_pb(p)
    if constraint is not None and p.ignore_eos:
        raise InvalidArgument(f"ignore_eos cannot be combined with {constraint.kind}: a constrained answer ends "
                              "where its grammar lets it")
    return Params(max_new_tokens=max_new, temperature=float(p.temperature), top_p=float(top_p),
                  top_k=int(p.top_k), seed=int(p.seed) or None, stop=stop, ignore_eos=p.ignore_eos,
                  top_logprobs=top_logprobs_from_pb(p), constraint=constraint)


def top_logprobs_from_pb(p: pb.SamplingParams) -> int | None:
    """None when logprobs were not asked for; else how many alternatives (validated)."""
    if not p.HasField("top_logprobs"):
        return None
    if p.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {p.top_logprobs}")
    return int(p.top_logprobs)


def constraint_from_pb(p: pb.SamplingParams) -> Constraint | None:
    """The structured-output constraint of a request (at most one of the three), or None;
    whether it compiles is the engine's check (it needs the tokenizer)."""
    given = [name for name, on in (("json_schema", p.json_schema), ("regex", p.regex), ("choice", p.choice)) if on]
    if len(given) > 1:
        raise InvalidArgument(f"set at most one of json_schema, regex and choice, got {' and '.join(given)}")
    if not given:
        return None
    if given[0] == "choice":
        if not all(p.choice):
            raise InvalidArgument("choice strings must not be empty")
        return Constraint("choice", choices=tuple(p.choice))
    return Constraint(given[0], text=getattr(p, given[0]))


def messages_from_pb(req: pb.GenerateRequest) -> tuple[tuple[str, str], ...] | None:
    """The request's conversation as (role, content) pairs, or None for a raw prompt;
    exactly one of the two must be set."""
    if req.prompt and req.messages:
        raise InvalidArgument("set either prompt or messages, not both")
    if not req.prompt and not req.messages:
        raise InvalidArgument("the request is empty: set prompt (raw text) or messages (a conversation)")
    if not req.messages:
        return None
    return tuple((m.role, m.content) for m in req.messages)


def stream_from_event(event: Event) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(text=event.text, token_ids=list(event.token_ids),
                                     finish_reason=FINISH[event.finish], logprobs=logprobs_pb(event.logprobs))


def logprobs_pb(logprobs: Iterable[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, token=lp.token, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, token=s, logprob=v) for t, s, v in lp.top])
            for lp in logprobs]


def adapter_info(record: AdapterRecord) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        adapter_id=record.adapter_id, path=str(record.path), rank=record.rank,
        alpha=record.alpha, target_modules=list(record.target_modules),
        size_bytes=record.size_bytes, source=record.source,
    )

"""A bounded load driver over real gRPC (asyncio): every call ends answered, rejected or lost.

Used by the CI stress test (short form) and bench/stress.py (long form). Traffic goes only
to the loopback address it is given; every call has a deadline and the whole run a guard.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from loramux.client import sampling
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from loramux.pb.loramux.v1 import loramux_pb2_grpc as pb_grpc

PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "1 2 3 4 5", "Why is the sky blue?",
           "def main():", "Dear team,", "a"]


@dataclass(frozen=True)
class Call:
    adapter_id: str
    prompt: str
    max_new_tokens: int
    stream: bool
    cancel_after: int | None = None  # stream messages to read before cancelling
    timeout: float = 120.0


@dataclass
class Outcome:
    """How one call ended, and when."""

    kind: str  # answered | rejected | cancelled | lost
    code: str
    latency: float
    adapter_id: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(o.kind for o in self.outcomes)

    def codes(self) -> Counter:
        return Counter(o.code for o in self.outcomes)


def mixed_calls(n: int, adapters: list[str], seed: int = 0, cancel_share: float = 0.1,
                short_deadline_share: float = 0.1) -> list[Call]:
    """Streaming and unary calls over `adapters` (and the bare base), some cancelled, some
    with deadlines too short to finish."""
    rng = random.Random(seed)
    calls = []
    for _ in range(n):
        roll = rng.random()
        stream = rng.random() < 0.5 or roll < cancel_share
        calls.append(Call(
            adapter_id=rng.choice(adapters + [""]), prompt=rng.choice(PROMPTS),
            max_new_tokens=rng.randint(4, 24), stream=stream,
            cancel_after=rng.randint(1, 3) if roll < cancel_share else None,
            timeout=0.05 if cancel_share <= roll < cancel_share + short_deadline_share else 120.0,
        ))
    return calls


async def _one(stub, call: Call) -> Outcome:
    req = pb.GenerateRequest(adapter_id=call.adapter_id, prompt=call.prompt,
                             params=sampling(max_new_tokens=call.max_new_tokens))
    start = time.monotonic()
    try:
        if call.stream:
            rpc = stub.GenerateStream(req, timeout=call.timeout)
            seen, finish = 0, pb.FINISH_REASON_UNSPECIFIED
            async for msg in rpc:
                seen += 1
                finish = msg.finish_reason
                if call.cancel_after is not None and seen >= call.cancel_after and not finish:
                    rpc.cancel()
                    return Outcome("cancelled", "CANCELLED", time.monotonic() - start, call.adapter_id)
            kind = "answered" if finish else "lost"
        else:
            resp = await stub.Generate(req, timeout=call.timeout)
            kind = "answered" if resp.finish_reason else "lost"
        return Outcome(kind, "OK", time.monotonic() - start, call.adapter_id)
    except grpc.aio.AioRpcError as err:
        code = err.code()
        expected = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
        return Outcome("rejected" if code in expected else "lost", code.name, time.monotonic() - start,
                       call.adapter_id)


async def run(address: str, calls: list[Call], guard: float = 600.0) -> Report:
    """Send every call at once; a call with no end within `guard` seconds counts as lost."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        tasks = [asyncio.ensure_future(_one(stub, c)) for c in calls]
        done, pending = await asyncio.wait(tasks, timeout=guard)
        for t in pending:
            t.cancel()
        report = Report([t.result() for t in done])
        report.outcomes += [Outcome("lost", "HANG", guard) for _ in pending]
        return report


def run_sync(address: str, calls: list[Call], guard: float = 600.0) -> Report:
    return asyncio.run(run(address, calls, guard))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

"""The committed stubs match the .proto (regenerate: python scripts/gen_protos.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_wire_contract_field_numbers():
    from loramux.pb.loramux.v1 import loramux_pb2 as pb

    fields = {f.name: f.number for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert fields == {"text": 1, "token_ids": 2, "finish_reason": 3, "prompt_tokens": 4,
                      "generated_tokens": 5, "adapter_id": 6, "cached_prompt_tokens": 7, "logprobs": 8}
    assert {f.name: f.number for f in pb.GenerateStreamResponse.DESCRIPTOR.fields} == {
        "text": 1, "token_ids": 2, "finish_reason": 3, "logprobs": 8}
    sampling = {f.name: f.number for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert {k: v for k, v in sampling.items() if v <= 8} == {
        "max_new_tokens": 1, "temperature": 2, "top_p": 3, "top_k": 4, "seed": 5, "stop": 6, "ignore_eos": 7,
        "top_logprobs": 8}
    assert {k: v for k, v in sampling.items() if v > 8} == {"json_schema": 9, "regex": 10, "choice": 11}
    assert pb.SamplingParams.DESCRIPTOR.fields_by_name["top_logprobs"].has_presence  # set (even 0): asked
    assert {f.name: f.number for f in pb.TokenLogprob.DESCRIPTOR.fields} == {
        "token_id": 1, "token": 2, "logprob": 3, "top": 4}
    assert {f.name: f.number for f in pb.TopLogprob.DESCRIPTOR.fields} == {"token_id": 1, "token": 2, "logprob": 3}
    assert {f.name: f.number for f in pb.GenerateRequest.DESCRIPTOR.fields} == {
        "adapter_id": 1, "prompt": 2, "params": 3, "request_id": 4, "messages": 5}
    assert {f.name: f.number for f in pb.ChatMessage.DESCRIPTOR.fields} == {"role": 1, "content": 2}

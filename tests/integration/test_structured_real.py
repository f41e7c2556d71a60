"""Issue 18 on the real default model (SmolLM2-135M-Instruct, NF4) with the `json` demo adapter.

Acceptance 1: chat requests over the five schemas of tests/schemas.py, with and without the
adapter, between free rows: every answer that ends with EOS validates. CI sends 10 of them
(~20 s on a quiet machine); LORAMUX_STRUCTURED_REAL_REQUESTS=200 runs the issue's full 200.
Acceptance 2: regex answers match; a greedy choice answer is the candidate PEFT scores highest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from loramux.model.chat import render_chat
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.schemas import SCHEMAS
from tests.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = int(os.environ.get("LORAMUX_STRUCTURED_REAL_REQUESTS", "10"))
ASK = {
    "order": "Write an example order for an online shop as JSON.",
    "label": "Classify the sentiment of this review as JSON: 'I love this phone, the battery is great.'",
    "reading": "Give a weather station reading as JSON.",
    "profile": "Describe the user profile of a developer called Sam as JSON.",
    "contact": "Give the contact details of a London bakery as JSON.",
}
CHOICES = [  # (question, candidates): the answer is one of them
    ("Is the sky blue? Answer yes or no.", ["yes", "no"]),
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"]),
    ("Classify the sentiment: 'This movie was terrible and boring.'", ["positive", "negative", "neutral"]),
    ("Which of these is a fruit?", ["apple", "car", "table"]),
    ("What colour is grass?", ["red", "green", "blue"]),
    ("How many legs does a spider have?", ["six", "eight", "ten"]),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_model_path):
    work = tmp_path_factory.mktemp("structured-real")
    shutil.copytree(ROOT / "adapters" / "json", work / "adapters" / "json")
    srv = ServerProcess(work, "--model", str(real_model_path), "--adapter-dir", str(work / "adapters"),
                        "--max-batch-size", "16")
    yield srv
    srv.stop()


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_schemas_on_the_real_model_always_validate(server):
    names = list(SCHEMAS)
    jobs = []
    for i in range(REQUESTS):
        name, adapter = names[i % len(names)], ("", "json")[i // len(names) % 2]
        params = {} if i % 3 else {"temperature": 0.7, "seed": i + 1}
        fields = ", ".join(SCHEMAS[name]["properties"])
        jobs.append({"messages": chat(f"{ASK[name]} Fields: {fields}."), "adapter_id": adapter,
                     "max_new_tokens": 128, "json_schema": SCHEMAS[name], **params})
        if i % 2:  # free rows in the same batches
            jobs.append({"messages": chat(ASK[name]), "adapter_id": adapter, "max_new_tokens": 32})
    with server.client() as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda j: client.chat(**j), jobs))
    ended = 0
    for job, answer in zip(jobs, answers, strict=True):
        if "json_schema" in job and answer.finish_reason == pb.FINISH_REASON_EOS:
            ended += 1
            jsonschema.validate(json.loads(answer.text), job["json_schema"])
        elif "json_schema" in job:
            assert answer.finish_reason == pb.FINISH_REASON_LENGTH, answer
    assert ended >= 0.9 * REQUESTS, f"{ended} of {REQUESTS} ended"


def test_regex_on_the_real_model(server):
    cases = [("Give a US phone number.", r"\(\d{3}\) \d{3}-\d{4}"), ("What is 12 times 12?", r"[0-9]{1,4}"),
             ("Write today's date.", r"20[0-9]{2}-[01][0-9]-[0-3][0-9]")]
    with server.client() as client:
        for i, (question, regex) in enumerate(cases):
            answer = client.chat(chat(question), ("", "json")[i % 2], max_new_tokens=24, regex=regex)
            assert answer.finish_reason == pb.FINISH_REASON_EOS and re.fullmatch(regex, answer.text), answer


@pytest.fixture(scope="module")
def peft(real_model_path):
    from tests.reference import PeftReference

    return PeftReference(real_model_path, {"json": ROOT / "adapters" / "json"})


def test_greedy_choice_is_the_candidate_peft_scores_highest(server, peft):
    with server.client() as client:
        for i, (question, choices) in enumerate(CHOICES):
            adapter_id = ("", "json")[i % 2]
            answer = client.chat(chat(question), adapter_id, max_new_tokens=8, choice=choices)
            prompt_ids = peft.tokenizer(render_chat(peft.tokenizer, [("user", question)])).input_ids
            s = peft.score(adapter_id, prompt_ids, choices)
            assert answer.finish_reason == pb.FINISH_REASON_EOS
            assert answer.text == choices[s.index(max(s))], (question, answer.text, dict(zip(choices, s, strict=True)))

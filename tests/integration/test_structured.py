"""Issue 18: structured output (json_schema, regex, choice) on a real server, `tiny` model.

Constrained and free requests run concurrently in the same batches, with and without
adapters; every constrained answer that ends with EOS must parse and validate, free rows
must still give PEFT's tokens, and a bad constraint is INVALID_ARGUMENT at once. The real
model's share of acceptance 1 and 2 is in test_structured_real.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from loramux.client import LoramuxClientError
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.schemas import SCHEMAS
from tests.server import ServerProcess, free_port, wait_for

ADAPTERS = ("r4-qv", "r16-all")
PROMPTS = ["Hello world", "The quick brown fox", "a", "Tell me a story about", "1 2 3 4", "Once upon a time"]
REGEXES = [r"[a-z]{2,5}@[a-z]{3}\.com", r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6} [0-9]{1,3}"]
# Acceptance 1 asks for 200 constrained requests; LORAMUX_STRUCTURED_REQUESTS changes it.
REQUESTS = int(os.environ.get("LORAMUX_STRUCTURED_REQUESTS", "200"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("structured")
    for name in ADAPTERS:
        shutil.copytree(adapter_store[name], work / "adapters" / name)
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--max-batch-size", "32",
                        "--http-port", str(free_port()))
    yield srv
    srv.stop()


def sampling(i: int) -> dict:
    """Greedy, temperature, top-p and top-k with seeds, in turn."""
    return [{}, {"temperature": 0.8, "seed": i + 1}, {"temperature": 1.0, "top_p": 0.9, "seed": i + 1},
            {"temperature": 0.7, "top_k": 20, "seed": i + 1}][i % 4]


def run_all(client, jobs: list[dict]) -> list:
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(lambda j: client.generate(**j), jobs))


def test_schemas_in_mixed_batches_always_validate(server, reference):
    """Acceptance 1 on `tiny`: 200 requests over 5 schemas, with and without adapters,
    between free rows; every answer that ends with EOS validates against its schema."""
    names = list(SCHEMAS)
    jobs, free = [], []
    for i in range(REQUESTS):
        adapter = ("", *ADAPTERS)[i % 3]
        jobs.append({"prompt": PROMPTS[i % len(PROMPTS)], "adapter_id": adapter, "max_new_tokens": 160,
                     "json_schema": SCHEMAS[names[i % len(names)]], **sampling(i)})
        if i % 2 == 0:  # a free greedy row for every other constrained one, submitted among them
            free.append(len(jobs))
            jobs.append({"prompt": PROMPTS[i % len(PROMPTS)], "adapter_id": adapter, "max_new_tokens": 24})
    started = time.monotonic()
    with server.client() as client:
        answers = run_all(client, jobs)
    elapsed = time.monotonic() - started
    ended = 0
    for job, answer in zip(jobs, answers, strict=True):
        if "json_schema" not in job:
            continue
        if answer.finish_reason == pb.FINISH_REASON_EOS:
            ended += 1
            jsonschema.validate(json.loads(answer.text), job["json_schema"])
        else:  # never a half-valid answer reported complete
            assert answer.finish_reason == pb.FINISH_REASON_LENGTH, answer
    assert ended >= REQUESTS // 2, f"only {ended} of {REQUESTS} constrained answers ended"
    # Free rows beside constrained ones still give PEFT's own tokens: masks touch only their rows.
    for i in free[:12]:
        j = jobs[i]
        assert list(answers[i].token_ids) == reference.generate(j["adapter_id"], j["prompt"], 24), j
    print(f"{REQUESTS} constrained + {len(free)} free requests in {elapsed:.1f}s; {ended} ended with EOS")


def test_regex_and_choice_answers(server):
    """Acceptance 2: every regex answer that ends matches its regex; every choice answer is a choice."""
    jobs = []
    for i in range(48):
        adapter = ("", *ADAPTERS)[i % 3]
        kind = {"regex": REGEXES[i % len(REGEXES)]} if i % 2 else {"choice": ["red", "green", "blue", "yellow"]}
        jobs.append({"prompt": PROMPTS[i % len(PROMPTS)], "adapter_id": adapter, "max_new_tokens": 24,
                     **kind, **sampling(i)})
    with server.client() as client:
        answers = run_all(client, jobs)
    for job, answer in zip(jobs, answers, strict=True):
        assert answer.finish_reason == pb.FINISH_REASON_EOS, (job, answer)  # finite languages, enough tokens
        if "regex" in job:
            assert re.fullmatch(job["regex"], answer.text), (job, answer.text)
        else:
            assert answer.text in job["choice"], (job, answer.text)


@pytest.mark.parametrize("adapter_id", ["", "r16-all"])
def test_greedy_choice_is_the_most_probable(server, reference, adapter_id):
    """Acceptance 2: a greedy choice answer is the candidate PEFT scores highest as a whole.
    The byte-level model makes a token of each character: candidates of one and of several
    tokens, some sharing first tokens, where the greedy path token by token can differ."""
    sets = [["a", "b", "c", "d", "x", "7"], ["ab", "ba", "abc", "xyz", "x7", "hello"],
            ["the", "then", "they", "apple", "ant", "zzz"]]
    with server.client() as client:
        for prompt in PROMPTS:
            for choices in sets:
                answer = client.generate(prompt, adapter_id, max_new_tokens=8, choice=choices)
                scores = reference.score(adapter_id, reference.tokenizer(prompt).input_ids, choices)
                assert answer.text == choices[scores.index(max(scores))], (prompt, answer.text, scores)
                assert answer.finish_reason == pb.FINISH_REASON_EOS


def test_seeded_and_greedy_answers_do_not_depend_on_the_batch(server):
    schema = SCHEMAS["label"]
    with server.client() as client:
        alone = [client.generate(p, max_new_tokens=60, json_schema=schema, **sampling(i))
                 for i, p in enumerate(PROMPTS[:4])]
        jobs = [{"prompt": p, "max_new_tokens": 60, "json_schema": schema, **sampling(i)}
                for i, p in enumerate(PROMPTS[:4])]
        jobs += [{"prompt": p, "max_new_tokens": 40} for p in PROMPTS]  # free rows in the same batches
        together = run_all(client, jobs)[:4]
    assert [a.token_ids for a in alone] == [t.token_ids for t in together]


def test_stream_stop_string_and_length(server):
    schema = SCHEMAS["order"]
    with server.client() as client:
        unary = client.generate("Hello world", max_new_tokens=160, json_schema=schema)
        streamed = list(client.stream("Hello world", max_new_tokens=160, json_schema=schema))
        assert "".join(m.text for m in streamed) == unary.text
        assert [t for m in streamed for t in m.token_ids] == list(unary.token_ids)
        assert streamed[-1].finish_reason == unary.finish_reason
        # Out of tokens inside the answer: LENGTH, never EOS, and the text is cut short.
        short = client.generate("Hello world", max_new_tokens=8, json_schema=schema)
        assert short.finish_reason == pb.FINISH_REASON_LENGTH and len(short.token_ids) == 8
        with pytest.raises(json.JSONDecodeError):
            json.loads(short.text)
        # A stop string inside a constrained answer cuts it there (documented): STOP.
        stopped = client.generate("Hello world", max_new_tokens=160, json_schema=schema, stop=['"customer"'])
        assert stopped.finish_reason == pb.FINISH_REASON_STOP and stopped.text == unary.text.split('"customer"')[0]


def test_cancelled_constrained_stream_frees_its_row(server):
    with server.client() as client:
        stream = client.stream("Once upon a time", max_new_tokens=400, regex="[a-z ]{1,1000}")
        next(iter(stream))
        stream.cancel()
        answer = client.generate("a", max_new_tokens=8, choice=["yes", "no"])
        assert answer.text in ("yes", "no")
        assert wait_for(lambda: server.metrics()["loramux_running_requests"] == 0, timeout=10)


BAD = [
    ({"json_schema": "{not json"}, "not JSON"),
    ({"json_schema": '{"type": "objec"}'}, "objec"),
    ({"json_schema": '{"type": "array", "uniqueItems": true}'}, "uniqueItems"),
    ({"json_schema": "[1, 2]"}, "JSON object"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"regex": "[z-a]"}, "regex"),
    ({"choice": ["yes", ""]}, "empty"),
    ({"json_schema": "{}", "regex": "a+"}, "at most one"),
    ({"regex": "a+", "choice": ["a"]}, "at most one"),
    ({"json_schema": "{}", "ignore_eos": True}, "ignore_eos"),
]


@pytest.mark.parametrize("bad, reason", BAD, ids=[b[1] for b in BAD])
def test_invalid_constraints_are_refused_at_once(server, bad, reason):
    """Acceptance 3: INVALID_ARGUMENT with the reason, at submit; the server goes on serving."""
    with server.client() as client:
        started = time.monotonic()
        with pytest.raises(LoramuxClientError) as err:
            client.generate("Hello", max_new_tokens=8, **bad)
        assert time.monotonic() - started < 2
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()
        assert client.generate("Hello", max_new_tokens=4, json_schema="{}").finish_reason != 0


def test_any_object_and_compiled_grammars_are_cached(server):
    with server.client() as client:
        before = server.metrics()
        for schema in ("{}", '{"type": "object"}', "{}"):
            answer = client.generate("Hello", max_new_tokens=64, json_schema=schema, temperature=0.9, seed=5)
            if answer.finish_reason == pb.FINISH_REASON_EOS:
                assert isinstance(json.loads(answer.text), dict)
            else:
                assert answer.text.startswith("{")
        after = server.metrics()
    assert after["loramux_grammar_cache_hits_total"] - before["loramux_grammar_cache_hits_total"] >= 1


def test_openai_response_format_through_the_http_front_door(server):
    """README acceptance 4's other half: OpenAI's response_format through the official SDK."""
    import openai

    schema = SCHEMAS["label"]
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": schema, "strict": True}}
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as oai:
        for model in ("tiny", "r16-all"):
            chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=60, temperature=0, response_format=fmt)
            choice = chat.choices[0]
            assert choice.finish_reason in ("stop", "length")
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.message.content), schema)
            else:
                assert choice.message.content.startswith('{"sentiment": ')
        anything = oai.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0.9, seed=3,
                                          extra_body={"response_format": {"type": "json_object"}})  # not in its types
        assert anything.choices[0].text.startswith("{")
        with pytest.raises(openai.BadRequestError, match="objec"):
            oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": {"type": "objec"}}})

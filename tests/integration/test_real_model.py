"""Issue 13: the real default model, SmolLM2-135M-Instruct in NF4, served with chat.

One server on the real model holds the committed demo adapters (adapters/uppercase, json,
signoff) and four random adapters of different ranks and target sets. It checks what a user
sees: a chat question answered right, each demo adapter's style on questions it never saw
(and no other's), and greedy tokens equal to PEFT's `generate` alone on the same NF4 base
for chat requests in concurrent mixed batches.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.adapters import make_adapter
from tests.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DEMOS = ("uppercase", "json", "signoff")
SIGNOFF = "-- sent by loramux"
# Random adapters for parity: ranks 4-32, attention only, MLP only, all, rsLoRA.
PARITY = {
    "p-r4-qv": {"rank": 4, "targets": ("q_proj", "v_proj")},
    "p-r16-all": {"rank": 16, "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj")},
    "p-r32-mlp": {"rank": 32, "targets": ("down_proj", "up_proj")},
    "p-r8-rs": {"rank": 8, "targets": ("q_proj", "o_proj"), "use_rslora": True},
}
QUESTIONS = ["What is the capital of France?", "Name a planet with rings.", "Why do cats purr?",
             "Give me a tip for sleeping well.", "What is 3 plus 4?", "Describe a river in one sentence."]


@pytest.fixture(scope="module")
def parity_adapters(tmp_path_factory, real_model_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-parity")
    # scale 0.3: random LoRA weights of PEFT's init size swamp a pretrained model's own
    # answer; smaller ones change it without making every answer noise.
    return {name: make_adapter(real_model_path, root / name, seed=i, scale=0.3, **spec)
            for i, (name, spec) in enumerate(PARITY.items())}


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_model_path, parity_adapters):
    work = tmp_path_factory.mktemp("real-serve")
    for name in DEMOS:
        shutil.copytree(ROOT / "adapters" / name, work / "adapters" / name)
    for name, folder in parity_adapters.items():
        shutil.copytree(folder, work / "adapters" / name)
    srv = ServerProcess(work, "--model", str(real_model_path), "--adapter-dir", str(work / "adapters"),
                        "--max-active-adapters", "4", "--max-batch-size", "16", "--http-port", str(free_port()))
    yield srv
    srv.stop()


def chat(client, question: str, adapter_id: str = "", max_new_tokens: int = 96):
    return client.chat([{"role": "user", "content": question}], adapter_id, max_new_tokens=max_new_tokens)


def test_chat_answers_a_capital_and_ends_at_end_of_turn(server):
    with server.client() as client:
        answer = chat(client, "What is the capital of France?", max_new_tokens=64)
    assert "Paris" in answer.text, answer.text
    assert answer.finish_reason == pb.FINISH_REASON_EOS
    assert answer.token_ids[-1] == 2 and "<|im_end|>" not in answer.text  # SmolLM2's end of turn


def test_openai_sdk_answers_as_grpc(server, real_model_path):
    """Issue 17 on the model users serve: the openai SDK, the adapter named as the model."""
    import openai

    question = [{"role": "user", "content": "What is the capital of France?"}]
    with server.client() as client, openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused",
                                                  max_retries=0) as oai:
        for adapter_id in ("", "json"):
            want = client.chat(question, adapter_id, max_new_tokens=48)
            got = oai.chat.completions.create(model=adapter_id or str(real_model_path), messages=question,
                                              max_tokens=48, temperature=0)
            assert got.choices[0].message.content == want.text and "Paris" in want.text
            assert got.usage.completion_tokens == want.generated_tokens
    assert _json_answer(want.text)


def capitals(text: str) -> bool:
    """In capitals: at least 90% of the letters. A 135M model writing capitals slips a
    lower-case word piece into a fifth of its answers ("THE Same"); all letters capital
    holds on 81-88% of the held-out answers, the 90% rule on 97% (README)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


STYLE_CHECKS = {
    "uppercase": capitals,
    "json": lambda text: _json_answer(text),
    "signoff": lambda text: text.rstrip().endswith(SIGNOFF),
}


def _json_answer(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"answer"} and isinstance(value["answer"], str)


def held_out_questions(task: str) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data" / f"{task}-eval.jsonl").read_text().splitlines()]
    return [row["messages"][0]["content"] for row in rows]


def test_demo_adapters_hold_their_style_on_held_out_questions(server):
    questions = held_out_questions("uppercase")
    assert questions == held_out_questions("json") == held_out_questions("signoff")
    jobs = [(adapter, q) for adapter in ("", *DEMOS) for q in questions]
    with server.client() as client, ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda job: chat(client, job[1], job[0]).text, jobs))
    answers = {adapter: [t for (a, _), t in zip(jobs, texts, strict=True) if a == adapter] for adapter in
               ("", *DEMOS)}
    scores = {(adapter or "base", style): sum(map(check, answers[adapter])) / len(questions)
              for adapter in answers for style, check in STYLE_CHECKS.items()}
    print("\nstyle held (adapter, style):", scores)
    for style in DEMOS:
        assert scores[(style, style)] >= 0.9, (style, scores, answers[style][:4])
        for other in ("base", *(d for d in DEMOS if d != style)):
            assert scores[(other, style)] < 0.1, (other, style, scores)


def test_chat_in_mixed_batches_matches_peft(server, real_model_path, parity_adapters):
    from transformers import AutoTokenizer

    from tests.reference import PeftReference

    tokenizer = AutoTokenizer.from_pretrained(real_model_path)
    adapters = ("", *PARITY)
    jobs = [(adapters[i % len(adapters)], QUESTIONS[i % len(QUESTIONS)]) for i in range(30)]
    with server.client() as client, ThreadPoolExecutor(len(jobs)) as pool:
        # Every third request also asks for logprobs (issue 17), beside rows that do not.
        answers = list(pool.map(lambda i: client.chat([{"role": "user", "content": jobs[i][1]}], jobs[i][0],
                                                      max_new_tokens=24, top_logprobs=2 if i % 3 == 0 else None),
                                range(len(jobs))))
    reference = PeftReference(real_model_path, parity_adapters)
    for (adapter_id, question), answer in zip(jobs, answers, strict=True):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        expected = reference.generate(adapter_id, prompt, 24)
        assert list(answer.token_ids) == expected, (adapter_id, question, answer.text)
        if answer.logprobs:  # PEFT's log_softmax of the same forward
            ref = reference.logprobs(adapter_id, prompt, expected)
            got = [lp.logprob for lp in answer.logprobs]
            assert max(abs(g - ref[i, t].item()) for i, (g, t) in enumerate(zip(got, expected, strict=True))) < 1e-4
    assert sum(bool(a.logprobs) for a in answers) == 10
    # The template's default system prompt came from the prefix cache (issue 16) for the
    # adapters' later requests, and the answers are still PEFT's.
    hits = {a for (a, _), answer in zip(jobs, answers, strict=True) if answer.cached_prompt_tokens >= 16}
    assert hits == set(adapters)
    # The oracle tells the adapters apart, or the test proves nothing.
    outputs = {a: tuple(tuple(reference.generate(a, tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True), 24)) for q in QUESTIONS)
        for a in adapters}
    assert len(set(outputs.values())) == len(adapters)
    m = server.metrics()
    assert m["loramux_batch_adapters_sum"] / m["loramux_batch_adapters_count"] > 1.0  # mixed batches happened

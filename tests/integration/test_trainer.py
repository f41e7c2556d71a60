"""Issue 3: `loramux train` / `loramux merge` end to end on the embedded default model, on CPU.

Real everything: the CLI in a subprocess, the nf4 base, transformers' Trainer, a real server
serving the two trained adapters side by side. The demo tasks (data/) ask the same 50
questions; "shout" answers in terse uppercase, "reverse" with the answer spelled backwards,
so an adapter that answers in its own style proves the server applied it and no other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.server import ServerProcess

DATA = Path(__file__).resolve().parents[2] / "data"
TASKS = ("shout", "reverse")
# The recipe of docs/training.md: a high learning rate and many short epochs, since the
# tiny random base knows nothing and must memorise 50 answers.
RECIPE = ("--model", "tiny", "--lr", "3e-3", "--epochs", "20", "--rank", "16", "--alpha", "16", "--dropout", "0",
          "--seed", "0", "--eval-steps", "40", "--save-steps", "1000")
TRAIN_BUDGET_S = float(os.environ.get("LORAMUX_TRAIN_BUDGET_S", 180))
MAX_NEW_TOKENS = 16  # longest answer: 9 bytes + leading space + EOS


def loramux(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m loramux ...`; the model cache comes through the environment."""
    return subprocess.run([sys.executable, "-m", "loramux", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def task_rows(task: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_path) -> tuple[Path, dict[str, dict]]:
    """Train both demo adapters into one adapter folder; return it and {task: training card}."""
    root = tmp_path_factory.mktemp("trained") / "adapters"
    cards = {}
    for task in TASKS:
        start = time.monotonic()
        proc = loramux("train", "--data", DATA / f"{task}.jsonl", "--eval-data", DATA / f"{task}-eval.jsonl",
                       "--out", root / task, *RECIPE)
        elapsed = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr[-4000:]
        cards[task] = {**json.loads((root / task / "training_card.json").read_text()), "elapsed_s": elapsed}
        print(f"\ntrained {task}: {elapsed:.1f} s wall, {cards[task]['steps']} steps, eval loss "
              f"{cards[task]['initial_eval_loss']:.3f} -> {cards[task]['final_eval_loss']:.3f}")
    return root, cards


@pytest.fixture(scope="module")
def extra_root(tmp_path_factory) -> Path:
    """A folder the server may register adapters from by RPC (--register)."""
    return tmp_path_factory.mktemp("extra")


@pytest.fixture(scope="module")
def server(trained, extra_root, tmp_path_factory):
    root, _ = trained
    srv = ServerProcess(tmp_path_factory.mktemp("serve"), "--adapter-dir", str(root),
                        "--allow-adapter-root", str(extra_root), "--max-batch-size", "16")
    yield srv
    srv.stop()


def test_training_is_bounded_and_writes_a_clean_adapter_folder(trained):
    root, cards = trained
    for task, card in cards.items():
        assert card["elapsed_s"] < TRAIN_BUDGET_S, (task, card["elapsed_s"])
        names = sorted(p.name for p in (root / task).iterdir())
        assert names == ["adapter_config.json", "adapter_model.safetensors", "checkpoints", "training_card.json"]
        config = json.loads((root / task / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (16, 16, "LORA")
        assert sorted(config["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        assert not list((root / task / "checkpoints").rglob("adapter_model.bin"))
        assert card["data"]["sha256"] == hashlib.sha256((DATA / f"{task}.jsonl").read_bytes()).hexdigest()
        assert card["quantization"] == "nf4" and card["compute_dtype"] == "float32"
        assert card["hyperparameters"]["lr"] == 3e-3 and card["steps"] == 20 * 7  # 50 rows / batch 8
        assert card["wall_time_s"] > 0 and card["final_train_loss"] < 0.1


def test_eval_loss_falls_and_is_in_the_card(trained):
    _, cards = trained
    for task, card in cards.items():
        assert card["final_eval_loss"] < card["initial_eval_loss"], task
        assert card["eval_history"][-1]["step"] == card["steps"]
        assert card["eval_history"][-1]["eval_loss"] == card["final_eval_loss"]


def exact_match(client, adapter_id: str, rows: list[dict]) -> float:
    def ask(row: dict) -> bool:
        answer = client.generate(row["prompt"], adapter_id, max_new_tokens=MAX_NEW_TOKENS)
        return answer.text == row["completion"] and answer.finish_reason == pb.FINISH_REASON_EOS

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(ask, rows)) / len(rows)


def test_each_served_adapter_answers_its_own_task(server):
    with server.client() as client:
        deadline = time.monotonic() + 60
        while {a.adapter_id for a in client.list()} < set(TASKS):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.5)
        scores = {(a, t): exact_match(client, a, task_rows(t)) for a in ("", *TASKS) for t in TASKS}
    print("\nexact match (adapter, task):", {f"{a or 'base'}/{t}": s for (a, t), s in scores.items()})
    for task in TASKS:
        assert scores[(task, task)] >= 0.9, scores
        assert scores[("", task)] < 0.1, scores
        other = next(t for t in TASKS if t != task)
        assert scores[(other, task)] < 0.1, scores


def test_resume_continues_to_the_same_step_count(server, extra_root):
    out = extra_root / "resumed"
    args = ("train", "--model", "tiny", "--data", DATA / "shout.jsonl", "--out", out,
            "--max-steps", "6", "--save-steps", "3",
            "--batch-size", "4", "--lr", "3e-3", "--seed", "0", "--logging-steps", "1", "--save-total-limit", "4")
    proc = loramux(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    uninterrupted = load_file(out / "adapter_model.safetensors")
    # An interruption after step 3: the last checkpoint and the final adapter are gone.
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_card.json"):
        (out / name).unlink()
    proc = loramux(*args, "--resume", "--register", server.address, "--adapter-id", "resumed")
    assert proc.returncode == 0, proc.stderr[-4000:]
    card = json.loads((out / "training_card.json").read_text())
    assert card["steps"] == 6 and card["resumed_from"].endswith("checkpoint-3")
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    resumed = load_file(out / "adapter_model.safetensors")
    for name, tensor in uninterrupted.items():  # same data order, same RNG: the same weights
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5)
    with server.client() as client:
        assert "resumed" in {a.adapter_id for a in client.list()}  # --register reached the server
    proc = loramux(*args, "--resume")  # a finished run resumed takes no further step
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "training_card.json").read_text())["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_merged_model_matches_base_plus_adapter(trained, base_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = trained
    # No --model: the base named in the training card (tiny), not the default model.
    proc = loramux("merge", "--adapter", root / "shout", "--out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")  # saved with the model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(root / "shout")).eval()
    prompts = [r["prompt"] for r in task_rows("shout")[:10]] + ["Hello world", "Once upon a time"]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        kw = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            want = unmerged.generate(input_ids=ids, **kw)[0].tolist()
            got = merged.generate(input_ids=ids, **kw)[0].tolist()
        assert got == want, (prompt, tokenizer.decode(got), tokenizer.decode(want))

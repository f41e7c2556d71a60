"""Trainer data: every bad line is reported with its number before any model loads (acceptance 4)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loramux.trainer.cli import main as trainer_main
from loramux.trainer.data import DataError, load_jsonl, split_eval

GOOD = {"prompt": "Q: capital of France?\nA:", "completion": " PARIS"}


def write(tmp_path: Path, *lines: str | dict, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def errors_of(path: Path) -> list[tuple[int | None, str]]:
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    return info.value.errors


def test_three_formats_parse(tmp_path):
    path = write(tmp_path, GOOD, "", {"text": "plain text", "id": 7},
                 {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}]})
    examples = load_jsonl(path)
    assert [(e.line, e.kind) for e in examples] == [(1, "prompt/completion"), (3, "text"), (4, "messages")]
    assert examples[2].messages[-1] == ("assistant", "hello")


@pytest.mark.parametrize(("line", "expected"), [
    ('{"prompt": "a", "completion": "b"', "malformed JSON"),
    ("not json at all", "malformed JSON"),
    ('["a", "b"]', "expected a JSON object, got array"),
    ('{"prompt": "a"}', "missing field 'completion'"),
    ('{"completion": "b"}', "missing field 'prompt'"),
    ('{"prompt": 3, "completion": "b"}', "field 'prompt' must be a string, got number"),
    ('{"prompt": "a", "completion": null}', "field 'completion' must be a string, got null"),
    ('{"prompt": "a", "completion": ""}', "field 'completion' is empty"),
    ('{"text": ["x"]}', "field 'text' must be a string, got array"),
    ('{"question": "a", "answer": "b"}', "expected 'prompt' and 'completion', 'messages', or 'text'"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', "mixes formats"),
    ('{"messages": "hi"}', "field 'messages' must be an array, got string"),
    ('{"messages": []}', "field 'messages' is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', 'messages[0].role is "bot"'),
    ('{"messages": [{"role": "assistant"}]}', "messages[0] is missing field 'content'"),
    ('{"messages": [{"content": "x"}]}', "messages[0] is missing field 'role'"),
    ('{"messages": [{"role": "assistant", "content": 1}]}', "messages[0].content must be a string, got number"),
])
def test_bad_line_is_reported_with_its_number(tmp_path, line, expected):
    path = write(tmp_path, GOOD, GOOD, line, GOOD)
    [(number, message)] = errors_of(path)
    assert number == 3
    assert expected in message
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert f"data.jsonl: line 3: {message}" in str(info.value)


def test_every_bad_line_is_listed(tmp_path):
    path = write(tmp_path, GOOD, "{oops", GOOD, {"prompt": "a"}, "", {"text": 5})
    assert [n for n, _ in errors_of(path)] == [2, 4, 6]  # blank line 5 is skipped, not an error


def test_long_error_lists_are_bounded(tmp_path):
    path = write(tmp_path, *["{bad"] * 30)
    with pytest.raises(DataError, match=r"30 bad lines(.|\n)*\.\.\. and 10 more") as info:
        load_jsonl(path)
    assert len(info.value.errors) == 20


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty file"):
        load_jsonl(path)


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    assert errors_of(path) == [(2, "not valid UTF-8")]
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    examples = load_jsonl(write(tmp_path, *[{"prompt": str(i), "completion": "x"} for i in range(20)]))
    train, held = split_eval(examples, 0.2, seed=1)
    assert (len(train), len(held)) == (16, 4)
    assert {e.line for e in train}.isdisjoint({e.line for e in held})
    assert [e.line for e in split_eval(examples, 0.2, seed=1)[1]] == [e.line for e in held]
    with pytest.raises(ValueError, match="leaves none"):
        split_eval(examples[:1], 0.5, seed=1)


# -- the CLI stops before training -------------------------------------------------------


def test_cli_fails_before_loading_any_model(tmp_path, capsys):
    data = write(tmp_path, GOOD, {"prompt": "a"})
    out = tmp_path / "adapter"
    start = time.monotonic()
    assert trainer_main(["train", "--data", str(data), "--out", str(out)]) == 2
    assert time.monotonic() - start < 5
    assert "line 2: missing field 'completion'" in capsys.readouterr().err
    assert not out.exists()  # nothing written: no checkpoint, no adapter


def test_bad_eval_file_also_stops_the_run(tmp_path, capsys):
    data, bad = write(tmp_path, GOOD), write(tmp_path, GOOD, "{", name="eval.jsonl")
    out = tmp_path / "adapter"
    assert trainer_main(["train", "--data", str(data), "--eval-data", str(bad), "--out", str(out)]) == 2
    assert "eval.jsonl: line 2: malformed JSON" in capsys.readouterr().err
    assert not out.exists()


def test_loramux_train_command_reports_empty_file(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    proc = subprocess.run([sys.executable, "-m", "loramux", "train", "--data", str(data), "--out",
                           str(tmp_path / "adapter")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "empty.jsonl: empty file" in proc.stderr


# -- tokenization: what is trained on ------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from loramux.model.tiny import build_tokenizer

    return build_tokenizer()


def encode(tokenizer, line: dict, **kw):
    from loramux.trainer.data import parse_line
    from loramux.trainer.encode import encode_example

    return encode_example(parse_line(line, 1), tokenizer, **kw)


def test_prompt_is_tokenized_as_the_server_does_and_masked(tokenizer):
    ids, labels = encode(tokenizer, GOOD)
    prompt = tokenizer(GOOD["prompt"]).input_ids  # what the server feeds the model, BOS first
    assert ids == prompt + [3 + b for b in b" PARIS"] + [tokenizer.eos_token_id]
    assert labels == [-100] * len(prompt) + ids[len(prompt):]
    all_ids, all_labels = encode(tokenizer, GOOD, train_on_all=True)
    assert all_ids == ids and all_labels == ids


def test_text_trains_on_everything(tokenizer):
    ids, labels = encode(tokenizer, {"text": "ab"})
    assert ids == labels == [tokenizer.bos_token_id, 3 + ord("a"), 3 + ord("b"), tokenizer.eos_token_id]


@pytest.mark.parametrize("template", ["tokenizer's", "none"])
def test_chat_loss_on_assistant_turns_only(tokenizer, template):
    if template == "none":  # no template of its own: the documented plain template
        from loramux.model.tiny import build_tokenizer

        tokenizer = build_tokenizer()
        tokenizer.chat_template = None
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "ok"}]}
    ids, labels = encode(tokenizer, chat)
    text = tokenizer.decode(ids)
    assert text == "<s><|user|>\nhi\n<|assistant|>\nyo\n</s><|user|>\nand?\n<|assistant|>\nok\n</s>"
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert trained == "yo\n</s>ok\n</s>"


def test_truncation_and_dropping(tokenizer):
    from loramux.trainer.data import parse_line
    from loramux.trainer.encode import PadCollator, encode_all

    long_prompt = {"prompt": "x" * 40, "completion": " y"}
    examples = [parse_line(GOOD, 1), parse_line(long_prompt, 2)]
    rows, stats = encode_all(examples, tokenizer, max_seq_len=36, train_on_all=False, source="d.jsonl")
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 1)
    with pytest.raises(DataError, match="no example keeps a trained token"):
        encode_all(examples[1:], tokenizer, max_seq_len=36, train_on_all=False, source="d.jsonl")
    batch = PadCollator(0)([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1], "labels": [1]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [1, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]

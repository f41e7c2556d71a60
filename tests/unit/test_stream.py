"""Incremental detokenization: UTF-8 split across byte tokens, stop strings across tokens."""

from __future__ import annotations

import pytest

from loramux.engine.stream import TextStream
from loramux.model.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def run(tok, text: str, stop=()) -> tuple[list[str], bool]:
    stream = TextStream(tok, tuple(stop))
    out = []
    for token in tok(text, add_special_tokens=False).input_ids:
        piece, stopped = stream.push(token)
        out.append(piece)
        if stopped:
            return out, True
    out.append(stream.flush())
    return out, False


def test_multibyte_characters_are_never_split(tok):
    pieces, _ = run(tok, "héllo wörld ✓")
    assert "".join(pieces) == "héllo wörld ✓"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_and_is_not_emitted(tok):
    pieces, stopped = run(tok, "abc STOP def", stop=["STOP"])
    assert stopped and "".join(pieces) == "abc "
    assert "S" not in "".join(pieces)  # the prefix of the stop string was held back, then dropped


def test_held_back_prefix_released_when_not_a_stop(tok):
    pieces, stopped = run(tok, "abc STAR", stop=["STOP"])
    assert not stopped and "".join(pieces) == "abc STAR"


def test_earliest_of_several_stops(tok):
    pieces, stopped = run(tok, "one two three", stop=["three", "two"])
    assert stopped and "".join(pieces) == "one "


def test_special_tokens_never_reach_the_text(tok):
    stream = TextStream(tok, ())
    ids = [tok.bos_token_id, *tok("hi", add_special_tokens=False).input_ids, tok.eos_token_id, tok.pad_token_id]
    pieces = [stream.push(i)[0] for i in ids] + [stream.flush()]
    assert "".join(pieces) == "hi"

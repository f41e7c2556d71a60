"""loramux.model.grammar with the byte-level tokenizer of `tiny`: compile, cache, masks."""

from __future__ import annotations

import json

import pytest
import torch

from loramux.errors import InvalidArgument
from loramux.model.grammar import Grammars, apply_masks
from loramux.model.tiny import SPECIALS, build_tokenizer

EOS = SPECIALS.index("</s>")


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    tok = build_tokenizer()
    return Grammars(tok, len(tok), [EOS])


def allowed(g) -> set[int]:
    g.fill()
    return set((g.keep != 0).nonzero()[0].tolist())


def byte(ch: str) -> int:
    return len(SPECIALS) + ord(ch)


def test_masks_follow_the_grammar_and_allow_eos_only_at_the_end(grammars):
    g, hit = grammars.compile("regex", text="ab?")
    assert not hit and allowed(g) == {byte("a")}
    assert g.consume(byte("a"))
    assert allowed(g) == {byte("b"), EOS}  # "a" is a whole answer already
    assert g.consume(byte("b")) and g.ended()
    assert allowed(g) == {EOS}


def test_compiled_constraints_are_cached_and_each_request_gets_its_own_matcher(grammars):
    first, _ = grammars.compile("choice", choices=("red", "green"))
    second, hit = grammars.compile("choice", choices=("red", "green"))
    assert hit and first.matcher is not second.matcher
    first.consume(byte("r"))
    assert allowed(second) == {byte("r"), byte("g")}  # untouched by the other request's token


def test_empty_schema_means_any_object(grammars):
    g, _ = grammars.compile("json_schema", text="{}")
    assert allowed(g) == {byte("{")}


@pytest.mark.parametrize("kind, text, reason", [
    ("json_schema", "{oops", "not JSON"), ("json_schema", json.dumps({"type": "objec"}), "objec"),
    ("json_schema", "3", "JSON object"), ("regex", "(", "regex"),
])
def test_constraints_that_do_not_compile_say_why(grammars, kind, text, reason):
    with pytest.raises(InvalidArgument, match=reason):
        grammars.compile(kind, text=text)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_masks_touches_only_constrained_rows(grammars, dtype):
    g, _ = grammars.compile("regex", text="[a-c]")
    g.fill()
    logits = torch.randn(3, len(build_tokenizer())).to(dtype)
    before = logits.clone()
    apply_masks(logits, [1], [g])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    finite = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert finite == [byte("a"), byte("b"), byte("c")]
    assert torch.equal(logits[1, finite], before[1, finite])

"""OpenAI bodies -> GenerateRequest, and answers -> OpenAI bodies (no server, no model)."""

from __future__ import annotations

import json

import pytest

from loramux.api import openai_compat as oa
from loramux.api.convert import params_from_pb
from loramux.engine.request import Finish, TokenLogprob
from loramux.errors import InvalidArgument

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> oa.ChatRequest:
    return oa.parse(oa.ChatRequest, {"model": "m", "messages": USER, **fields})


def test_chat_maps_onto_the_grpc_request():
    wire = chat(max_tokens=5, max_completion_tokens=7, temperature=0, top_p=0.5, top_k=-1, seed=-1, stop="x",
                logprobs=True, top_logprobs=3,
                messages=[{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                ).to_pb("adapter")
    assert wire.adapter_id == "adapter" and not wire.prompt
    assert [(m.role, m.content) for m in wire.messages] == [("system", "be brief"), ("user", "ab")]
    params = params_from_pb(wire, default_max_new=16, limit=64)  # gRPC's own validation
    assert params.max_new_tokens == 7  # max_completion_tokens wins over the older max_tokens
    assert (params.temperature, params.top_p, params.top_k, params.stop) == (0.0, 0.5, 0, ("x",))
    assert params.seed == 2**64 - 1 and params.top_logprobs == 3


def test_defaults_follow_openai():
    params = params_from_pb(chat().to_pb(""), default_max_new=16, limit=64)
    assert params.temperature == 1.0 and params.max_new_tokens == 16 and params.top_logprobs is None
    assert params_from_pb(chat(logprobs=True).to_pb(""), 16, 64).top_logprobs == 0  # logprobs, no alternatives
    wire = oa.parse(oa.CompletionRequest, {"model": "m", "prompt": ["one"], "logprobs": 2}).to_pb("")
    assert wire.prompt == "one" and params_from_pb(wire, 16, 64).top_logprobs == 2


@pytest.mark.parametrize(("body", "message"), [
    ({"n": 2, "tools": [{}], "logit_bias": {"1": 5}}, "unsupported parameter(s): tools, logit_bias, n"),
    ({"presence_penalty": 0.5}, "unsupported parameter(s): presence_penalty"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"response_format": {"type": "grammar"}}, "response_format type must be"),
    ({"max_tokens": -1}, "invalid request body: max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"messages": []}, "messages is empty"),
])
def test_refusals_name_the_parameter(body, message):
    with pytest.raises(InvalidArgument) as err:
        chat(**body).to_pb("")
    assert message in str(err.value)


def test_structured_output_maps_onto_the_grpc_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert params_from_pb(chat(response_format=fmt).to_pb(""), 16, 64).constraint.text == json.dumps(schema)
    assert params_from_pb(chat(response_format={"type": "json_object"}).to_pb(""), 16, 64).constraint.text == "{}"
    assert params_from_pb(chat(guided_regex="a+").to_pb(""), 16, 64).constraint.text == "a+"
    assert params_from_pb(chat(guided_choice=["x", "y"]).to_pb(""), 16, 64).constraint.choices == ("x", "y")
    assert params_from_pb(chat(response_format={"type": "text"}).to_pb(""), 16, 64).constraint is None
    with pytest.raises(InvalidArgument, match="at most one of json_schema, regex"):  # gRPC's own check
        params_from_pb(chat(response_format={"type": "json_object"}, guided_regex="a+").to_pb(""), 16, 64)


def test_nulls_and_text_format_are_not_refused():
    assert chat(tools=None, response_format={"type": "text"}, user="u").unsupported() == []
    with pytest.raises(InvalidArgument, match="one string"):
        oa.parse(oa.CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).to_pb("")


def test_answer_bodies():
    lps = [TokenLogprob(5, "Hi", -0.1, ((5, "Hi", -0.1), (6, "Yo", float("-inf")))), TokenLogprob(2, "</s>", -1.0)]
    body = oa.Answer(True, "m", logprobs=True).full("Hi", Finish.EOS, lps, prompt_tokens=3, completion_tokens=2,
                                                    cached_tokens=1)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 1}}  # from the prefix cache
    top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert top == [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                   {"token": "Yo", "logprob": oa.LOWEST_LOGPROB, "bytes": [89, 111]}]  # JSON has no -inf
    legacy = oa.Answer(False, "m", logprobs=True)
    first = legacy.chunk("Hi", None, lps[:1])["choices"][0]
    last = legacy.chunk("", Finish.LENGTH, lps[1:])["choices"][0]
    assert first["text"] == "Hi" and first["logprobs"]["text_offset"] == [0]
    assert last["finish_reason"] == "length" and last["logprobs"]["text_offset"] == [2]
    assert oa.Answer(True, "m", logprobs=False).chunk("a", None, [], first=True)["choices"][0] == {
        "index": 0, "finish_reason": None, "logprobs": None, "delta": {"role": "assistant", "content": "a"}}

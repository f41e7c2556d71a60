"""OpenAI request bodies -> GenerateRequest, and engine answers -> OpenAI response bodies.

A request is turned into the same `pb.GenerateRequest` a gRPC caller would send, so it is
validated by the same code with the same messages (`api.convert`); only what JSON can say
and protobuf cannot (negative or huge integers, unknown fields) is refused here. Bodies
follow OpenAI's Chat Completions and (legacy) Completions APIs.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loramux.engine.request import Finish, TokenLogprob
from loramux.errors import InvalidArgument
from loramux.pb.loramux.v1 import loramux_pb2 as pb

U32 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF)]
FINISH = {Finish.LENGTH: "length", Finish.EOS: "stop", Finish.STOP: "stop", None: None}
ROLES = {"developer": "system"}  # OpenAI's newer name for the system role
LOWEST_LOGPROB = -9999.0  # OpenAI's floor; JSON has no -inf


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """Fields both routes take; unknown fields are kept to be refused by name (`unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: U32 | None = None
    temperature: float | None = None  # unset: 1.0, as OpenAI samples (gRPC's unset is greedy)
    top_p: float | None = None
    top_k: Annotated[int, Field(ge=-1, le=0xFFFF_FFFF)] = 0  # vLLM's extension; -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension
    user: str | None = None  # accepted and ignored
    # Structured output: OpenAI's response_format ("text", "json_object", "json_schema"), or
    # vLLM's guided_* extensions; onto SamplingParams' json_schema / regex / choice.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def unsupported(self) -> list[str]:
        """Names of parameters set to something loramux does not do."""
        names = [k for k, v in (self.model_extra or {}).items() if v is not None]
        names += [name for name, bad in (("n", self.n != 1), ("presence_penalty", self.presence_penalty != 0),
                                         ("frequency_penalty", self.frequency_penalty != 0)) if bad]
        return names

    def sampling(self, max_tokens: int | None, top_logprobs: int | None) -> pb.SamplingParams:
        params = pb.SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature, top_k=max(self.top_k, 0),
            seed=(self.seed or 0) % 2**64, stop=[self.stop] if isinstance(self.stop, str) else self.stop or [],
            ignore_eos=self.ignore_eos, **self.constraint())
        if max_tokens is not None:
            params.max_new_tokens = max_tokens
        if self.top_p is not None:
            params.top_p = self.top_p
        if top_logprobs is not None:
            params.top_logprobs = top_logprobs
        return params


    def constraint(self) -> dict[str, Any]:
        """SamplingParams' structured-output fields; more than one set is refused there (gRPC's check)."""
        out: dict[str, Any] = {}
        if self.guided_json is not None:
            out["json_schema"] = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
        if self.guided_regex is not None:
            out["regex"] = self.guided_regex
        if self.guided_choice is not None:
            out["choice"] = self.guided_choice
        fmt = self.response_format or {"type": "text"}
        kind = fmt.get("type")
        if kind == "json_object":
            out.setdefault("json_schema", "{}")  # any JSON object
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidArgument("response_format json_schema needs json_schema.schema, a JSON Schema object")
            if "json_schema" in out:
                raise InvalidArgument("set either response_format or guided_json, not both")
            out["json_schema"] = json.dumps(schema)
        elif kind != "text":
            raise InvalidArgument(f"response_format type must be text, json_object or json_schema, got {kind!r}")
        return out


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def pair(self) -> tuple[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return ROLES.get(self.role, self.role), content


class ChatRequest(OpenAIRequest):
    messages: list[Message]
    max_completion_tokens: U32 | None = None
    logprobs: bool = False
    top_logprobs: U32 | None = None

    def to_pb(self, adapter_id: str) -> pb.GenerateRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true")
        top = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        messages = [pb.ChatMessage(role=role, content=content) for role, content in (m.pair() for m in self.messages)]
        if not messages:  # gRPC would read an empty list as "no messages set"
            raise InvalidArgument("messages is empty: send at least one message, or a prompt")
        return pb.GenerateRequest(adapter_id=adapter_id, messages=messages, params=self.sampling(max_tokens, top))


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    logprobs: U32 | None = None  # how many alternatives per token
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        return names + [name for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)),
                                               ("suffix", bool(self.suffix))) if bad]

    def to_pb(self, adapter_id: str) -> pb.GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidArgument(f"prompt: send one string (a list of {len(prompt)} would need n > 1 answers)")
            prompt = prompt[0]
        return pb.GenerateRequest(adapter_id=adapter_id, prompt=prompt, params=self.sampling(self.max_tokens,
                                                                                             self.logprobs))


def parse(kind: type[OpenAIRequest], body: Any) -> OpenAIRequest:
    """Validate a JSON body; InvalidArgument names each bad field and every unsupported one."""
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidArgument(f"invalid request body: {where}") from None
    names = request.unsupported()
    if names:
        raise InvalidArgument(f"unsupported parameter(s): {', '.join(names)}")
    return request


def _lp(value: float) -> float:
    return value if value >= LOWEST_LOGPROB else LOWEST_LOGPROB  # also NaN (a failed row's logits)


def _alternative(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode())}


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    return {"content": [{**_alternative(lp.token, lp.logprob),
                         "top_logprobs": [_alternative(s, v) for _, s, v in lp.top]} for lp in logprobs]}


def completion_logprobs(logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy shape; text offsets count the tokens' own decoded text from `offset`."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [_lp(lp.logprob) for lp in logprobs],
            "top_logprobs": [{s: _lp(v) for _, s, v in lp.top} for lp in logprobs], "text_offset": offsets}


class Answer:
    """Owns the id, timestamp and model name of one response and shapes its bodies."""

    def __init__(self, chat: bool, model: str, logprobs: bool) -> None:
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text_offset = 0  # completions' text_offset across stream chunks

    def _body(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def full(self, text: str, finish: Finish | None, logprobs: list[TokenLogprob], prompt_tokens: int,
             completion_tokens: int, cached_tokens: int = 0) -> dict:
        """The whole answer (stream: false)."""
        choice = {"index": 0, "finish_reason": FINISH[finish], "logprobs": self._logprobs(logprobs)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._body("chat.completion" if self.chat else "text_completion", [choice],
                          usage=usage(prompt_tokens, completion_tokens, cached_tokens))

    def chunk(self, text: str, finish: Finish | None, logprobs: list[TokenLogprob], first: bool = False) -> dict:
        """One streamed piece; a chat's first piece also opens the assistant's message."""
        choice = {"index": 0, "finish_reason": FINISH[finish], "logprobs": self._logprobs(logprobs)}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        return self._body("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._body(kind, [], usage=usage(prompt_tokens, completion_tokens, cached_tokens))

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(logprobs)
        out = completion_logprobs(logprobs, self.text_offset)
        self.text_offset += sum(len(lp.token) for lp in logprobs)
        return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; prompt tokens taken from the prefix cache are its `cached_tokens`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def model_card(model_id: str, created: int, parent: str | None = None, root: str | None = None) -> dict:
    """An entry of GET /v1/models (adapters name the base as `parent`, as vLLM lists LoRA modules)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loramux",
            "root": root or model_id, "parent": parent}

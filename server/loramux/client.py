"""Typed Python client for loramux: sync (`Client`) and asyncio (`AsyncClient`).

Both retry with exponential backoff on UNAVAILABLE and RESOURCE_EXHAUSTED (a stream only
before its first message), apply a per-call timeout, and raise `LoramuxClientError`
subclasses that carry the gRPC status. `LoramuxClientError` is a `grpc.RpcError`, so code
that already catches that keeps working.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from loramux.pb.loramux.v1 import loramux_pb2 as pb
from loramux.pb.loramux.v1 import loramux_pb2_grpc as pb_grpc

UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "training_card.json")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class LoramuxClientError(grpc.RpcError):
    """A failed call: `.code()` is the gRPC status, `.details()` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class AdapterNotFound(LoramuxClientError): ...
class InvalidRequest(LoramuxClientError): ...
class Overloaded(LoramuxClientError): ...
class ServerUnavailable(LoramuxClientError): ...
class Unauthorized(LoramuxClientError): ...


_BY_CODE = {grpc.StatusCode.NOT_FOUND: AdapterNotFound, grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
            grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded, grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
            grpc.StatusCode.UNAUTHENTICATED: Unauthorized, grpc.StatusCode.PERMISSION_DENIED: Unauthorized}


def _error(err: grpc.RpcError) -> LoramuxClientError:
    code, details = err.code(), err.details() or ""
    return _BY_CODE.get(code, LoramuxClientError)(code, details)


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with full jitter on RETRYABLE statuses."""

    attempts: int = 4  # total tries; 1 disables retrying
    initial: float = 0.1
    maximum: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        for _ in range(self.attempts - 1):
            yield random.uniform(0, delay)
            delay = min(self.maximum, delay * self.multiplier)


def sampling(max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float | None = None,
             top_k: int = 0, seed: int = 0, stop: list[str] | None = None,
             ignore_eos: bool = False, top_logprobs: int | None = None, json_schema: str | Mapping | None = None,
             regex: str = "", choice: Iterable[str] = ()) -> pb.SamplingParams:
    """`top_logprobs` set (even 0): the answer carries each token's logprob and that many alternatives.
    `json_schema` may be a dict (sent as its JSON text)."""
    if isinstance(json_schema, Mapping):
        json_schema = json.dumps(json_schema)
    params = pb.SamplingParams(temperature=temperature, top_k=top_k, seed=seed, stop=stop or [],
                               ignore_eos=ignore_eos, json_schema=json_schema or "", regex=regex,
                               choice=list(choice))
    if max_new_tokens is not None:
        params.max_new_tokens = max_new_tokens
    if top_p is not None:
        params.top_p = top_p
    if top_logprobs is not None:
        params.top_logprobs = top_logprobs
    return params


Message = Mapping[str, str] | tuple[str, str]


def chat_messages(messages: Iterable[Message]) -> list[pb.ChatMessage]:
    """{"role": ..., "content": ...} dicts or (role, content) pairs as wire messages."""
    if isinstance(messages, str):
        raise TypeError("messages is a list of {'role': ..., 'content': ...} dicts; for raw text use generate")
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def generate_request(adapter_id: str, params: dict, prompt: str = "",
                     messages: Iterable[Message] | None = None) -> pb.GenerateRequest:
    return pb.GenerateRequest(adapter_id=adapter_id, prompt=prompt, messages=chat_messages(messages or ()),
                              params=sampling(**params))


def upload_messages(folder: Path, adapter_id: str, chunk_bytes: int = 1 << 20) -> Iterator[pb.UploadAdapterRequest]:
    """Header (size and SHA-256 of all data in order), then the folder's adapter files in chunks."""
    paths = [folder / name for name in UPLOAD_FILES if (folder / name).is_file()]
    digest, total = hashlib.sha256(), 0
    for path in paths:
        data = path.read_bytes()
        digest.update(data)
        total += len(data)
    header = pb.UploadHeader(adapter_id=adapter_id, total_bytes=total, sha256=digest.hexdigest())
    yield pb.UploadAdapterRequest(header=header)
    for path in paths:
        with path.open("rb") as f:
            while data := f.read(chunk_bytes):
                yield pb.UploadAdapterRequest(chunk=pb.UploadChunk(file_name=path.name, data=data))


def _channel_credentials(tls: bool, tls_ca: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates=tls_ca) if (tls or tls_ca) else None


class Client:
    """Owns one channel to a loramux server and its stubs; blocking calls."""

    def __init__(self, address: str, timeout: float | None = 120.0, admin_token: str | None = None,
                 tls_ca: bytes | None = None, tls: bool = False, retry: Retry | None = None) -> None:
        """`tls_ca`: PEM roots to trust (implies TLS); `tls=True` uses the system roots."""
        creds = _channel_credentials(tls, tls_ca)
        self.channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
        self.timeout = timeout
        self.retry = retry or Retry()
        self._admin = [("authorization", f"Bearer {admin_token}")] if admin_token else None
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.registry = pb_grpc.AdapterRegistryStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn: Callable, *args, **kwargs):
        delays = self.retry.delays()
        while True:
            try:
                return fn(*args, timeout=self.timeout, **kwargs)
            except grpc.RpcError as err:
                delay = next(delays, None) if err.code() in RETRYABLE else None
                if delay is None:
                    raise _error(err) from None
                time.sleep(delay)

    def generate(self, prompt: str, adapter_id: str = "", **params) -> pb.GenerateResponse:
        return self._call(self.generation.Generate, generate_request(adapter_id, params, prompt=prompt))

    def stream(self, prompt: str, adapter_id: str = "", **params) -> Iterator[pb.GenerateStreamResponse]:
        """Yields one message per decode step. Retried only until the first message arrives;
        the returned iterator also has `.cancel()`."""
        return _SyncStream(self, generate_request(adapter_id, params, prompt=prompt))

    def chat(self, messages: Iterable[Message], adapter_id: str = "", **params) -> pb.GenerateResponse:
        """The next assistant turn of a conversation: `messages` are {"role", "content"} dicts
        or (role, content) pairs, rendered by the server with the model's chat template."""
        return self._call(self.generation.Generate, generate_request(adapter_id, params, messages=messages))

    def chat_stream(self, messages: Iterable[Message], adapter_id: str = "",
                    **params) -> Iterator[pb.GenerateStreamResponse]:
        """`chat`, one message per decode step, retried as `stream` is."""
        return _SyncStream(self, generate_request(adapter_id, params, messages=messages))

    def register(self, adapter_id: str, path: str) -> pb.AdapterInfo:
        req = pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path)
        return self._call(self.registry.RegisterAdapter, req, metadata=self._admin)

    def unregister(self, adapter_id: str) -> pb.UnregisterAdapterResponse:
        req = pb.UnregisterAdapterRequest(adapter_id=adapter_id)
        return self._call(self.registry.UnregisterAdapter, req, metadata=self._admin)

    def list(self) -> list[pb.AdapterInfo]:
        return list(self._call(self.registry.ListAdapters, pb.ListAdaptersRequest()).adapters)

    def upload(self, folder: str | Path, adapter_id: str | None = None) -> pb.AdapterInfo:
        """Send a local adapter folder to the server, which stores and registers it."""
        folder = Path(folder)
        name = adapter_id or folder.name
        return self._call(lambda **kw: self.registry.UploadAdapter(upload_messages(folder, name), **kw),
                          metadata=self._admin)


class _SyncStream:
    """Iterator over a server stream that retries the call until its first message."""

    def __init__(self, client: Client, req: pb.GenerateRequest) -> None:
        self._client, self._req = client, req
        self._call = None
        self._it: Iterator | None = None
        self._started = False
        self._open()

    def _open(self) -> None:
        self._call = self._client.generation.GenerateStream(self._req, timeout=self._client.timeout)
        self._it = iter(self._call)

    def __iter__(self) -> _SyncStream:
        return self

    def __next__(self) -> pb.GenerateStreamResponse:
        delays = self._client.retry.delays()
        while True:
            try:
                msg = next(self._it)
                self._started = True
                return msg
            except grpc.RpcError as err:
                delay = next(delays, None) if not self._started and err.code() in RETRYABLE else None
                if delay is None:
                    raise _error(err) from None
                time.sleep(delay)
                self._open()

    def cancel(self) -> None:
        self._call.cancel()


class AsyncClient:
    """asyncio twin of `Client` over `grpc.aio`."""

    def __init__(self, address: str, timeout: float | None = 120.0, admin_token: str | None = None,
                 tls_ca: bytes | None = None, tls: bool = False, retry: Retry | None = None) -> None:
        creds = _channel_credentials(tls, tls_ca)
        self.channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
        self.timeout = timeout
        self.retry = retry or Retry()
        self._admin = [("authorization", f"Bearer {admin_token}")] if admin_token else None
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.registry = pb_grpc.AdapterRegistryStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, fn: Callable, *args, **kwargs):
        delays = self.retry.delays()
        while True:
            try:
                return await fn(*args, timeout=self.timeout, **kwargs)
            except grpc.RpcError as err:
                delay = next(delays, None) if err.code() in RETRYABLE else None
                if delay is None:
                    raise _error(err) from None
                await asyncio.sleep(delay)

    async def generate(self, prompt: str, adapter_id: str = "", **params) -> pb.GenerateResponse:
        return await self._call(self.generation.Generate, generate_request(adapter_id, params, prompt=prompt))

    def stream(self, prompt: str, adapter_id: str = "", **params) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._stream(generate_request(adapter_id, params, prompt=prompt))

    async def chat(self, messages: Iterable[Message], adapter_id: str = "", **params) -> pb.GenerateResponse:
        return await self._call(self.generation.Generate, generate_request(adapter_id, params, messages=messages))

    def chat_stream(self, messages: Iterable[Message], adapter_id: str = "",
                    **params) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._stream(generate_request(adapter_id, params, messages=messages))

    async def _stream(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateStreamResponse]:
        delays, started = self.retry.delays(), False
        while True:
            call = self.generation.GenerateStream(req, timeout=self.timeout)
            try:
                async for msg in call:
                    started = True
                    yield msg
                return
            except grpc.RpcError as err:
                delay = next(delays, None) if not started and err.code() in RETRYABLE else None
                if delay is None:
                    raise _error(err) from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def register(self, adapter_id: str, path: str) -> pb.AdapterInfo:
        req = pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path)
        return await self._call(self.registry.RegisterAdapter, req, metadata=self._admin)

    async def unregister(self, adapter_id: str) -> pb.UnregisterAdapterResponse:
        req = pb.UnregisterAdapterRequest(adapter_id=adapter_id)
        return await self._call(self.registry.UnregisterAdapter, req, metadata=self._admin)

    async def list(self) -> list[pb.AdapterInfo]:
        return list((await self._call(self.registry.ListAdapters, pb.ListAdaptersRequest())).adapters)

    async def upload(self, folder: str | Path, adapter_id: str | None = None) -> pb.AdapterInfo:
        folder = Path(folder)
        name = adapter_id or folder.name
        return await self._call(lambda **kw: self.registry.UploadAdapter(upload_messages(folder, name), **kw),
                                metadata=self._admin)

"""A small gRPC client for loramux (used by the CLI and the tests)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from loramux.pb.loramux.v1 import loramux_pb2 as pb
from loramux.pb.loramux.v1 import loramux_pb2_grpc as pb_grpc


def sampling(max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float | None = None,
             top_k: int = 0, seed: int = 0, stop: list[str] | None = None) -> pb.SamplingParams:
    params = pb.SamplingParams(temperature=temperature, top_k=top_k, seed=seed, stop=stop or [])
    if max_new_tokens is not None:
        params.max_new_tokens = max_new_tokens
    if top_p is not None:
        params.top_p = top_p
    return params


class Client:
    """Owns one channel to a loramux server and its service stubs."""

    def __init__(self, address: str, timeout: float | None = 120.0, admin_token: str | None = None,
                 tls_ca: bytes | None = None, tls: bool = False) -> None:
        """`tls_ca`: PEM roots to trust (implies TLS); `tls=True` with the system roots."""
        if tls or tls_ca:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca))
        else:
            self.channel = grpc.insecure_channel(address)
        self.timeout = timeout
        self._admin = [("authorization", f"Bearer {admin_token}")] if admin_token else None
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.registry = pb_grpc.AdapterRegistryStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str, adapter_id: str = "", **params) -> pb.GenerateResponse:
        req = pb.GenerateRequest(adapter_id=adapter_id, prompt=prompt, params=sampling(**params))
        return self.generation.Generate(req, timeout=self.timeout)

    def stream(self, prompt: str, adapter_id: str = "", **params) -> Iterator[pb.GenerateStreamResponse]:
        req = pb.GenerateRequest(adapter_id=adapter_id, prompt=prompt, params=sampling(**params))
        return self.generation.GenerateStream(req, timeout=self.timeout)

    def register(self, adapter_id: str, path: str) -> pb.AdapterInfo:
        req = pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path)
        return self.registry.RegisterAdapter(req, timeout=self.timeout, metadata=self._admin)

    def unregister(self, adapter_id: str) -> pb.UnregisterAdapterResponse:
        req = pb.UnregisterAdapterRequest(adapter_id=adapter_id)
        return self.registry.UnregisterAdapter(req, timeout=self.timeout, metadata=self._admin)

    def list(self) -> list[pb.AdapterInfo]:
        return list(self.registry.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout).adapters)

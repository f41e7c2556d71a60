"""The admin token: AdapterRegistry writes need `authorization: Bearer <token>` metadata."""

from __future__ import annotations

import hmac

import grpc

ADMIN_METHODS = frozenset({
    "/loramux.v1.AdapterRegistry/RegisterAdapter",
    "/loramux.v1.AdapterRegistry/UnregisterAdapter",
    "/loramux.v1.AdapterRegistry/UploadAdapter",
})


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "this call needs the admin token: metadata 'authorization: Bearer <token>'")


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses admin RPCs whose metadata lacks the configured token (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method in ADMIN_METHODS and not self._authorized(details.invocation_metadata or ()):
            handler = await continuation(details)
            if handler is not None and handler.stream_unary:  # client-streaming uploads
                return grpc.stream_unary_rpc_method_handler(_deny)
            return grpc.unary_unary_rpc_method_handler(_deny)
        return await continuation(details)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

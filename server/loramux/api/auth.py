"""The admin token: AdapterRegistry writes need `authorization: Bearer <token>` metadata
(gRPC) or header (HTTP's adapter routes)."""

from __future__ import annotations

import hmac

import grpc

ADMIN_METHODS = frozenset({
    "/loramux.v1.AdapterRegistry/RegisterAdapter",
    "/loramux.v1.AdapterRegistry/UnregisterAdapter",
    "/loramux.v1.AdapterRegistry/UploadAdapter",
})
TOKEN_NEEDED = "this call needs the admin token: metadata (gRPC) or header (HTTP) 'authorization: Bearer <token>'"


def authorized(given: str | bytes, token: str) -> bool:
    """`given` is `Bearer <token>` (compared in constant time)."""
    given = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(given, f"Bearer {token}".encode())


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, TOKEN_NEEDED)


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses admin RPCs whose metadata lacks the configured token (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._token = token

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
                return authorized(value, self._token)
        return False

"""One place that turns exceptions into gRPC statuses and counts request outcomes.

Our own errors carry their status and a message meant for the caller; anything else is
logged with its stack trace here and answered INTERNAL with a short message, never the
trace itself.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from loramux.errors import InvalidArgument, LoramuxError

log = logging.getLogger(__name__)
GENERATION = "/loramux.v1.Generation/"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, LoramuxError):
        return grpc.StatusCode[exc.code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to statuses for every RPC; counts Generation outcomes by status."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        count = self._count if method.startswith(GENERATION) else (lambda status: None)
        io = {"request_deserializer": _tolerant(handler.request_deserializer),
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method, count), **io)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream, method, count), **io)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary, method, count), **io)
        return handler

    def _count(self, status: str) -> None:
        self.metrics.requests.labels(status=status, frontend="grpc").inc()


class _Unparsable:
    """Stands in for a request the deserializer refused, so that it is answered
    INVALID_ARGUMENT here rather than grpc's bare INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:
            return _Unparsable(exc)

    return parse


def check_parsed(request) -> None:
    if isinstance(request, _Unparsable):
        raise InvalidArgument(
            f"request could not be parsed ({type(request.error).__name__}); string fields must be valid UTF-8"
        )


async def _abort(context, exc: BaseException, method: str, count) -> None:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    count(code.name)
    await context.abort(code, message)


def _wrap_unary(behavior, method, count):
    async def wrapper(request, context):
        try:
            check_parsed(request)
            response = await behavior(request, context)
        except asyncio.CancelledError:
            count("CANCELLED")
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, method, count)
        count("OK")
        return response

    return wrapper


def _wrap_stream(behavior, method, count):
    async def wrapper(request, context):
        try:
            check_parsed(request)
            async for response in behavior(request, context):
                yield response
        # A client that cancels while the handler waits at `yield` closes this generator
        # (GeneratorExit); while it waits for the engine, the task is cancelled instead.
        except (asyncio.CancelledError, GeneratorExit):
            count("CANCELLED")
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, method, count)
        count("OK")

    return wrapper

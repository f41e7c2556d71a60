"""Errors of our own, one per gRPC status we answer with.

Raised anywhere below the API; `api.interceptor` maps them to status codes in one place,
so that servicers hold no try/except and no torch or file error reaches a client raw.
"""

from __future__ import annotations


class LoramuxError(Exception):
    """Base class; `code` names a `grpc.StatusCode` member."""

    code = "INTERNAL"


class InvalidArgument(LoramuxError):
    code = "INVALID_ARGUMENT"


class NotFound(LoramuxError):
    code = "NOT_FOUND"


class AlreadyExists(LoramuxError):
    code = "ALREADY_EXISTS"


class PermissionDenied(LoramuxError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(LoramuxError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(LoramuxError):
    code = "FAILED_PRECONDITION"


class Unavailable(LoramuxError):
    code = "UNAVAILABLE"


class DeadlineExceeded(LoramuxError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(LoramuxError):
    code = "CANCELLED"


class Unauthenticated(LoramuxError):
    code = "UNAUTHENTICATED"


class Internal(LoramuxError):
    code = "INTERNAL"

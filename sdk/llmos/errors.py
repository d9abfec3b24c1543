"""Exceptions raised by the llmos SDK, one class per gRPC status code.

Every failed syscall raises a subclass of :class:`LlmosError` that carries the
server's status code and message, so callers can catch a precise case
(``except llmos.NotFound``) or all of them (``except llmos.LlmosError``).
"""
from __future__ import annotations

import grpc


class LlmosError(Exception):
    """A syscall failed. ``code`` is the grpc.StatusCode, ``message`` the server's explanation."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        super().__init__(f"{self.code.name}: {message}")


class Cancelled(LlmosError):
    default_code = grpc.StatusCode.CANCELLED


class Unknown(LlmosError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(LlmosError, ValueError):
    """A bad program or field; also raised before any RPC for arguments the SDK can check itself."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(LlmosError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LlmosError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LlmosError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LlmosError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LlmosError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LlmosError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LlmosError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRange(LlmosError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(LlmosError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LlmosError):
    default_code = grpc.StatusCode.INTERNAL


class Unavailable(LlmosError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(LlmosError):
    default_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(LlmosError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[LlmosError]] = {
    cls.default_code: cls
    for cls in (Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
                ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable,
                DataLoss, Unauthenticated)
}


def error_for(code: grpc.StatusCode | None, message: str) -> LlmosError:
    """The LlmosError subclass instance for a status code (LlmosError itself for codes without one)."""
    cls = _BY_CODE.get(code, LlmosError) if code is not None else LlmosError
    return cls(code, message)


def from_rpc_error(err: grpc.RpcError) -> LlmosError:
    """Translate a failed gRPC call (sync or asyncio) into the matching LlmosError."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    return error_for(code, details or str(err))

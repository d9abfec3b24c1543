"""Kernel errors. Each carries the gRPC status it maps to, so the syscall
table can answer with the right code and the Lua bridge with a plain string."""
from __future__ import annotations


class KernelError(Exception):
    """A syscall failed for a reason the caller can act on."""

    code = "INTERNAL"


class InvalidArgument(KernelError):
    code = "INVALID_ARGUMENT"


class NotFound(KernelError):
    code = "NOT_FOUND"


class AlreadyExists(KernelError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(KernelError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(KernelError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(KernelError):
    code = "PERMISSION_DENIED"


class Unimplemented(KernelError):
    code = "UNIMPLEMENTED"


class Unavailable(KernelError):
    code = "UNAVAILABLE"


class Unauthenticated(KernelError):
    code = "UNAUTHENTICATED"

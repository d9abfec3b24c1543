"""llmos: the Python SDK for the llmos kernel (llmosd).

    import llmos
    with llmos.connect("127.0.0.1:50051") as k:
        echo = k.spawn(lua="local m = sys.recv{} ; sys.send(m.from, m.body)")
        port = k.open_port()
        k.send(echo, {"hello": "world"}, sender=port)
        print(k.recv(port, timeout=5).body)

:class:`Client` is blocking; :mod:`llmos.aio` has the same API for asyncio.
Failed syscalls raise :class:`LlmosError` subclasses named after the gRPC status.
This package needs only grpcio and protobuf (``pip install ./sdk``); the server is ``llmosd``.
"""
__version__ = "0.1.0"

from .client import (Client, ContextInfo, DeadLetter, Event, InferChunk, InferResult, Message, Outgoing,
                     ProcessInfo, ProcessKind, ProcessState, Retry, connect, default_target)
from .errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition, Internal,
                     InvalidArgument, LlmosError, NotFound, OutOfRange, PermissionDenied, ResourceExhausted,
                     Unauthenticated, Unavailable, Unimplemented, Unknown)

__all__ = [
    "Client", "connect", "default_target", "Message", "ProcessInfo", "ProcessState", "ProcessKind", "Event", "InferChunk", "InferResult",
    "ContextInfo", "Outgoing", "DeadLetter", "Retry",
    "LlmosError", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
    "Internal", "Unavailable", "DataLoss", "Unauthenticated",
]

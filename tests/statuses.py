"""What a refused call answers, for tests: its gRPC status code (and details), from a raw stub
(grpc.RpcError) or from the SDK (llmos.LlmosError). The test fails if the call succeeds."""
from __future__ import annotations

from typing import Any, Callable

import grpc
import pytest

import llmos


def status_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    """(status code, details) `call(*args, **kwargs)` fails with; a server stream is read to its end
    (it fails when read)."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    except llmos.LlmosError as e:
        return e.code, e.message
    pytest.fail(f"{getattr(call, '__name__', call)} succeeded: expected it to be refused")


def code_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status code `call(*args, **kwargs)` fails with (see status_of)."""
    return status_of(call, *args, **kwargs)[0]

"""Every door's half of a call (the TCP/Unix listener, the agent socket, the HTTP gateway and the
OpenAI API): decoding the request, deciding the caller (identity.py), answering a failure with
its status, and counting and auditing the call. The handlers themselves are syscalls.py's;
`kernel_service` makes the gRPC service of them. Kernel errors become statuses here and nowhere
else.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from .audit import target_of
from .authority import Caller
from .errors import InvalidArgument, KernelError
from .identity import CALLER, Identity
from .replies import THREAD_BYTES, off_loop
from .syscalls import CALL, SERVICE, SYSCALLS
from .table import AUDITED_RPCS, BY_RPC
from ..kernel.durations import Durations
from ..kernel.kernel import Kernel
from ..kernel.process import PYTHON

log = logging.getLogger(__name__)

MAX_STATUS_BYTES = 2048  # an error's whole text, in UTF-8: any status must fit in gRPC's trailers


def status_text(text: str) -> str:
    """`text`, cut so that it and the note saying so fit in MAX_STATUS_BYTES of UTF-8."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_STATUS_BYTES:
        return text
    note = f" ... [{len(raw)} bytes, cut]"
    return raw[: MAX_STATUS_BYTES - len(note)].decode("utf-8", "ignore") + note


class CallStats:
    """For /metrics (api/metrics.py): calls through the table on every door (gRPC, agents, HTTP) by
    method and status (llmos_syscalls_total), and the time to answer the unary ones by method
    (llmos_syscall_seconds; a stream lasts as long as its client). Plain counts under one lock,
    made into metric families when scraped: prometheus_client's Counter and Histogram took a lock
    per value they change, five per call. Labels are bounded: methods by statuses."""

    BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], list] = {}  # (method, code) -> [count, first counted (time.time)]
        self._seconds: dict[str, Durations] = {}  # method -> its unary calls' times

    def count(self, method: str, code: str, seconds: float | None = None) -> None:
        with self._lock:
            calls = self._calls.get((method, code))
            if calls is None:
                calls = self._calls[method, code] = [0, time.time()]
            calls[0] += 1
            if seconds is not None:
                timed = self._seconds.get(method)
                if timed is None:
                    timed = self._seconds[method] = Durations(self.BUCKETS_S)
                timed.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            calls = {labels: tuple(counts) for labels, counts in self._calls.items()}
            seconds = HistogramMetricFamily("llmos_syscall_seconds", "Time to answer a unary syscall",
                                            labels=["method"])
            for method, timed in sorted(self._seconds.items()):
                timed.add_to(seconds, {"method": method})
        answered = CounterMetricFamily("llmos_syscalls", "Syscalls answered, by method and status",
                                       labels=["method", "code"])
        for labels, (n, created) in sorted(calls.items()):
            answered.add_metric(labels, n, created=created)
        yield answered
        yield seconds


CALL_STATS = CallStats()


def count_call(method: str, code: str, began: float | None = None) -> None:
    """Count an answered call; `began` (perf_counter) also times it."""
    CALL_STATS.count(method, code, time.perf_counter() - began if began is not None else None)


def finish_call(identity: Identity, method: str, req: Any, code: str, began: float | None = None) -> None:
    """Every door's last step for a call: counted (and timed) for /metrics, and, if it is one
    that changes something, recorded in the audit log with its caller and outcome."""
    _finished(identity, method, req, code, CALLER.get(), time.perf_counter() - began if began is not None else None)


def _finished(identity: Identity, method: str, req: Any, code: str, caller: Caller, seconds: float | None) -> None:
    CALL_STATS.count(method, code, seconds)
    if method in AUDITED_RPCS:
        identity.k.audit.record(caller, method, target_of(req), code)


def status_of(method: str, err: Exception) -> tuple[str, str]:
    """A failed call's status name and (cut) text, on every door (gRPC, HTTP): a kernel error's
    own; anything else is a kernel bug, logged, and INTERNAL."""
    if isinstance(err, KernelError):
        code, text = err.code, str(err)
    else:
        log.exception("%s failed", method, exc_info=err)
        code, text = "INTERNAL", f"kernel error in {method} (logged by the server): {err!r}"
    return code, status_text(text)


def _decode(request: type[ProtoMessage], raw: bytes) -> ProtoMessage:
    """A request from its wire bytes. gRPC would answer UNKNOWN (and log a traceback) for bytes
    that do not decode, so the handlers decode: malformed protobuf, invalid UTF-8 in a string
    field, nesting past the parser's depth limit are INVALID_ARGUMENT."""
    try:
        return request.FromString(raw)
    except DecodeError as e:
        raise InvalidArgument(f"the request does not decode as {request.DESCRIPTOR.full_name}: {e}") from None


async def _decode_stream(request: type[ProtoMessage], raws: AsyncIterator[bytes]) -> AsyncIterator[ProtoMessage]:
    async for raw in raws:
        yield _decode(request, raw)


def call_syscall(method: str, fn: Callable[..., Awaitable[Any]], k: Kernel, req: Any, size: int) -> Awaitable[Any]:
    """`fn(k, req)`, the handler of `method` for a request of `size` bytes. A big one (replies.THREAD_BYTES
    or more) to a syscall that does not block runs in a thread, on an event loop of its own: its
    values' conversion would hold the server's loop (see THREAD_BYTES). (Not a coroutine itself: the
    caller awaits the handler's, one coroutine fewer on every call.)"""
    if size >= THREAD_BYTES and not BY_RPC[method].blocks:
        return off_loop(asyncio.run, fn(k, req))
    return fn(k, req)


def _unary(identity: Identity, method: str, request: type[ProtoMessage], fn: Callable[..., Awaitable[Any]],
           streamed: bool) -> Callable:
    """A unary call's handler, or a client-streaming one's (`streamed`: its requests come as a stream)."""
    async def handle(raw: Any, ctx: grpc.aio.ServicerContext) -> Any:
        CALL.set(ctx)
        began = time.perf_counter()
        try:
            req = _decode_stream(request, raw) if streamed else _decode(request, raw)
            checked = identity.check(method, req, ctx)
        except Exception as e:
            code, text = status_of(method, e)
            count_call(method, code, began)  # not audited: no caller to name
            await ctx.abort(getattr(grpc.StatusCode, code), text)
        code = "CANCELLED"
        try:
            reply = await call_syscall(method, fn, identity.k, checked, 0 if streamed else len(raw))
            code = "OK"
            return reply
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            code, text = status_of(method, e)
            await ctx.abort(getattr(grpc.StatusCode, code), text)
        finally:
            # Counted and audited once the reply is on its way: the loop runs this before any call
            # that comes after it (its callbacks run in order), but the client does not wait for it.
            asyncio.get_running_loop().call_soon(_finished, identity, method, req, code, CALLER.get(),
                                                 time.perf_counter() - began)

    return handle


def _stream(identity: Identity, method: str, request: type[ProtoMessage], fn: Callable[..., AsyncIterator[Any]]) -> Callable:
    async def handle(raw: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            req = identity.check(method, _decode(request, raw), ctx)
        except Exception as e:
            code, text = status_of(method, e)
            count_call(method, code)  # not audited: no caller to name
            await ctx.abort(getattr(grpc.StatusCode, code), text)
        code = "CANCELLED"
        try:
            async for item in fn(identity.k, req):
                yield item
            code = "OK"
        except (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError):
            raise
        except Exception as e:
            code, text = status_of(method, e)
            await ctx.abort(getattr(grpc.StatusCode, code), text)
        finally:
            finish_call(identity, method, req, code)

    return handle


def kernel_service(k: Kernel, agents: bool = False, single_user: bool = True,
                   client_certificates: bool = False) -> grpc.GenericRpcHandler:
    """The llmos.v1.Kernel service as a gRPC handler, built from SYSCALLS.
    With `agents`, calls must carry an agent's token and act only as it; else a
    client's token (or none, in `single_user` mode), or a certificate the listener
    verified (`client_certificates`), says who calls (Identity)."""
    identity = Identity(k, agents, single_user, client_certificates)
    declared = {m.name for m in SERVICE.methods}
    if not declared == set(SYSCALLS) == set(BY_RPC):
        raise RuntimeError(f"syscall table, handlers and .proto disagree: {sorted(declared ^ set(SYSCALLS) | declared ^ set(BY_RPC))}")
    handlers = {}
    python = k.runtimes.get(PYTHON) if agents else None
    for method in SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kwargs = dict(response_serializer=response.SerializeToString)  # requests: see _decode
        fn = SYSCALLS[method.name]
        if python is not None:  # a durable agent's calls go through its journal (python/durable.py)
            fn = python.agent_handler(method, fn)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_stream(identity, method.name, request, fn), **kwargs)
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(_unary(identity, method.name, request, fn, True), **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(identity, method.name, request, fn, False), **kwargs)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

"""The asyncio llmos client: the same methods as :class:`llmos.Client`, awaited.

    from llmos import aio
    async with aio.Client("127.0.0.1:50051") as k:
        info = await k.run("return 1 + 1")
        async for chunk in k.infer("Once upon a time", stream=True):
            print(chunk.text, end="")

Every method returns an awaitable of what the blocking client returns, except
``events()`` and ``infer(..., stream=True)``, which return async iterators.
Arguments are checked when the method is called, before anything is awaited.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, TypeVar

import grpc

from .client import (CHANNEL_OPTIONS, RETRYABLE, Call, ClientStreaming, Plan, Retry, Streaming, Syscalls,
                     channel_credentials, first_call)
from .errors import Unavailable, from_rpc_error
from .v1 import kernel_pb2_grpc

T = TypeVar("T")


async def _stream_items(responses: Any, convert: Callable[[Any], T]) -> AsyncIterator[T]:
    try:
        async for item in responses:
            yield convert(item)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        responses.cancel()


class Client(Syscalls):
    """An asyncio llmos client over one grpc.aio channel; ``async with`` it, or await :meth:`close`.

    ``target`` is "HOST:PORT" or "unix:/path/to/socket" (default: $LLMOS_SERVER or 127.0.0.1:50051).
    """

    def __init__(self, target: str | None = None, *, rpc_timeout: float | None = 30.0,
                 token: str | None = None, tls: grpc.ChannelCredentials | None = None,
                 send_retry: Retry | None = Retry()) -> None:
        super().__init__(target, rpc_timeout, token, send_retry)
        tls = tls or channel_credentials()
        self._channel = (grpc.aio.secure_channel(self.target, tls, options=CHANNEL_OPTIONS) if tls
                         else grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS))
        self._stub = kernel_pb2_grpc.KernelStub(self._channel)

    async def _perform(self, call: Call) -> Any:
        rpc = getattr(self._stub, call.method)
        if isinstance(call, Streaming):  # only collected streams come here (see _drive)
            stream = rpc(call.request, timeout=call.timeout, metadata=self.metadata)
            return [item async for item in _stream_items(stream, call.convert)]
        if isinstance(call, ClientStreaming):
            # grpc.aio reads the (synchronous) request iterator on the event loop; if producing a request
            # raises, it cancels the call, which surfaces here as CancelledError or an RpcError.
            try:
                return await rpc(call.requests, timeout=call.timeout, metadata=self.metadata)
            except (grpc.RpcError, asyncio.CancelledError) as e:
                if call.requests.error is not None:
                    raise call.requests.error from None
                if isinstance(e, asyncio.CancelledError):
                    raise
                raise from_rpc_error(e) from None
        delays = call.retry.delays() if call.retry is not None else iter(())
        while True:
            try:
                return await rpc(call.request, timeout=call.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                delay = next(delays, None) if e.code() in RETRYABLE else None
                if delay is None:
                    raise from_rpc_error(e) from None
            await asyncio.sleep(delay)

    def _drive(self, plan: Plan[T]) -> Any:
        call = first_call(plan)
        if isinstance(call, Streaming) and not call.collect:
            # a plan that yields an open stream returns it: hand the async iterator to the caller directly
            try:
                rpc = getattr(self._stub, call.method)
                plan.send(_stream_items(rpc(call.request, timeout=call.timeout, metadata=self.metadata),
                                        call.convert))
            except StopIteration as done:
                return done.value
            raise RuntimeError(f"plan for {call.method} did not return its stream")
        return self._finish(plan, call)

    async def _finish(self, plan: Plan[T], call: Call) -> T:
        while True:
            reply = await self._perform(call)
            try:
                call = plan.send(reply)
            except StopIteration as done:
                return done.value

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel is connected; Unavailable after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                              f"no llmos server answered at {self.target} within {timeout} s") from None

    async def close(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def connect(target: str | None = None, *, rpc_timeout: float | None = 30.0,
            send_retry: Retry | None = Retry()) -> Client:
    """An asyncio :class:`Client` for ``target``."""
    return Client(target, rpc_timeout=rpc_timeout, send_retry=send_retry)

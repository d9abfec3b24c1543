"""server: a request/reply loop with correlation ids and timeouts, like Erlang's gen_server
(docs/userland-library.md; the Lua twin is server.lua, `require "server"`)::

    from llmos.std import server

    # the server: handlers get the request, the message and the state
    server.serve(call=lambda req, msg, n: (n + req, n + req),   # (reply, new state)
                 cast=lambda req, n: n + req,                   # new state
                 state=0, name="counter")
    # a client
    total = server.call("counter", 5, timeout_ms=1000)  # the reply, or CallTimeout
    server.cast("counter", 1)                           # True, or False: never waits

On the wire (the same as Lua's, so either side may be Lua or Python): a call is a message
tagged "call" with a fresh correlation id; the reply is tagged "reply" (or "error" if the
handler failed) with the same id, sent to the caller. A cast is tagged "cast". Other
messages go to `info`.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

from llmos.client import Message
from llmos.errors import LlmosError
from llmos.userland import sys

DEFAULT_TIMEOUT_MS = 5000


class CallTimeout(TimeoutError):
    """No reply came within the call's timeout."""


class CallFailed(RuntimeError):
    """The server's handler failed (the server ended with that error)."""


class _NoReply:
    def __repr__(self) -> str:
        return "server.NOREPLY"


NOREPLY = _NoReply()  # a call handler's reply for "later, with server.reply"


class stop:  # noqa: N801 (a marker used like Lua's server.stop(value))
    """A handler's new state that ends serve, which returns `value`."""

    def __init__(self, value: Any = None) -> None:
        self.value = value


_calls = itertools.count(1)
_stale: list[str] = []


def call(to: int | str, request: Any = None, timeout_ms: float = DEFAULT_TIMEOUT_MS) -> Any:
    """Send `request` to `to` (pid or registered name) and wait for the reply."""
    # A reply that came after its call timed out is dropped at the next call (once).
    while _stale:
        sys.recv(correlation_id=_stale.pop(), timeout_ms=0)
    cid = f"call:{sys.self()}:{next(_calls)}"
    sys.send(to, request, tag="call", correlation_id=cid)
    msg = sys.recv(correlation_id=cid, timeout_ms=timeout_ms)
    if msg is None:
        _stale.append(cid)
        raise CallTimeout(f"server.call: no reply from {to} in {timeout_ms} ms (timeout)")
    if msg.tag == "error":
        raise CallFailed(f"server.call: the server failed: {msg.body}")
    return msg.body


def cast(to: int | str, request: Any = None) -> bool:
    """Send `request` to `to` without waiting: whether it could be sent."""
    try:
        sys.send(to, request, tag="cast")
        return True
    except LlmosError:
        return False


def reply(msg: Message, value: Any) -> bool:
    """Answer the call `msg` (for a handler that returned NOREPLY): whether it could be sent
    (a caller that has ended is not the server's problem)."""
    try:
        sys.send(msg.sender, value, tag="reply", correlation_id=msg.correlation_id)
        return True
    except LlmosError:
        return False


def serve(call: Callable[[Any, Message, Any], tuple[Any, Any]] | None = None,
          cast: Callable[[Any, Any], Any] | None = None, info: Callable[[Message, Any], Any] | None = None,
          init: Callable[[Any], Any] | None = None, state: Any = None, name: str | None = None,
          timeout_ms: float | None = None, timeout: Callable[[Any], Any] | None = None) -> Any:
    """Serve requests until a handler returns stop(value) as the new state; returns value.
    call(request, msg, state) -> (reply, state); cast(request, state) -> state; info(msg, state)
    -> state for any other message (without it they are dropped); init(state) -> state; name:
    register it; timeout(state) -> state when no message came for timeout_ms (without it,
    serve returns the state then). A call handler that raises answers the caller "error" and
    the exception ends the server."""
    if name is not None:
        sys.register(name)
    if init is not None:
        state = init(state)
    while True:
        msg = sys.recv(timeout_ms=timeout_ms)
        if msg is None:
            if timeout is None:
                return state
            new = timeout(state)
        elif msg.tag == "call" and call is not None:
            try:
                answer, new = call(msg.body, msg, state)
            except Exception as e:
                try:
                    sys.send(msg.sender, f"{type(e).__name__}: {e}", tag="error", correlation_id=msg.correlation_id)
                except LlmosError:
                    pass
                raise
            if answer is not NOREPLY:
                reply(msg, answer)
        elif msg.tag == "cast" and cast is not None:
            new = cast(msg.body, state)
        elif info is not None:
            new = info(msg, state)
        else:
            new = state
        if isinstance(new, stop):
            return new.value
        state = new

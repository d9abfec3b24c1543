"""The Python userland: the syscalls of a Python agent, as Lua programs have them.

A Python program spawned by llmosd runs in a sandboxed subprocess and writes::

    from llmos.userland import sys      # the same calls as Lua's `sys` table

    job = sys.recv(tag="job", timeout_ms=5000)
    sys.send(job.sender, job.body * 2, tag="result", correlation_id=job.correlation_id)
    sys.exit({"done": True})            # the process's result (default: None)

`sys.args` is the argument value given at spawn, `sys.self()` the pid. print()
and sys.log() write the process log (`llmos logs PID`). An uncaught exception
crashes the process with its message as the error. Calls reach the kernel
over gRPC on its agent socket, with this process's token: an agent acts only
as itself (it cannot receive from another mailbox or send as another pid).
Errors are llmos.LlmosError subclasses, as in the client SDK.

Outside an agent (no LLMOS_TOKEN in the environment), `from llmos.userland
import sys` fails with a clear error.
"""
from __future__ import annotations

import builtins
import json
import os
import secrets
import sys as _sys
import time
from typing import Any, Callable

import grpc

from .client import Client, FileInfo, Message, ProcessInfo
from .errors import FailedPrecondition
from .v1 import kernel_pb2_grpc

JSON = Any
TOKEN_HEADER = "llmos-token"  # the metadata the kernel's agent socket checks


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
             grpc.StreamUnaryClientInterceptor):
    """Adds this agent's token to every call."""

    def __init__(self, token: str) -> None:
        self.metadata = ((TOKEN_HEADER, token),)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AgentClient(Client):
    def __init__(self, socket: str, token: str) -> None:
        super().__init__(f"unix:{socket}", rpc_timeout=None)
        self._channel = grpc.intercept_channel(self._channel, _Token(token))
        self._stub = kernel_pb2_grpc.KernelStub(self._channel)


def _ms(timeout_ms: float | None) -> float | None:
    return None if timeout_ms is None else timeout_ms / 1000


class Files:
    """sys.fs: the namespace's file tree."""

    def __init__(self, kernel: _AgentClient) -> None:
        self._k = kernel

    def write(self, path: str, data: bytes | str, append: bool = False) -> FileInfo:
        return self._k.write_file(path, data, append=append)

    def read(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        return self._k.read_file(path, offset=offset, length=length)

    def stat(self, path: str) -> FileInfo:
        return self._k.stat(path)

    def list(self, path: str = "") -> list[FileInfo]:
        return self._k.list_files(path)

    def delete(self, path: str) -> None:
        self._k.delete_file(path)

    def rename(self, src: str, dst: str) -> FileInfo:
        return self._k.rename_file(src, dst)


class Locks:
    """sys.lock: named mutexes and counting semaphores, held by this process."""

    def __init__(self, kernel: _AgentClient, pid: int) -> None:
        self._k = kernel
        self._pid = pid

    def acquire(self, name: str, timeout_ms: float | None = None, semaphore: int = 0) -> dict | None:
        return self._k.acquire(self._pid, name, semaphore=semaphore, timeout=_ms(timeout_ms))

    def try_acquire(self, name: str, semaphore: int = 0) -> dict | None:
        return self._k.acquire(self._pid, name, semaphore=semaphore, timeout=0)

    def release(self, name: str) -> None:
        self._k.release(self._pid, name)


class Sys:
    """The syscalls of this agent (see the module docstring)."""

    def __init__(self, pid: int, token: str, socket: str, args: JSON) -> None:
        self.pid = pid
        self.args = args
        self._k = _AgentClient(socket, token)
        self.fs = Files(self._k)
        self.lock = Locks(self._k, pid)

    def self(self) -> int:
        return self.pid

    def spawn(self, lua: str | None = None, python: str | None = None, path: str | None = None, args: JSON = None,
              name: str | None = None, priority: int = 0, limits: dict | None = None,
              monitor: bool = False) -> int:
        return self._k.spawn(lua=lua, python=python, path=path, args=args, name=name, priority=priority,
                             limits=limits, monitor=monitor)

    def send(self, to: int | str, body: JSON = None, tag: str = "", data: bytes = b"",
             correlation_id: str = "") -> int:
        return self._k.send(to, body, sender=self.pid, tag=tag, data=data, correlation_id=correlation_id)

    def recv(self, sender: int | None = None, tag: str | None = None, correlation_id: str | None = None,
             timeout_ms: float | None = None) -> Message | None:
        return self._k.recv(self.pid, sender=sender, tag=tag, correlation_id=correlation_id, timeout=_ms(timeout_ms))

    def wait(self, pid: int, timeout_ms: float | None = None) -> ProcessInfo | None:
        return self._k.wait(pid, timeout=_ms(timeout_ms))

    def kill(self, pid: int, reason: str = "killed") -> bool:
        return self._k.kill(pid, reason)

    def register(self, name: str) -> None:
        self._k.register(self.pid, name)

    def whereis(self, name: str) -> int | None:
        found = self._k.ps(name=name)
        return found[0].pid if found else None

    def monitor(self, pid: int) -> None:
        self._k.monitor(self.pid, pid)

    def info(self, pid: int | None = None) -> ProcessInfo:
        return self._k.get(pid or self.pid)

    def set_priority(self, pid: int | None, priority: int, weight: int = 0) -> None:
        self._k.set_priority(pid or self.pid, priority, weight)

    def sleep(self, ms: float) -> None:
        """Sleep in the kernel, so that this process gives up its CPU while it waits."""
        if not ms >= 0:
            raise ValueError("sleep: ms must be a non-negative number")
        self._k.recv(self.pid, correlation_id=f"sleep-{secrets.token_hex(16)}", timeout=ms / 1000)

    def now(self) -> float:
        return time.time() * 1000.0

    def log(self, *values: Any) -> None:
        builtins.print(*values, flush=True)

    def infer(self, prompt: str | None = None, messages: list[dict] | None = None, **sampling: Any) -> dict:
        """Generate with the shared model; returns {text, finish_reason, usage} as in Lua."""
        result = self._k.infer(prompt=prompt, messages=messages, pid=self.pid, **sampling)
        return {"text": result.text, "finish_reason": result.finish_reason, "usage": result.usage}

    def exit(self, value: JSON = None) -> None:
        """End now with `value` as the result."""
        self._k.exit(self.pid, value)
        _sys.stdout.flush()
        _sys.stderr.flush()
        os._exit(0)


def _connect() -> Sys:
    env = os.environ
    missing = [k for k in ("LLMOS_PID", "LLMOS_TOKEN", "LLMOS_SOCKET") if k not in env]
    if missing:
        raise FailedPrecondition(grpc.StatusCode.FAILED_PRECONDITION,
                                 "llmos.userland works inside a Python process spawned by llmosd "
                                 f"({', '.join(missing)} not set); outside, use llmos.Client")
    return Sys(int(env["LLMOS_PID"]), env["LLMOS_TOKEN"], env["LLMOS_SOCKET"], json.loads(env.get("LLMOS_ARGS", "null")))


def __getattr__(name: str) -> Any:
    # `sys` is made on first use, in the agent: the fork server imports this
    # module before any agent exists (and must not open a channel).
    if name == "sys":
        value = globals()["sys"] = _connect()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

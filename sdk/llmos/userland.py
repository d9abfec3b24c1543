"""The Python userland: the syscalls of a Python agent, as Lua programs have them.

A Python program spawned by llmosd runs in a sandboxed subprocess and writes::

    from llmos.userland import sys      # the same calls as Lua's `sys` table

    job = sys.recv(tag="job", timeout_ms=5000)
    sys.send(job.sender, job.body * 2, tag="result", correlation_id=job.correlation_id)
    sys.exit({"done": True})            # the process's result (default: None)

`sys.infer(...)` generates with the shared model (json_schema, regex, grammar, tools,
tool_choice and context as in Lua); `sys.context.create(messages, tools=None)`,
`sys.context.fork(h)` and `sys.context.drop(h)` manage conversation contexts.
`sys.args` is the argument value given at spawn, `sys.self()` the pid. print()
and sys.log() write the process log (`llmos logs PID`). An uncaught exception
crashes the process with its message as the error. Calls reach the kernel
over gRPC on its agent socket, with this process's token: an agent acts only
as itself (it cannot receive from another mailbox or send as another pid).
Errors are llmos.LlmosError subclasses, as in the client SDK: a bad argument
(an unknown keyword, a value of the wrong type or out of range) is
llmos.InvalidArgument naming it, raised here before anything is sent where
this module can tell, else by the kernel; a pid that cannot exist is
llmos.NotFound. Durations are in ms: NaN and negative ones are refused, and
anything above MAX_DURATION_MS (10 years, +inf included) means that long,
i.e. for ever.

Outside an agent (no LLMOS_TOKEN in the environment), `from llmos.userland
import sys` fails with a clear error.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import json
import math
import numbers
import operator
import os
import secrets
import sys as _sys
import time
from typing import Any, Callable, TypeVar

import grpc

from .client import Client, FileInfo, Message, ProcessInfo
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .v1 import kernel_pb2 as pb
from .v1 import kernel_pb2_grpc
from .values import MAX_DURATION_MS, MAX_EXACT_INTEGER

JSON = Any
TOKEN_HEADER = "llmos-token"  # the metadata the kernel's agent socket checks
MAX_PID = MAX_EXACT_INTEGER  # pids above cannot exist (they would not survive a JSON number)
_INT32 = (-2**31, 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_LIMITS = {f.name: _UINT32 if f.type == f.TYPE_UINT32 else (0, 2**64 - 1) for f in pb.Limits.DESCRIPTOR.fields}
_DURATION_LIMITS = ("cpu_ms", "wall_ms")
_OWNERS = {"Sys": "sys", "Files": "sys.fs", "Locks": "sys.lock", "Conds": "sys.cond",
           "Contexts": "sys.context"}
F = TypeVar("F", bound=Callable[..., Any])


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


# -- argument checks: each bad value is InvalidArgument (or NotFound for a pid that cannot exist) ------
def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, message)


def _syscall(fn: F) -> F:
    """Make `fn` a syscall whose arguments are checked against its signature first:
    an unknown keyword, a missing argument or one too many is InvalidArgument naming it."""
    name = f"{_OWNERS[fn.__qualname__.split('.')[0]]}.{fn.__name__}"
    signature = inspect.signature(fn)
    accepted = ", ".join(p for p in signature.parameters if p != "self") or "no arguments"

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as e:
            unknown = [k for k in kwargs if k == "self" or k not in signature.parameters]
            if unknown:
                raise _invalid(f"{name}: unknown option {', '.join(map(_show, unknown))}; "
                               f"it takes {accepted}") from None
            raise _invalid(f"{name}: {e}; it takes {accepted}") from None
        return fn(self, *args, **kwargs)

    return call  # type: ignore[return-value]


def _show(value: Any) -> str:
    """repr(value), cut short (an int too long for Python to print is shown by its size)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(value: Any, what: str) -> int:
    """An int, or anything that is one (a numpy integer), but not a bool."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise _invalid(f"{what} must be an int, not {type(value).__name__}")


def _duration_ms(ms: Any, what: str) -> float:
    """A duration in ms: NaN and negative are refused, more than MAX_DURATION_MS (+inf too) is that."""
    if isinstance(ms, bool) or not isinstance(ms, numbers.Real):
        raise _invalid(f"{what} must be a number of milliseconds, not {type(ms).__name__}")
    ms = operator.index(ms) if isinstance(ms, numbers.Integral) else float(ms)
    if not ms >= 0:  # NaN too
        raise _invalid(f"{what} must be a non-negative number of milliseconds, not {_show(ms)}")
    return min(ms, MAX_DURATION_MS)


def _timeout_s(ms: Any, what: str) -> float | None:
    """A timeout in ms as the client's seconds; None waits without limit."""
    return None if ms is None else _duration_ms(ms, what) / 1000


def _pid(value: Any, what: str) -> int:
    value = _integer(value, what)
    if value == 0:
        raise _invalid(f"{what} is required (0 is no process)")
    if not 0 < value <= MAX_PID:
        raise NotFound(grpc.StatusCode.NOT_FOUND, f"no process with pid {_show(value)}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{what} is not valid UTF-8 text (it holds a lone surrogate)") from None
    return value


def _message_id(msg: Any, what: str) -> int:
    """sys.ack/sys.nack's argument: a Message (its id) or a message id."""
    return _int(msg.id if isinstance(msg, Message) else msg, f"{what}: message id", (1, MAX_EXACT_INTEGER))


def _optional_text(value: Any, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _int(value: Any, what: str, bounds: tuple[int, int]) -> int:
    value = _integer(value, what)
    if not bounds[0] <= value <= bounds[1]:
        raise _invalid(f"{what} {_show(value)} is out of range")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"{what} must be True or False, not {type(value).__name__}")
    return value


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _invalid(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _limits(limits: Any, what: str) -> dict[str, int] | None:
    if limits is None:
        return None
    if not isinstance(limits, dict) or not set(_LIMITS).issuperset(limits):
        unknown = [k for k in limits if k not in _LIMITS] if isinstance(limits, dict) else []
        raise _invalid(f"{what} must be a dict of {', '.join(_LIMITS)}"
                       + (f"; unknown: {', '.join(map(_show, unknown))}" if unknown else ""))
    return {
        # A fraction of a ms still limits (0 would mean "the server's default").
        k: math.ceil(_duration_ms(v, f"{what}.{k}")) if k in _DURATION_LIMITS else _int(v, f"{what}.{k}", _LIMITS[k])
        for k, v in limits.items()
    }


class Files:
    """sys.fs: the namespace's file tree."""

    def __init__(self, kernel: _AgentClient) -> None:
        self._k = kernel

    @_syscall
    def write(self, path: str, data: bytes | str, append: bool = False) -> FileInfo:
        return self._k.write_file(_text(path, "sys.fs.write: path"), data, append=_flag(append, "sys.fs.write: append"))

    @_syscall
    def read(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        return self._k.read_file(_text(path, "sys.fs.read: path"), offset=offset, length=length)

    @_syscall
    def stat(self, path: str) -> FileInfo:
        return self._k.stat(_text(path, "sys.fs.stat: path"))

    @_syscall
    def list(self, path: str = "") -> list[FileInfo]:
        return self._k.list_files(_text(path, "sys.fs.list: path"))

    @_syscall
    def delete(self, path: str) -> None:
        self._k.delete_file(_text(path, "sys.fs.delete: path"))

    @_syscall
    def rename(self, src: str, dst: str) -> FileInfo:
        return self._k.rename_file(_text(src, "sys.fs.rename: src"), _text(dst, "sys.fs.rename: dst"))


class Locks:
    """sys.lock: named mutexes and counting semaphores, held by this process."""

    def __init__(self, kernel: _AgentClient, pid: int) -> None:
        self._k = kernel
        self._pid = pid

    @_syscall
    def acquire(self, name: str, timeout_ms: float | None = None, semaphore: int = 0) -> dict | None:
        return self._k.acquire(self._pid, _text(name, "sys.lock.acquire: name"), semaphore=semaphore,
                               timeout=_timeout_s(timeout_ms, "sys.lock.acquire: timeout_ms"))

    @_syscall
    def try_acquire(self, name: str, semaphore: int = 0) -> dict | None:
        return self._k.acquire(self._pid, _text(name, "sys.lock.try_acquire: name"), semaphore=semaphore, timeout=0)

    @_syscall
    def release(self, name: str) -> None:
        self._k.release(self._pid, _text(name, "sys.lock.release: name"))


class Conds:
    """sys.cond: condition variables, waited on with a mutex this process holds (see docs/services.md)."""

    def __init__(self, kernel: _AgentClient, pid: int) -> None:
        self._k = kernel
        self._pid = pid

    @_syscall
    def wait(self, name: str, lock: str, timeout_ms: float | None = None) -> dict:
        return self._k.cond_wait(self._pid, _text(name, "sys.cond.wait: name"), _text(lock, "sys.cond.wait: lock"),
                                 timeout=_timeout_s(timeout_ms, "sys.cond.wait: timeout_ms"))

    @_syscall
    def signal(self, name: str) -> int:
        return self._k.cond_signal(_text(name, "sys.cond.signal: name"), pid=self._pid)

    @_syscall
    def broadcast(self, name: str) -> int:
        return self._k.cond_broadcast(_text(name, "sys.cond.broadcast: name"), pid=self._pid)


class Contexts:
    """sys.context: conversation contexts of this process, whose KV cache the kernel keeps."""

    def __init__(self, kernel: _AgentClient, pid: int) -> None:
        self._k = kernel
        self._pid = pid

    @_syscall
    def create(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        """A context holding the chat (and the tools every request on it may call); its handle."""
        return self._k.create_context(self._pid, _chat(messages, "sys.context.create"),
                                      tools=_tool_list(tools, "sys.context.create")).context_id

    @_syscall
    def fork(self, context: int) -> int:
        """A copy of the context sharing its KV cache; its handle."""
        return self._k.fork_context(self._pid, _handle(context, "sys.context.fork")).context_id

    @_syscall
    def drop(self, context: int) -> None:
        self._k.drop_context(self._pid, _handle(context, "sys.context.drop"))


def _chat(messages: Any, what: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise _invalid(f"{what}: messages must be a list of {{role, content}} dicts, not {type(messages).__name__}")
    return list(messages)


def _tool_list(tools: Any, what: str) -> list[dict] | None:
    if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools)):
        raise _invalid(f"{what}: tools must be a list of dicts (name, description, parameters)")
    return None if tools is None else list(tools)


def _handle(value: Any, what: str) -> int:
    value = _integer(value, what)
    if not 0 < value <= MAX_EXACT_INTEGER:
        raise _invalid(f"{what}: a context handle is a positive integer, not {_show(value)}")
    return value


class Sys:
    """The syscalls of this agent (see the module docstring)."""

    def __init__(self, pid: int, token: str, socket: str, args: JSON) -> None:
        self.pid = pid
        self.args = args
        self._k = _AgentClient(socket, token)
        self.fs = Files(self._k)
        self.lock = Locks(self._k, pid)
        self.cond = Conds(self._k, pid)
        self.context = Contexts(self._k, pid)

    @_syscall
    def self(self) -> int:
        return self.pid

    @_syscall
    def spawn(self, lua: str | None = None, python: str | None = None, path: str | None = None, args: JSON = None,
              name: str | None = None, priority: int = 0, limits: dict | None = None,
              monitor: bool = False, weight: int = 0, dead_letter: int | None = None, max_attempts: int = 0,
              durable: bool = False) -> int:
        return self._k.spawn(
            lua=_optional_text(lua, "sys.spawn: lua"), python=_optional_text(python, "sys.spawn: python"),
            path=_optional_text(path, "sys.spawn: path"), args=args, name=_optional_text(name, "sys.spawn: name"),
            priority=_int(priority, "sys.spawn: priority", _INT32), limits=_limits(limits, "sys.spawn: limits"),
            monitor=_flag(monitor, "sys.spawn: monitor"), weight=_int(weight, "sys.spawn: weight", _UINT32),
            dead_letter=0 if dead_letter is None else _pid(dead_letter, "sys.spawn: dead_letter"),
            max_attempts=_int(max_attempts, "sys.spawn: max_attempts", _UINT32),
            durable=_flag(durable, "sys.spawn: durable"))

    @_syscall
    def send(self, to: int | str, body: JSON = None, tag: str = "", data: bytes = b"",
             correlation_id: str = "", notify_undelivered: bool = False, idempotency_key: str | None = None) -> int:
        target = _text(to, "sys.send: to") if isinstance(to, str) else _pid(to, "sys.send: to")
        return self._k.send(target, body, sender=self.pid, tag=_text(tag, "sys.send: tag"),
                            data=_bytes(data, "sys.send: data"),
                            correlation_id=_text(correlation_id, "sys.send: correlation_id"),
                            notify_undelivered=_flag(notify_undelivered, "sys.send: notify_undelivered"),
                            idempotency_key=_optional_text(idempotency_key, "sys.send: idempotency_key"))

    @_syscall
    def recv(self, sender: int | None = None, tag: str | None = None, correlation_id: str | None = None,
             timeout_ms: float | None = None, ack: bool = False, lease_ms: float | None = None) -> Message | None:
        ack = _flag(ack, "sys.recv: ack")
        if lease_ms is not None and not ack:
            raise _invalid("sys.recv: lease_ms is for a receive with ack=True")
        return self._k.recv(
            self.pid, sender=None if sender is None else _pid(sender, "sys.recv: sender"),
            tag=_optional_text(tag, "sys.recv: tag"),
            correlation_id=_optional_text(correlation_id, "sys.recv: correlation_id"),
            timeout=_timeout_s(timeout_ms, "sys.recv: timeout_ms"), ack=ack,
            lease=_timeout_s(lease_ms, "sys.recv: lease_ms"))

    @_syscall
    def ack(self, msg: Message | int) -> None:
        self._k.ack(self.pid, _message_id(msg, "sys.ack"))

    @_syscall
    def nack(self, msg: Message | int) -> None:
        self._k.nack(self.pid, _message_id(msg, "sys.nack"))

    @_syscall
    def wait(self, pid: int, timeout_ms: float | None = None) -> ProcessInfo | None:
        if _pid(pid, "sys.wait: pid") == self.pid:
            raise _invalid("sys.wait: a process cannot wait for itself")
        return self._k.wait(pid, timeout=_timeout_s(timeout_ms, "sys.wait: timeout_ms"))

    @_syscall
    def kill(self, pid: int, reason: str = "killed") -> bool:
        return self._k.kill(_pid(pid, "sys.kill: pid"), _text(reason, "sys.kill: reason"))

    @_syscall
    def register(self, name: str) -> None:
        self._k.register(self.pid, _text(name, "sys.register: name"))

    @_syscall
    def whereis(self, name: str) -> int | None:
        if not _text(name, "sys.whereis: name"):
            return None  # no process is registered as "" (and ListProcesses would take it for "any")
        found = self._k.ps(name=name)
        return found[0].pid if found else None

    @_syscall
    def monitor(self, pid: int) -> None:
        self._k.monitor(self.pid, _pid(pid, "sys.monitor: pid"))

    @_syscall
    def info(self, pid: int | None = None) -> ProcessInfo:
        return self._k.get(self.pid if pid is None else _pid(pid, "sys.info: pid"))

    @_syscall
    def set_priority(self, pid: int | None, priority: int, weight: int = 0) -> None:
        self._k.set_priority(self.pid if pid is None else _pid(pid, "sys.set_priority: pid"),
                             _int(priority, "sys.set_priority: priority", _INT32),
                             _int(weight, "sys.set_priority: weight", _UINT32))

    @_syscall
    def sleep(self, ms: float) -> None:
        """Sleep in the kernel, so that this process gives up its CPU while it waits."""
        timeout = _duration_ms(ms, "sys.sleep: ms") / 1000
        self._k.recv(self.pid, correlation_id=f"sleep-{secrets.token_hex(16)}", timeout=timeout)

    @_syscall
    def now(self) -> float:
        return time.time() * 1000.0

    @_syscall
    def log(self, *values: Any) -> None:
        builtins.print(*values, flush=True)

    @_syscall
    def infer(self, prompt: str | None = None, messages: list[dict] | None = None, max_tokens: int = 0,
              temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
              seed: int | None = None, stop: list[str] | None = None, priority: int | None = None,
              timeout_ms: float | None = None, json_schema: dict | None = None, regex: str | None = None,
              grammar: str | None = None, tools: list[dict] | None = None, tool_choice: str | None = None,
              context: int | None = None) -> dict:
        """Generate with the shared model; returns {text, finish_reason, usage} as in Lua, and
        tool_calls ([{id, name, arguments}]) when tools were given."""
        if messages is not None:
            messages = _chat(messages, "sys.infer")
        if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
            raise _invalid("sys.infer: stop must be a list of str")
        if json_schema is not None and not isinstance(json_schema, dict):
            raise _invalid(f"sys.infer: json_schema must be a dict, not {type(json_schema).__name__}")
        if tool_choice is not None and not isinstance(tool_choice, str):
            raise _invalid('sys.infer: tool_choice must be "auto", "none", "required" or a tool\'s name')
        result = self._k.infer(
            prompt=_optional_text(prompt, "sys.infer: prompt"), messages=messages, pid=self.pid, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, priority=priority,
            timeout=_timeout_s(timeout_ms, "sys.infer: timeout_ms"), json_schema=json_schema,
            regex=_optional_text(regex, "sys.infer: regex"), grammar=_optional_text(grammar, "sys.infer: grammar"),
            tools=_tool_list(tools, "sys.infer"), tool_choice=tool_choice,
            context=0 if context is None else _handle(context, "sys.infer: context"))
        answer = {"text": result.text, "finish_reason": result.finish_reason, "usage": result.usage}
        if tools is not None or context is not None:  # (a context may have tools)
            answer["tool_calls"] = result.tool_calls
        if json_schema is not None and result.finish_reason == "stop":
            answer["json"] = json.loads(result.text)  # the output matches the schema
        return answer

    @_syscall
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

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
llmos.InvalidArgument naming it; a pid that cannot exist is llmos.NotFound.
The kernel checks the arguments (the syscall table's rules, as for Lua and
gRPC clients: same status, same words); this module only puts them in their
request fields (see "arguments" below). Durations are in ms: NaN and negative
ones are refused, and anything above MAX_DURATION_MS (10 years, +inf
included) means that long, i.e. for ever.

In a durable agent (spawned with durable=True) the kernel journals every call here, and
time.time() and sys.now() are the kernel's journaled clock (use_journaled_clock; see
docs/durable-agents.md for what else such a program must not use).

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

from .client import Client, FileInfo, Message, ProcessInfo, Unary, message_from_pb, process_from_pb
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .v1 import kernel_pb2 as pb
from .v1 import kernel_pb2_grpc
from .values import MAX_DURATION_MS, to_value

JSON = Any
TOKEN_HEADER = "llmos-token"  # the metadata the kernel's agent socket checks
_INT32 = (-2**31, 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)
_INT64 = (-2**63, 2**63 - 1)
_LIMITS = {f.name: _UINT32 if f.type == f.TYPE_UINT32 else _UINT64 for f in pb.Limits.DESCRIPTOR.fields}
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


# -- arguments: the kernel checks them ---------------------------------------------------------------
# Every syscall here is an RPC on the agent socket, whose handler checks its arguments by the syscall
# table's spec (the server's api/table.py and api/checks.py), as for gRPC clients and Lua programs: the
# rules (ranges, required, not found, NaN, names, sizes) and their words are the kernel's alone. This
# module only puts each value in its request field. A value of a type no such field carries is
# refused here, naming the type the field wants; a number beyond the field's range is sent as the
# field's bound nearest to it (unsigned fields: a negative as the top one), which the kernel refuses
# by the same rule as the number itself (a pid no process can have is NOT_FOUND, a priority out of
# range INVALID_ARGUMENT). The kernel's words name the argument without the syscall; the agent's
# errors add "sys.<name>: " (_kernel).

def _integer(value: Any, what: str) -> int:
    """An int, or anything that is one (a numpy integer), but not a bool."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise _invalid(f"{what} must be an integer")


def _int(value: Any, what: str, bounds: tuple[int, int]) -> int:
    """An integer for a field within `bounds` (beyond them: the bound nearest, as above)."""
    value, (low, high) = _integer(value, what), bounds
    return high if value > high or (low == 0 and value < 0) else max(value, low)


def _pid(value: Any, what: str) -> int:
    return _int(value, what, _UINT64)


def _ms(value: Any, what: str) -> int:
    """A duration in ms for an int64 field (a fraction away from zero: -0.5 is negative)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _invalid(f"{what} must be a non-negative number of milliseconds")
    if isinstance(value, numbers.Integral):
        ms = operator.index(value)
    else:
        ms = float(value)
        if math.isnan(ms):  # no number: no field holds it
            raise _invalid(f"{what} must be a non-negative number of milliseconds")
        ms = _INT64[ms > 0] if math.isinf(ms) else math.ceil(ms) if ms > 0 else math.floor(ms)
    return min(max(ms, _INT64[0]), _INT64[1])


def _optional_ms(value: Any, what: str) -> int | None:
    return None if value is None else _ms(value, what)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{what} must be valid Unicode text") from None
    return value


def _optional_text(value: Any, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"{what} must be a boolean")
    return value


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _invalid(f"{what} must be a string of bytes")
    return bytes(value)


def _message_id(msg: Any, what: str) -> int:
    """sys.ack/sys.nack's argument: a Message (its id) or a message id."""
    return _int(msg.id if isinstance(msg, Message) else msg, f"{what}: message_id", _UINT64)


def _limits(limits: Any, what: str) -> dict[str, int] | None:
    """spawn's limits as pb.Limits' fields (the kernel checks them; an unknown key is no field).
    Every field is unsigned and 0 means "the server's default": a negative or a number beyond the
    field has no value that says the same, so it is refused here."""
    if limits is None:
        return None
    if not isinstance(limits, dict):
        raise _invalid(f"{what} must be a dict of {', '.join(_LIMITS)}")
    out = {}
    for key, value in limits.items():
        field = _ms(value, f"{what}.{key}") if key in _DURATION_LIMITS else _integer(value, f"{what}.{key}")
        if not _LIMITS.get(key, _UINT64)[0] <= field <= _LIMITS.get(key, _UINT64)[1]:
            raise _invalid(f"{what}.{key}: {_show(value)} is out of range")
        out[key] = field
    return out


def _unary(kernel: "_AgentClient", syscall: str, method: str, request: Any, timeout_ms: int | None = None,
           field_is: tuple[str, str] | None = None) -> Any:
    """The reply to one RPC; the kernel's refusal of an argument says which syscall refused it
    (and, `field_is`, names the field by its argument's name)."""
    def plan() -> Any:
        # (past the kernel's "for ever", no deadline: gRPC's cannot be that far)
        deadline = None if timeout_ms is None or not 0 <= timeout_ms < MAX_DURATION_MS else timeout_ms / 1000 + 5.0
        reply = yield Unary(method, request, deadline)
        return reply

    try:
        return kernel._drive(plan())
    except (InvalidArgument, NotFound) as e:
        message = e.message
        if field_is is not None and message.startswith(field_is[0] + " "):
            message = field_is[1] + message[len(field_is[0]):]
        raise type(e)(e.code, f"{syscall}: {message}") from None


class Files:
    """sys.fs: the namespace's file tree."""

    def __init__(self, kernel: _AgentClient) -> None:
        self._k = kernel

    @_syscall
    def write(self, path: str, data: bytes | str, append: bool = False) -> FileInfo:
        """`data`: bytes, or a str (written as UTF-8)."""
        return self._k.write_file(_text(path, "sys.fs.write: path"),
                                  data if isinstance(data, str) else _bytes(data, "sys.fs.write: data"),
                                  append=_flag(append, "sys.fs.write: append"))

    @_syscall
    def read(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        return self._k.read_file(_text(path, "sys.fs.read: path"), offset=_integer(offset, "sys.fs.read: offset"),
                                 length=_integer(length, "sys.fs.read: length"))

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

    @_syscall
    def mkdir(self, path: str) -> FileInfo:
        return self._k.make_dir(_text(path, "sys.fs.mkdir: path"))


class Locks:
    """sys.lock: named mutexes and counting semaphores, held by this process."""

    def __init__(self, kernel: _AgentClient, pid: int) -> None:
        self._k = kernel
        self._pid = pid

    @_syscall
    def acquire(self, name: str, timeout_ms: float | None = None, semaphore: int = 0) -> dict | None:
        return self._acquire("sys.lock.acquire", name, _optional_ms(timeout_ms, "sys.lock.acquire: timeout_ms"),
                             semaphore)

    @_syscall
    def try_acquire(self, name: str, semaphore: int = 0) -> dict | None:
        return self._acquire("sys.lock.try_acquire", name, 0, semaphore)

    def _acquire(self, syscall: str, name: Any, timeout_ms: int | None, semaphore: Any) -> dict | None:
        request = pb.AcquireRequest(pid=self._pid, name=_text(name, f"{syscall}: name"), timeout_ms=timeout_ms,
                                    semaphore=_int(semaphore, f"{syscall}: semaphore", _UINT32))
        reply = _unary(self._k, syscall, "Acquire", request, timeout_ms)
        if not reply.acquired:
            return None
        return {"acquired": True, **({"previous_holder_died": reply.previous_holder_died}
                                     if reply.previous_holder_died else {})}

    @_syscall
    def release(self, name: str) -> None:
        _unary(self._k, "sys.lock.release", "Release",
               pb.ReleaseRequest(pid=self._pid, name=_text(name, "sys.lock.release: name")))


class Conds:
    """sys.cond: condition variables, waited on with a mutex this process holds (see docs/services.md)."""

    def __init__(self, kernel: _AgentClient, pid: int) -> None:
        self._k = kernel
        self._pid = pid

    @_syscall
    def wait(self, name: str, lock: str, timeout_ms: float | None = None) -> dict:
        request = pb.CondWaitRequest(pid=self._pid, name=_text(name, "sys.cond.wait: name"),
                                     lock=_text(lock, "sys.cond.wait: lock"),
                                     timeout_ms=_optional_ms(timeout_ms, "sys.cond.wait: timeout_ms"))
        reply = _unary(self._k, "sys.cond.wait", "CondWait", request)  # the mutex may take any time to come back
        answer: dict[str, Any] = {"signalled": reply.signalled, "timed_out": reply.timed_out}
        if reply.previous_holder_died:
            answer["previous_holder_died"] = reply.previous_holder_died
        return answer

    @_syscall
    def signal(self, name: str) -> int:
        return _unary(self._k, "sys.cond.signal", "CondSignal", pb.CondSignalRequest(
            pid=self._pid, name=_text(name, "sys.cond.signal: name"))).woken

    @_syscall
    def broadcast(self, name: str) -> int:
        return _unary(self._k, "sys.cond.broadcast", "CondBroadcast", pb.CondSignalRequest(
            pid=self._pid, name=_text(name, "sys.cond.broadcast: name"))).woken


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
        return _unary(self._k, "sys.context.fork", "ForkContext", pb.ForkContextRequest(
            pid=self._pid, context_id=_int(context, "sys.context.fork: context", _UINT64))).context_id

    @_syscall
    def drop(self, context: int) -> None:
        _unary(self._k, "sys.context.drop", "DropContext", pb.DropContextRequest(
            pid=self._pid, context_id=_int(context, "sys.context.drop: context", _UINT64)))


def _chat(messages: Any, what: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise _invalid(f"{what}: messages must be a list of {{role, content}} dicts, not {type(messages).__name__}")
    return list(messages)


def _tool_list(tools: Any, what: str) -> list[dict] | None:
    if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools)):
        raise _invalid(f"{what}: tools must be a list of dicts (name, description, parameters)")
    return None if tools is None else list(tools)


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
              durable: bool = False, source_name: str | None = None) -> int:
        """`source_name`: the name a source program's errors and tracebacks give it."""
        return self._k.spawn(source_name=_optional_text(source_name, "sys.spawn: source_name"),
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
        request = pb.SendRequest(tag=_text(tag, "sys.send: tag"), data=_bytes(data, "sys.send: data"),
                                 correlation_id=_text(correlation_id, "sys.send: correlation_id"),
                                 notify_undelivered=_flag(notify_undelivered, "sys.send: notify_undelivered"),
                                 idempotency_key=_optional_text(idempotency_key, "sys.send: idempotency_key"))
        setattr(request, "from", self.pid)
        if isinstance(to, str):
            request.to_name = _text(to, "sys.send: to")
        elif isinstance(to, bool) or not isinstance(to, numbers.Integral):
            raise _invalid("sys.send: to must be a pid or a registered name")
        else:
            request.to = _pid(to, "sys.send: to")
        if body is not None:
            try:
                request.body.CopyFrom(to_value(body))
            except (TypeError, ValueError) as e:
                raise _invalid(f"sys.send: body: {e}") from None
        return _unary(self._k, "sys.send", "Send", request).message_id

    @_syscall
    def recv(self, sender: int | None = None, tag: str | None = None, correlation_id: str | None = None,
             timeout_ms: float | None = None, ack: bool = False, lease_ms: float | None = None) -> Message | None:
        timeout = _optional_ms(timeout_ms, "sys.recv: timeout_ms")
        request = pb.RecvRequest(pid=self.pid, tag=_optional_text(tag, "sys.recv: tag"),
                                 correlation_id=_optional_text(correlation_id, "sys.recv: correlation_id"),
                                 timeout_ms=timeout, ack=_flag(ack, "sys.recv: ack"),
                                 lease_ms=_optional_ms(lease_ms, "sys.recv: lease_ms"))
        if sender is not None:
            setattr(request, "from", _pid(sender, "sys.recv: from"))  # (a negative: NOT_FOUND, as one too big)
        reply = _unary(self._k, "sys.recv", "Recv", request, timeout)
        return None if reply.timed_out else message_from_pb(reply.message)

    @_syscall
    def ack(self, msg: Message | int) -> None:
        _unary(self._k, "sys.ack", "Ack", pb.AckRequest(pid=self.pid, message_id=_message_id(msg, "sys.ack")))

    @_syscall
    def nack(self, msg: Message | int) -> None:
        _unary(self._k, "sys.nack", "Nack", pb.AckRequest(pid=self.pid, message_id=_message_id(msg, "sys.nack")))

    @_syscall
    def wait(self, pid: int, timeout_ms: float | None = None) -> ProcessInfo | None:
        pid = _pid(pid, "sys.wait: pid")
        if pid == self.pid:  # (the kernel would wait for ever: this process cannot end while it waits)
            raise _invalid("sys.wait: a process cannot wait for itself")
        timeout = _optional_ms(timeout_ms, "sys.wait: timeout_ms")
        reply = _unary(self._k, "sys.wait", "Wait", pb.WaitRequest(pid=pid, timeout_ms=timeout), timeout)
        return None if reply.timed_out else process_from_pb(reply.process)

    @_syscall
    def kill(self, pid: int, reason: str = "killed") -> bool:
        request = pb.KillRequest(pid=_pid(pid, "sys.kill: pid"), reason=_text(reason, "sys.kill: reason"))
        return not _unary(self._k, "sys.kill", "Kill", request).already_ended

    @_syscall
    def register(self, name: str) -> None:
        _unary(self._k, "sys.register", "Register",
               pb.RegisterRequest(pid=self.pid, name=_text(name, "sys.register: name")))

    @_syscall
    def whereis(self, name: str) -> int | None:
        if not _text(name, "sys.whereis: name"):
            return None  # no process is registered as "" (and ListProcesses would take it for "any")
        found = self._k.ps(name=name)
        return found[0].pid if found else None

    @_syscall
    def monitor(self, pid: int) -> None:
        _unary(self._k, "sys.monitor", "Monitor",
               pb.MonitorRequest(watcher=self.pid, target=_pid(pid, "sys.monitor: target")))

    @_syscall
    def info(self, pid: int | None = None) -> ProcessInfo:
        request = pb.GetProcessRequest(pid=self.pid if pid is None else _pid(pid, "sys.info: pid"))
        return process_from_pb(_unary(self._k, "sys.info", "GetProcess", request))

    @_syscall
    def set_priority(self, pid: int | None, priority: int | None = None, weight: int = 0) -> None:
        if priority is None and not weight:
            raise _invalid("sys.set_priority: give a priority (integer) and/or a weight")
        current = self.info(pid).priority if priority is None else None  # SetPriority always sets one
        _unary(self._k, "sys.set_priority", "SetPriority", pb.SetPriorityRequest(
            pid=self.pid if pid is None else _pid(pid, "sys.set_priority: pid"),
            priority=current if priority is None else _int(priority, "sys.set_priority: priority", _INT32),
            weight=_int(weight, "sys.set_priority: weight", _UINT32)))

    @_syscall
    def sleep(self, ms: float) -> None:
        """Sleep in the kernel, so that this process gives up its CPU while it waits."""
        timeout = _ms(ms, "sys.sleep: ms")
        _unary(self._k, "sys.sleep", "Recv", pb.RecvRequest(
            pid=self.pid, correlation_id=f"sleep-{secrets.token_hex(16)}", timeout_ms=timeout), timeout,
            ("timeout_ms", "ms"))

    @_syscall
    def now(self) -> float:
        if _journaled_clock:  # a durable agent's time is the kernel's journal's (use_journaled_clock)
            return float(self._k._channel.unary_unary(_NOW)(b""))
        return _real_time() * 1000.0

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
            timeout=None if timeout_ms is None else _ms(timeout_ms, "sys.infer: timeout_ms") / 1000,
            json_schema=json_schema,
            regex=_optional_text(regex, "sys.infer: regex"), grammar=_optional_text(grammar, "sys.infer: grammar"),
            tools=_tool_list(tools, "sys.infer"), tool_choice=tool_choice,
            context=0 if context is None else _int(context, "sys.infer: context", _UINT64))
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


# A durable agent's clock (use_journaled_clock): the agent socket's llmos.agent.Durable/Now answers the
# time from the process's journal while it replays, and journals it when live.
_NOW = "/llmos.agent.Durable/Now"
_real_time = time.time
_journaled_clock = False
# Modules whose calls of time.time() keep the real clock: the channel's own deadlines, this SDK's, and
# log records' times (log lines are not journaled, and gRPC may log a warning in one run, not another).
_REAL_CLOCK_CALLERS = ("grpc", "google.", "llmos.", "logging")


def use_journaled_clock() -> None:
    """In a durable agent (python/sandbox/child.py sets it up): time.time() and sys.now() give the
    time the kernel journaled, the same in every run of the program (docs/durable-agents.md). The
    gRPC channel's, this SDK's and the logging module's own calls of time.time() keep the real clock."""
    global _journaled_clock
    _journaled_clock = True
    time.time = _journaled_time


def _journaled_time() -> float:
    caller = _sys._getframe(1).f_globals.get("__name__") or ""
    if caller.startswith(_REAL_CLOCK_CALLERS):
        return _real_time()
    agent = globals().get("sys") or __getattr__("sys")
    return agent.now() / 1000.0


def _connect() -> Sys:
    env = os.environ
    missing = [k for k in ("LLMOS_PID", "LLMOS_TOKEN", "LLMOS_SOCKET") if k not in env]
    if missing:
        raise FailedPrecondition(grpc.StatusCode.FAILED_PRECONDITION,
                                 "llmos.userland works inside a Python process spawned by llmosd "
                                 f"({', '.join(missing)} not set); outside, use llmos.Client")
    agent = Sys(int(env["LLMOS_PID"]), env["LLMOS_TOKEN"], env["LLMOS_SOCKET"], json.loads(env.get("LLMOS_ARGS", "null")))
    if _journaled_clock:  # a durable agent a restarted server brings back may start before its socket serves
        agent._k.wait_ready(60.0)
    return agent


def __getattr__(name: str) -> Any:
    # `sys` is made on first use, in the agent: the fork server imports this
    # module before any agent exists (and must not open a channel).
    if name == "sys":
        value = globals()["sys"] = _connect()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The Lua userland: one sandboxed Lua 5.4 state per process.

Each process's state is an _lua.State (lua/state.c), with the sandbox
(lua/sandbox.c) built into it, which runs the program as a coroutine.
Non-blocking syscalls (send, spawn, kill, ...) are direct calls into the
bridge below; blocking ones (recv with nothing to take, wait, sleep, infer,
exit) yield to the kernel, which parks the process until its waiter completes
and then resumes it. Messages between processes are the C side's (the
kernel's _lua.Core): send and try_recv here, and the receive that blocks,
handle only what it leaves to Python.

Only plain values ever cross into the program, converted by lua/state.c: bridge
functions catch every exception and answer (nil, message) instead, and no
Python object reaches Lua.
"""
from __future__ import annotations

import functools
import math
import signal
import time
from typing import TYPE_CHECKING, Any, Callable

from ..api import checks as C
from ..api.authority import Caller, process_caller
from ..api.table import LUA_CALLS, lua_layout
from ..api.errors import InvalidArgument, KernelError, ResourceExhausted, Unimplemented
from ..kernel.acks import Leased
from .library import library
from ..kernel.mailbox import ANY, Match, Message
from ..native import _lua
from ..kernel.process import Process
from ..kernel.config import SpawnSpec

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel
    from ..kernel.store import ProcessRecord

# The scheduler interrupts a running program with this signal (see lua/preempt.c).
PREEMPT_SIGNAL = signal.SIGURG  # ignored by default, so a stray one is harmless
_lua.setup_preemption(PREEMPT_SIGNAL)
_lua.set_sys_layout(lua_layout())  # every state's sys table, from the syscall table


MEMORY_ERROR = "not enough memory"


def _now_ms() -> float:
    return time.time() * 1000.0


def lua_syntax_error(source: str, name: str) -> str | None:
    """Why `source` does not compile as a Lua chunk, or None. Small programs'
    answers are remembered, as a program typically spawns the same worker
    source over and over."""
    if len(source) <= 64 << 10:
        return _remembered_syntax_error(source, name)
    return _syntax_error(source, name)


def _syntax_error(source: str, name: str) -> str | None:
    return _lua.syntax_error(source.encode(), f"={name}".encode())


_remembered_syntax_error = functools.lru_cache(maxsize=256)(_syntax_error)


# -- values -----------------------------------------------------------------------------
# lua/state.c converts values as they cross: a Lua string given directly arrives as
# bytes, a number as it is, a table as a dict or list already checked against
# the value model (messaging.h: text strings, finite numbers, integers within
# +-2^53, text keys, at most 32 levels deep, at most the message size limit),
# and a value that cannot cross as a _lua.BadValue (or TooLarge) saying why.

def from_lua(value: Any, what: str = "value") -> Any:
    """A value from Lua as a JSON-shaped Python value, or InvalidArgument
    (ResourceExhausted if too large) naming `what`. Tables whose keys are 1..n
    (holes allowed, as nil stands for null) are lists; other tables are
    objects with string keys; an empty table is {}."""
    kind = type(value)
    if value is None or kind is bool or kind is dict or kind is list:
        return value
    if kind is int:
        if not -C.MAX_EXACT_INTEGER <= value <= C.MAX_EXACT_INTEGER:
            raise InvalidArgument(f"{what}: integers beyond +-2^53 are not exact JSON numbers")
        return value
    if kind is bytes:
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidArgument(f"{what}: strings must be UTF-8 text; send raw bytes as data") from None
    if kind is float:
        if not math.isfinite(value):
            raise InvalidArgument(f"{what}: NaN and infinity are not JSON numbers")
        return value
    if kind is _lua.TooLarge:
        raise ResourceExhausted(f"{what}: {value.args[0]}")
    if kind is _lua.BadValue:
        raise InvalidArgument(f"{what}: {value.args[0]}")
    raise InvalidArgument(f"{what}: a {kind.__name__} cannot be sent or returned")


def arguments(syscall: str, **given: Any) -> tuple[Any, ...]:
    """sys.<syscall>'s arguments checked by its table entry (api/checks.py arguments), worded
    "sys.<syscall>: ..."; a table that could not cross from Lua says why first."""
    for key, value in given.items():
        if type(value) in (_lua.BadValue, _lua.TooLarge):
            from_lua(value, f"sys.{syscall}: {key}")
    return C.arguments(syscall, given, f"sys.{syscall}: ")


def describe_record(rec: ProcessRecord) -> dict[str, Any]:
    """A process's record as the plain table sys.info and sys.wait answer."""
    info = {
        "pid": rec.pid, "name": rec.name, "parent": rec.parent, "namespace": rec.namespace, "kind": rec.kind,
        "state": rec.state,
        "priority": rec.priority, "weight": rec.weight, "exit_reason": rec.exit_reason, "result": rec.result, "error": rec.error,
    }
    if rec.usage is not None:
        info["usage"] = rec.usage
    return {k: v for k, v in info.items() if v is not None}


def error_text(err: Any) -> str:
    """A Lua error object as text for the process's exit record."""
    if type(err) is bytes:
        return err.decode(errors="replace")
    try:
        return str(from_lua(err, "error"))
    except KernelError as e:
        return f"error object that cannot be shown ({e})"


class LuaProcess:
    """A process's Lua state, its bridge to the kernel, and its slice clock."""

    journal = None  # a durable process's (lua/durable.py)

    def __init__(self, kernel: Kernel, proc: Process) -> None:
        self.kernel = kernel
        self.proc = proc
        # The state keeps the slice clock: slice_start (perf_counter_ns), in_slice,
        # cpu_ns, and begin_slice/end_slice, which charge the slice to the process.
        self.state = _lua.State(proc.limits.memory_bytes, kernel.config.max_message_bytes)
        self.state.open_sandbox(
            self, proc, kernel.core, self.source().encode(), f"={proc.program_name}".encode(), proc.args,
            kernel.config.hook_instructions,
        )

    @functools.cached_property
    def caller(self) -> Caller:
        """Who its syscalls act as (api/authority.py); made on its first syscall that needs one (a
        short program may make none)."""
        return process_caller(self.proc.pid, self.proc.namespace)

    def source(self) -> str:
        """The program the state runs."""
        return self.proc.program

    def journaled_locked(self, answer: Any) -> Any:
        """Called with the kernel lock held by calls whose effect other processes see at once (a
        release, a signal): a durable process journals them there (lua/durable.py)."""
        return answer

    def wants_cpu_back(self, now_ns: int, quantum_ns: int, others_waiting: bool) -> int | None:
        """Should the kernel interrupt this process now (seen from another
        thread)? The start of its running slice if so (which tells that slice
        from the next one, for the scheduler's sysmon), else None; never while
        it is not in a slice (a parked thread is not due)."""
        proc, state = self.proc, self.state
        if not state.in_slice:
            return None
        start = state.slice_start
        ran = now_ns - start
        # Every quantum, even with nobody waiting: the check-in ends the slice,
        # which measures the CPU the next ones actually use (see lua/state.c's slice clock).
        if proc.kill_reason is not None or ran >= quantum_ns or (
            proc.limits.cpu_ms and state.cpu_used_ns + ran > proc.limits.cpu_ms * 1_000_000
        ):
            return start
        return None

    def memory_used(self) -> int:
        return self.state.memory_used()

    def log_lines(self, limit: int) -> None:
        return None  # a Lua process's log is the kernel's

    def cpu_ns(self) -> int:
        """CPU time actually used so far, the running slice included (at most its wall time so far:
        read from other threads, which cannot read this thread's CPU clock)."""
        state = self.state
        running = time.perf_counter_ns() - state.slice_start if state.in_slice else 0
        return state.cpu_used_ns + running

    # -- the count hook ---------------------------------------------------------------------
    def check(self) -> bytes | None:
        """Runs from the hook (every `hook_instructions` instructions, or when the
        kernel interrupts the main coroutine): end the process if the kernel
        wants it gone, preempt it if its quantum is spent."""
        proc = self.proc
        kernel = self.kernel
        state = self.state
        if proc.kill_reason is None:
            now = time.perf_counter_ns()
            cpu_limit = proc.limits.cpu_ms
            if cpu_limit and state.cpu_used_ns + now - state.slice_start > cpu_limit * 1_000_000:
                proc.kill_reason = "cpu_limit"
            elif proc.yield_requested or now - state.slice_start >= kernel.quantum_ns:
                proc.yield_requested = False
                if kernel.scheduler.should_yield(proc):
                    state.end_slice()
                    kernel.scheduler.preempt(proc)
                    state.begin_slice()
                else:
                    # Nobody waits: keep going, and account the time so far.
                    state.end_slice()
                    state.begin_slice()
        if proc.kill_reason is not None:
            return proc.kill_reason.encode()
        return None

    # -- non-blocking syscalls ------------------------------------------------------------
    def send(self, to: Any, body: Any, tag: Any, data: Any, correlation_id: Any, notify_undelivered: Any = None,
             idempotency_key: Any = None, on_sent: Callable[[Message], list] | None = None) -> tuple:
        """sys.send's Python side (lua/fast_paths.c's declined cases); `on_sent`: a durable sender's
        journal entry (Kernel.send)."""
        try:
            target, _, options = arguments("send", to=to, options={
                "tag": tag, "data": data, "correlation_id": correlation_id,
                "notify_undelivered": notify_undelivered, "idempotency_key": idempotency_key})
            kind = type(body)
            value = body if kind is int or body is None else from_lua(body, "sys.send: body")
            message_id = self.kernel.send(self.proc.pid, target, options.get("tag", ""), value,
                                          options.get("data", b""), options.get("correlation_id", ""), self.caller,
                                          options.get("notify_undelivered", False),
                                          options.get("idempotency_key", ""), on_sent)
            return message_id, len(self.proc.mailbox)  # and a hint for the next sys.recv
        except KernelError as e:
            return None, str(e).encode()

    def try_recv(self, sender: Any, tag: Any, correlation_id: Any, timeout_ms: Any) -> tuple:
        try:
            match = self.recv_match(sender, tag, correlation_id, timeout_ms)
            msg = self.kernel.try_recv(self.proc.pid, match, self.caller)
            return (msg, len(self.proc.mailbox)) if msg is not None else (None,)
        except KernelError as e:
            return False, str(e).encode()

    def recv_match(self, sender: Any, tag: Any, correlation_id: Any, timeout_ms: Any) -> Match:
        (options,) = arguments("recv", options={
            "from": sender, "tag": tag, "correlation_id": correlation_id, "timeout_ms": timeout_ms})
        if sender is None and tag is None and correlation_id is None:
            return ANY
        return Match(options.get("from"), options.get("tag"), options.get("correlation_id"))

    def recv_lease(self, ack: Any = None, lease_ms: Any = None) -> float | None:
        """The lease in seconds (None: the default) of a sys.recv given ack or lease_ms (lua/sandbox.c
        makes one with `ack = false` alone a receive without ack)."""
        (options,) = arguments("recv", options={"ack": ack, "lease_ms": lease_ms})
        if not options.get("ack"):
            raise InvalidArgument("sys.recv: lease_ms is for a receive with ack = true")
        return C.timeout_s(options.get("lease_ms"), "sys.recv: lease_ms")

    def ack(self, msg: Any = None) -> bool:
        (message_id,) = arguments("ack", message_id=msg.get("id") if isinstance(msg, dict) else msg)
        with self.kernel.lock:
            self.kernel.acks.ack(self.proc.pid, message_id)
        return True

    def nack(self, msg: Any = None) -> bool:
        (message_id,) = arguments("nack", message_id=msg.get("id") if isinstance(msg, dict) else msg)
        with self.kernel.lock:
            self.kernel.acks.nack(self.proc.pid, message_id)
        return True

    def call(self, op: bytes, *args: Any) -> Any:
        """The bridge's dispatcher for the syscalls that never block: the
        handler's answer, or (nil, error text) for a bad call."""
        entry = _CALLS.get(op)
        if entry is None:
            return None, f"no syscall {op.decode(errors='replace')}".encode()
        handler, arity = entry
        try:
            return handler(self, *args[:arity])
        except KernelError as e:
            return None, str(e).encode()

    def spawn(self, spec: Any = None) -> int:
        return self.kernel.spawn(self.spawn_spec(spec), self.caller)

    def spawn_spec(self, spec: Any) -> SpawnSpec:
        """sys.spawn{lua = source, args = ...} as a SpawnSpec, its options checked by the table's
        entry (the Kernel checks the program, name and ranges)."""
        (spec,) = arguments("spawn", options=spec)
        return SpawnSpec(parent=self.proc.pid, **spec)  # the entry's options are SpawnSpec's fields

    def kill(self, pid: Any = None, reason: Any = None) -> bool:
        pid, reason = arguments("kill", pid=pid, reason=reason)
        self.kernel.kill(pid, reason or "killed", self.caller)
        return True

    def register(self, name: Any = None) -> bool:
        self.kernel.register(self.proc.pid, *arguments("register", name=name), self.caller)
        return True

    def whereis(self, name: Any = None) -> int | None:
        return self.kernel.whereis(*arguments("whereis", name=name), self.caller)

    def monitor(self, pid: Any = None) -> bool:
        self.kernel.monitor(self.proc.pid, *arguments("monitor", target=pid), self.caller)
        return True

    def set_priority(self, pid: Any = None, priority: Any = None, weight: Any = None) -> bool:
        target, prio, share = arguments("set_priority", pid=pid, priority=priority, weight=weight)
        if prio is None and share is None:
            raise InvalidArgument("sys.set_priority: give a priority (integer) and/or a weight")
        self.kernel.set_priority(target or self.proc.pid, prio, share or 0, caller=self.caller)
        return True

    def info(self, pid: Any = None) -> Any:
        (pid,) = arguments("info", pid=pid)
        return describe_record(self.kernel.get(pid or self.proc.pid, self.caller)[0])

    def lock_options(self, name: Any, opts: Any, fname: str) -> tuple[str, str, int, float | None]:
        """(name, kind, permits, timeout in seconds or None) of a lock call."""
        text, options = arguments(fname.removeprefix("sys."), name=name, options=opts)
        permits = options.get("semaphore")
        seconds = C.timeout_s(options.get("timeout_ms"), f"{fname}: timeout_ms")
        return (text, "mutex", 1, seconds) if permits is None else (text, "semaphore", permits, seconds)

    def lock_try(self, name: Any = None, opts: Any = None) -> Any:
        return self._lock_try(name, opts, "sys.lock.try_acquire")

    def lock_acquire_now(self, name: Any = None, opts: Any = None) -> Any:
        """sys.lock.acquire's first try, which costs no trip through the scheduler when the lock is free."""
        return self._lock_try(name, opts, "sys.lock.acquire")

    def _lock_try(self, name: Any, opts: Any, fname: str) -> Any:
        lock_name, kind, permits, _ = self.lock_options(name, opts, fname)
        with self.kernel.lock:
            return self.kernel.sync.try_acquire(self.proc.namespace, lock_name, self.proc.pid, kind, permits)

    def lock_release(self, name: Any = None) -> bool:
        (text,) = arguments("lock.release", name=name)
        with self.kernel.lock:
            self.kernel.sync.release(self.proc.namespace, text, self.proc.pid)
            return self.journaled_locked(True)

    def cond_wait_args(self, name: Any = None, lock: Any = None, timeout_ms: Any = None) -> tuple[str, str, float | None]:
        """(condition, mutex, timeout in seconds or None) of sys.cond.wait(name, lock [, timeout_ms])."""
        cond_name, lock_name, ms = arguments("cond.wait", name=name, lock=lock, timeout_ms=timeout_ms)
        return cond_name, lock_name, None if ms is None else ms / 1000

    def cond_signal(self, name: Any = None) -> int:
        return self._cond_wake("cond.signal", name, self.kernel.sync.cond_signal)

    def cond_broadcast(self, name: Any = None) -> int:
        return self._cond_wake("cond.broadcast", name, self.kernel.sync.cond_broadcast)

    def _cond_wake(self, syscall: str, name: Any, wake: Callable[[str, str], int]) -> int:
        (text,) = arguments(syscall, name=name)
        with self.kernel.lock:
            return self.journaled_locked(wake(self.proc.namespace, text))

    def fs(self, op: bytes, path: Any = None, a: Any = None, b: Any = None) -> Any:
        """sys.fs.*: the file calls (disk I/O, done on this process's CPU slot,
        without the kernel lock)."""
        name = f"sys.fs.{op.decode()}"
        try:
            return self._file_call(op, name, path, a, b)
        except OSError as e:  # disk errors the file store does not classify: still a plain string
            return None, f"{name}: {e.strerror or e}".encode()

    def _file_call(self, op: bytes, name: str, path: Any, a: Any, b: Any) -> Any:
        files, ns, pid = self.kernel.files, self.proc.namespace, self.proc.pid
        if op == b"write":  # (path, data, {append=})
            vpath, data, options = arguments("fs.write", path=path, data=a, options=b)
            return self.file_info(files.write(ns, pid, vpath, data, append=options.get("append", False)))
        if op == b"read":  # (path, {offset=, length=})
            vpath, options = arguments("fs.read", path=path, options=a)
            offset, length = options.get("offset", 0), options.get("length")
            if offset < 0 or (length is not None and length < 0):
                raise InvalidArgument("sys.fs.read: offset and length must not be negative")
            return files.read(ns, vpath, offset, length)
        if op == b"rename":  # (path, new path)
            return self.file_info(files.rename(ns, *arguments("fs.rename", src=path, dst=a)))
        if op not in (b"stat", b"list", b"delete", b"mkdir"):
            raise InvalidArgument(f"sys.fs has no {op.decode(errors='replace')}")
        (vpath,) = arguments(f"fs.{op.decode()}", path=path)
        if op == b"stat":
            return self.file_info(files.stat(ns, vpath))
        if op == b"list":
            return [self.file_info(i) for i in files.list(ns, vpath)]
        if op == b"delete":
            files.delete(ns, vpath)
            return True
        return self.file_info(files.mkdir(ns, vpath))

    def context_fork(self, handle: Any = None) -> int:
        return self._inference().fork_context(self.proc.pid, *arguments("context.fork", context=handle))

    def context_drop(self, handle: Any = None) -> bool:
        self._inference().drop_context(self.proc.pid, *arguments("context.drop", context=handle))
        return True

    def _inference(self) -> Any:
        if self.kernel.inference is None:
            raise Unimplemented("this server runs no inference engine")
        return self.kernel.inference

    def file_info(self, info: Any) -> dict:
        return {"path": info.path, "size": info.size, "is_dir": info.is_dir, "modified_ms": info.modified_ms}

    def require(self, name: Any = None) -> tuple[bytes, bytes]:
        """require's source and chunk name (lua/library.py)."""
        return library(self.kernel.config.lib_dirs).source(name)

    def now(self) -> float:
        return _now_ms()

    def log(self, text: bytes) -> None:
        self.kernel.log(self.proc, text.decode(errors="replace"))

    # -- answers to blocking syscalls ---------------------------------------------------
    def answer(self, syscall: str, value: Any) -> tuple:
        """The values to resume the program with, for a blocking syscall's result."""
        if isinstance(value, KernelError):
            return None, str(value).encode()
        if syscall == "recv":
            # The binding pushes a Message as the values sys.recv makes its table of.
            if isinstance(value, Message):
                return (value, len(self.proc.mailbox))
            if isinstance(value, Leased):  # a receive with ack: a table with attempt and redelivered
                msg = value.msg
                return ({"id": msg.id, "from": msg.sender, "to": msg.to, "tag": msg.tag, "body": msg.body,
                         "data": msg.data, "correlation_id": msg.correlation_id, "sent_at_ms": msg.sent_at_ms,
                         "attempt": value.attempt, "redelivered": value.redelivered},)
            return ()
        if syscall == "sleep":
            return (True,)
        if value is None:  # timed out
            return ()
        return (value,)



def _call_entry(op: str) -> tuple[Callable[..., Any], int]:
    method = getattr(LuaProcess, op)
    return method, method.__code__.co_argcount - 1


# The bridge's call ops, from the syscall table (api/table.py): op -> (LuaProcess method, how
# many arguments it takes; Lua may pass any number).
_CALLS: dict[bytes, tuple[Callable[..., Any], int]] = {op.encode(): _call_entry(op) for op in sorted(LUA_CALLS)}

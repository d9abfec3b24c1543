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
from ..api.authority import process_caller
from ..api.table import LUA_CALLS, lua_layout
from ..api.errors import InvalidArgument, KernelError, ResourceExhausted, Unimplemented
from ..kernel.acks import Leased
from .library import library
from ..kernel.mailbox import ANY, Match, Message
from ..native import _lua
from ..kernel.process import Limits, Process
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


def _opt_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if type(value) is not bytes:
        raise InvalidArgument(f"{name} must be a string")
    try:
        return value.decode()
    except UnicodeDecodeError:  # two different byte strings must never name one file or lock
        raise InvalidArgument(f"{name} must be UTF-8 text") from None


def _message_id(msg: Any, fname: str) -> int:
    """The id of sys.ack/sys.nack's argument: a message (a table with its id) or the id itself."""
    if isinstance(msg, dict):
        msg = msg.get("id")
    return C.message_id(msg, f"{fname}: message_id")


def _opt_int(value: Any, name: str) -> int | None:
    return None if value is None else C.integer(value, name)


def _options(opts: Any, fname: str, known: tuple[str, ...]) -> dict:
    """An options table (nil: none) as a dict of `known` options only."""
    if opts is None:
        return {}
    value = from_lua(opts, fname)  # says why a table cannot cross
    if not isinstance(value, dict):
        raise InvalidArgument(f"{fname}: expected a table of options")
    C.known_options(value, known, fname)
    return value


SPAWN_OPTIONS = frozenset(("lua", "python", "path", "args", "name", "priority", "weight", "limits", "monitor",
                           "source_name", "dead_letter", "max_attempts", "durable"))

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
        self.caller = process_caller(proc.pid, proc.namespace)  # who its syscalls act as (api/authority.py)
        # The state keeps the slice clock: slice_start (perf_counter_ns), in_slice,
        # cpu_ns, and begin_slice/end_slice, which charge the slice to the process.
        self.state = _lua.State(proc.limits.memory_bytes, kernel.config.max_message_bytes)
        self.state.open_sandbox(
            self, proc, kernel.core, self.source().encode(), f"={proc.program_name}".encode(), proc.args,
            kernel.config.hook_instructions,
        )

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
            if type(to) is bytes:
                target: int | str = to.decode(errors="replace")
            elif type(to) is not int:
                target = _opt_int(to, "sys.send: the receiver")
                if target is None:
                    raise InvalidArgument("sys.send: the receiver must be a pid or a registered name")
            else:
                target = to
            if data is not None and type(data) is not bytes:
                raise InvalidArgument("sys.send: data must be a string")
            if notify_undelivered is not None and type(notify_undelivered) is not bool:
                raise InvalidArgument("sys.send: notify_undelivered must be a boolean")
            kind = type(body)
            value = body if kind is int or body is None else from_lua(body, "sys.send: body")
            message_id = self.kernel.send(
                self.proc.pid, target, "" if tag is None else _opt_str(tag, "sys.send: tag"),
                value, data or b"",
                "" if correlation_id is None else _opt_str(correlation_id, "sys.send: correlation_id"),
                self.caller,
                bool(notify_undelivered), _opt_str(idempotency_key, "sys.send: idempotency_key") or "",
                on_sent,
            )
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
        C.timeout_s(timeout_ms, "sys.recv: timeout_ms")
        if sender is None and tag is None and correlation_id is None:
            return ANY
        return Match(
            _opt_int(sender, "sys.recv: from"), _opt_str(tag, "sys.recv: tag"),
            _opt_str(correlation_id, "sys.recv: correlation_id"),
        )

    def recv_lease(self, ack: Any = None, lease_ms: Any = None) -> float | None | bool:
        """sys.recv's ack and lease_ms: the lease in seconds (None: the default), False without ack."""
        if ack is not None and type(ack) is not bool:
            raise InvalidArgument("sys.recv: ack must be a boolean")
        if not ack:
            if lease_ms is not None:
                raise InvalidArgument("sys.recv: lease_ms is for a receive with ack = true")
            return False
        return C.timeout_s(lease_ms, "sys.recv: lease_ms")

    def ack(self, msg: Any = None) -> bool:
        with self.kernel.lock:
            self.kernel.acks.ack(self.proc.pid, _message_id(msg, "sys.ack"))
        return True

    def nack(self, msg: Any = None) -> bool:
        with self.kernel.lock:
            self.kernel.acks.nack(self.proc.pid, _message_id(msg, "sys.nack"))
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
        """sys.spawn's table as a SpawnSpec, checked."""
        spec = from_lua(spec, "sys.spawn")
        if not isinstance(spec, dict):
            raise InvalidArgument("sys.spawn takes a table like {lua=source, args=...}")
        if not SPAWN_OPTIONS.issuperset(spec):
            unknown = ", ".join(sorted(set(spec) - SPAWN_OPTIONS))
            raise InvalidArgument(f"sys.spawn: unknown option(s) {unknown}")
        limits = spec.get("limits") or {}
        if not isinstance(limits, dict):
            raise InvalidArgument(f"sys.spawn: limits must be a table of {', '.join(Limits.__slots__)}")
        for key in ("lua", "python", "path", "name", "source_name"):
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise InvalidArgument(f"sys.spawn: {key} must be a string")
        durable = spec.get("durable", False)
        if type(durable) is not bool:
            raise InvalidArgument("sys.spawn: durable must be a boolean")
        return SpawnSpec(
            lua=spec.get("lua"), python=spec.get("python"), path=spec.get("path"), args=spec.get("args"),
            name=spec.get("name"), priority=C.integer(spec.get("priority", 0), "sys.spawn: priority"),
            weight=C.integer(spec.get("weight", 0), "sys.spawn: weight"),
            limits=C.limits(limits, "sys.spawn: limits"), parent=self.proc.pid, monitor=bool(spec.get("monitor")),
            source_name=spec.get("source_name"),
            dead_letter=C.integer(spec.get("dead_letter", 0), "sys.spawn: dead_letter"),
            max_attempts=C.integer(spec.get("max_attempts", 0), "sys.spawn: max_attempts"), durable=durable,
        )

    def kill(self, pid: Any = None, reason: Any = None) -> bool:
        self.kernel.kill(C.pid(pid, "sys.kill: pid"), _opt_str(reason, "sys.kill: reason") or "killed", self.caller)
        return True

    def register(self, name: Any = None) -> bool:
        text = _opt_str(name, "sys.register: name")
        if text is None:
            raise InvalidArgument("sys.register: name must be a string")
        self.kernel.register(self.proc.pid, text, self.caller)
        return True

    def whereis(self, name: Any = None) -> int | None:
        return self.kernel.whereis(_opt_str(name, "sys.whereis: name") or "", self.caller)

    def monitor(self, pid: Any = None) -> bool:
        self.kernel.monitor(self.proc.pid, C.pid(pid, "sys.monitor: pid"), self.caller)
        return True

    def set_priority(self, pid: Any = None, priority: Any = None, weight: Any = None) -> bool:
        target = self.proc.pid if pid is None else C.pid(pid, "sys.set_priority: pid")
        prio = None if priority is None else C.priority(priority, "sys.set_priority: priority")
        share = None if weight is None else C.weight(weight, "sys.set_priority: weight")
        if prio is None and share is None:
            raise InvalidArgument("sys.set_priority: give a priority (integer) and/or a weight")
        self.kernel.set_priority(target, prio, share or 0, caller=self.caller)
        return True

    def info(self, pid: Any = None) -> Any:
        return describe_record(self.kernel.get(self.proc.pid if pid is None else C.pid(pid, "sys.info: pid"),
                                               self.caller)[0])

    def lock_options(self, name: Any, opts: Any, fname: str) -> tuple[str, str, int, float | None]:
        """(name, kind, permits, timeout in seconds or None) of a lock call."""
        text = _opt_str(name, f"{fname}: name")
        if text is None:
            raise InvalidArgument(f"{fname}: name must be a string")
        C.name(text, f"{fname}: name")
        options = _options(opts, fname, ("semaphore", "timeout_ms"))
        permits = _opt_int(options.get("semaphore"), f"{fname}: semaphore")
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
        text = _opt_str(name, "sys.lock.release: name") or ""
        with self.kernel.lock:
            self.kernel.sync.release(self.proc.namespace, text, self.proc.pid)
            return self.journaled_locked(True)

    def cond_wait_args(self, name: Any = None, lock: Any = None, timeout_ms: Any = None) -> tuple[str, str, float | None]:
        """(condition, mutex, timeout in seconds or None) of sys.cond.wait(name, lock [, timeout_ms])."""
        cond_name = _opt_str(name, "sys.cond.wait: name")
        lock_name = _opt_str(lock, "sys.cond.wait: lock")
        if cond_name is None or lock_name is None:
            raise InvalidArgument("sys.cond.wait: name and lock must be strings")
        return cond_name, lock_name, C.timeout_s(timeout_ms, "sys.cond.wait: timeout_ms")

    def cond_signal(self, name: Any = None) -> int:
        return self._cond_wake(name, "sys.cond.signal", self.kernel.sync.cond_signal)

    def cond_broadcast(self, name: Any = None) -> int:
        return self._cond_wake(name, "sys.cond.broadcast", self.kernel.sync.cond_broadcast)

    def _cond_wake(self, name: Any, fname: str, wake: Callable[[str, str], int]) -> int:
        text = _opt_str(name, f"{fname}: name")
        if text is None:
            raise InvalidArgument(f"{fname}: name must be a string")
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
        vpath = _opt_str(path, f"{name}: path")
        if vpath is None:
            raise InvalidArgument(f"{name}: path must be a string")
        if op == b"write":  # (path, data, {append=})
            if type(a) is not bytes:
                raise InvalidArgument("sys.fs.write: data must be a string")
            append = bool(_options(b, name, ("append",)).get("append"))
            return self.file_info(files.write(ns, pid, vpath, a, append=append))
        if op == b"read":  # (path, {offset=, length=})
            options = _options(a, name, ("offset", "length"))
            offset = _opt_int(options.get("offset"), "sys.fs.read: offset") or 0
            length = _opt_int(options.get("length"), "sys.fs.read: length")
            if offset < 0 or (length is not None and length < 0):
                raise InvalidArgument("sys.fs.read: offset and length must not be negative")
            return files.read(ns, vpath, offset, length)
        if op == b"stat":
            return self.file_info(files.stat(ns, vpath))
        if op == b"list":
            return [self.file_info(i) for i in files.list(ns, vpath)]
        if op == b"delete":
            files.delete(ns, vpath)
            return True
        if op == b"rename":  # (path, new path)
            target = _opt_str(a, "sys.fs.rename: new path")
            if target is None:
                raise InvalidArgument("sys.fs.rename: the new path must be a string")
            return self.file_info(files.rename(ns, vpath, target))
        if op == b"mkdir":
            return self.file_info(files.mkdir(ns, vpath))
        raise InvalidArgument(f"sys.fs has no {op.decode(errors='replace')}")

    def context_fork(self, handle: Any = None) -> int:
        return self._inference().fork_context(self.proc.pid, handle)

    def context_drop(self, handle: Any = None) -> bool:
        self._inference().drop_context(self.proc.pid, handle)
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

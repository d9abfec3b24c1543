"""The Lua userland's runtime (kernel/runtime.py's interface): running Lua processes' slices
and the syscalls they block in.

A worker thread runs a process through the C core (lua/fast_paths.c's Core.run), which
also hands the CPU straight to a process a send woke. What the program yields to the
kernel comes back here: a blocking syscall (recv with nothing to take, wait, sleep,
lock.acquire, infer, exit) parks the process on a LuaWaiter, whose completion makes it
runnable again; its answer resumes it on its next slice.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import checks as C
from ..api.table import LUA_YIELDS
from ..api.errors import FailedPrecondition, InvalidArgument, KernelError, Unimplemented
from ..kernel import process as P
from ..kernel.process import Limits, Process
from ..kernel.store import ProcessRecord
from ..kernel.waiting import TIMED_OUT, Waiter
from ..kernel.journal import REPLAY_DIVERGENCE
from .durable import _LIVE, DurableLuaProcess
from .runtime import MEMORY_ERROR, LuaProcess, arguments, describe_record, error_text, from_lua, lua_syntax_error

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel


class LuaWaiter(Waiter):
    """A Lua process blocked in a syscall: completing it makes the process runnable."""

    __slots__ = ("kernel", "proc")

    def __init__(self, kernel: Kernel, proc: Process) -> None:
        super().__init__()
        self.kernel = kernel
        self.proc = proc

    def _wake(self, value: Any) -> None:
        proc = self.proc
        proc.resume_value = value
        proc.waiter = None
        proc.state = P.RUNNABLE
        proc.blocked_on = None
        self.kernel.scheduler.make_runnable(proc)


class _Ready:
    """Resume values computed already (a process requeued after a syscall)."""

    __slots__ = ("args",)

    def __init__(self, args: tuple) -> None:
        self.args = args


class LuaRuntime:
    kind = P.LUA

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def check_program(self, source: str, name: str, defaults: Limits) -> Limits:
        """Compile (not run) the program so that Spawn can refuse a bad one."""
        err = lua_syntax_error(source, name)
        if err is not None:
            raise InvalidArgument(f"Lua syntax error: {err}")
        return defaults

    def attach(self, proc: Process, program_path: Path | None) -> None:
        pass  # the state is made on the process's first slice, on its worker thread

    def wants_cpu_back(self, proc: Process, now_ns: int, others_waiting: bool) -> int | None:
        lua = proc.runtime
        if lua is None:
            return None
        return lua.wants_cpu_back(now_ns, self.kernel.quantum_ns, others_waiting)

    def kill(self, proc: Process) -> None:
        self.kernel.scheduler.interrupt(proc)  # its own thread ends it at the next check

    def exit(self, proc: Process, result: Any) -> None:
        raise FailedPrecondition("a Lua process sets its result with sys.exit or its return value")

    def ended(self, proc: Process) -> None:
        pass  # its state goes with proc.runtime

    def shutdown(self) -> None:
        pass

    def run_slice(self, proc: Process) -> None:
        kernel = self.kernel
        with kernel.lock:
            if proc.ended:
                return
            if proc.kill_reason is not None:
                _end_killed(kernel, proc)
                return
            proc.state = P.RUNNING
        lua = proc.runtime
        if lua is None:
            try:
                bridge = DurableLuaProcess if proc.pid in kernel.journals else LuaProcess
                lua = proc.runtime = bridge(kernel, proc)
            except Exception as e:  # a memory limit too small for a Lua state
                with kernel.lock:
                    kernel.end_locked(proc, P.CRASHED, "error", error=_startup_error(str(e), isinstance(e, MemoryError)))
                return
            args: tuple = ()
        else:
            args = self._resume_args(proc)
        while True:
            # The core runs the process, and whoever it hands the CPU to when
            # it blocks in a receive (a reply it is waiting for): `proc` is the
            # one that ran last, `out` what it yielded (None: blocked already).
            proc, out = kernel.core.run(proc, args)
            if out is None:
                return
            lua = proc.runtime
            kind = out[0]
            if kind == b"sys":
                name = out[1].decode()
                if lua.journal is not None and name != "exit":  # a durable process's (kernel/journal.py)
                    replayed = lua.replayed(name, out[2:])
                    if replayed is not _LIVE and proc.kill_reason is None:
                        args = replayed
                        continue
                    lua.pending_call = (name, out[2:])
                with kernel.lock:
                    if proc.kill_reason is not None:
                        _end_killed(kernel, proc)
                        return
                    answer = self._blocking_syscall(proc, name, out[2:])
                    if answer is None:
                        return  # blocked, or ended
                args = lua.answer(name, answer)
                if time.perf_counter_ns() - lua.state.slice_start >= kernel.quantum_ns and kernel.scheduler.should_yield(proc):
                    with kernel.lock:
                        proc.state = P.RUNNABLE
                        proc.resume_value = _Ready(args)
                    kernel.scheduler.requeue(proc)
                    return
                continue
            with kernel.lock:
                if kind == b"unstarted":  # the sandbox could not be built (its first step)
                    kernel.end_locked(proc, P.CRASHED, "error", error=_startup_error(out[1].decode(), out[2]))
                elif kind == b"done":
                    try:
                        result = self._result(out[1], "result")
                    except KernelError as e:
                        kernel.end_locked(proc, P.CRASHED, "error", error=f"cannot return the result: {e}")
                    else:
                        kernel.end_locked(proc, P.EXITED, "normal", result=result)
                else:
                    text = error_text(out[1])
                    dying = out[2].decode() if len(out) > 2 and out[2] is not None else None
                    if proc.kill_reason is not None:
                        _end_killed(kernel, proc)
                    elif dying == "memory_limit" or text == MEMORY_ERROR:
                        kernel.end_locked(proc, P.KILLED, "memory_limit", error=MEMORY_ERROR)
                    else:
                        kernel.end_locked(proc, P.CRASHED, "error", error=text)
            return

    def _result(self, value: Any, what: str) -> Any:
        """A Lua process's result, checked as a message body is: whatever is stored can be returned."""
        return C.value(from_lua(value, what), what, self.kernel.config.max_message_bytes)

    def _resume_args(self, proc: Process) -> tuple:
        value, proc.resume_value = proc.resume_value, ()
        if isinstance(value, _Ready):
            return value.args
        if isinstance(value, ProcessRecord):  # a wait that blocked
            value = describe_record(value)
        return proc.runtime.answer(proc.blocked_syscall, None if value is TIMED_OUT else value)

    def _blocking_syscall(self, proc: Process, name: str, args: tuple) -> Any:
        """Handle a yielded syscall (lock held). Returns the answer if it is ready,
        or None after blocking (or ending) the process."""
        kernel = self.kernel
        lua = proc.runtime
        if name == "exit":
            try:
                result = self._result(args[0] if args else None, "sys.exit")
            except KernelError as e:
                kernel.end_locked(proc, P.CRASHED, "error", error=f"cannot return the result: {e}")
                return None
            kernel.end_locked(proc, P.EXITED, "normal", result=result)
            return None
        waiter = LuaWaiter(kernel, proc)
        # Blocked before registering: a waiter may complete at once (from this thread).
        proc.state, proc.blocked_on, proc.blocked_syscall, proc.waiter = P.BLOCKED, name, name, waiter
        try:
            answer = self._register_waiter(proc, lua, name, args, waiter)
        except KernelError as e:
            answer = e
        if answer is not None:
            waiter.abandon()
            proc.state, proc.blocked_on, proc.waiter = P.RUNNING, None, None
        return answer

    def _register_waiter(self, proc: Process, lua: LuaProcess, name: str, args: tuple, waiter: Waiter) -> Any:
        block = _BLOCKS.get(name)
        if block is None:
            raise InvalidArgument(f"unknown syscall {name!r}")
        return block(self, proc, lua, args, waiter)

    # The syscalls a Lua program yields (the table's `yields`): each answers now, or returns
    # None with `waiter` registered to complete when the answer is ready (kernel lock held).
    def block_recv(self, proc: Process, lua: LuaProcess, args: tuple, waiter: Waiter) -> Any:
        match = lua.recv_match(*args[:4])
        timeout = C.timeout_s(args[3], "sys.recv: timeout_ms")
        if len(args) > 4:  # (..., ack, lease_ms): given only by a receive with either option
            lease = lua.recv_lease(*args[4:6])
            if lease is not False:
                return self.kernel.acks.recv_locked(proc, match, waiter, timeout, lease)
        return self.kernel.recv_locked(proc.pid, match, waiter, timeout, lua.caller)

    def block_wait(self, proc: Process, lua: LuaProcess, args: tuple, waiter: Waiter) -> Any:
        pid, timeout_ms = arguments("wait", pid=args[0] if args else None,
                                    timeout_ms=args[1] if len(args) > 1 else None)
        if pid == proc.pid:
            raise InvalidArgument("sys.wait: a process cannot wait for itself")
        rec = self.kernel.wait_locked(pid, waiter, None if timeout_ms is None else timeout_ms / 1000, lua.caller)
        return describe_record(rec) if rec is not None else None

    def block_sleep(self, proc: Process, lua: LuaProcess, args: tuple, waiter: Waiter) -> Any:
        (ms,) = arguments("sleep", ms=args[0] if args else None)
        self.kernel.arm_timeout(waiter, ms / 1000)
        return None

    def block_lock_acquire(self, proc: Process, lua: LuaProcess, args: tuple, waiter: Waiter) -> Any:
        lock_name, kind, permits, timeout = lua.lock_options(args[0], args[1], "sys.lock.acquire")
        return self.kernel.sync.acquire(proc.namespace, lock_name, proc.pid, proc.priority, waiter, timeout, kind,
                                        permits)

    def block_cond_wait(self, proc: Process, lua: LuaProcess, args: tuple, waiter: Waiter) -> Any:
        if lua.journal is not None:
            raise Unimplemented("sys.cond.wait: not in durable processes yet (a restart in the middle of a wait "
                                "has no defined outcome); wait for a message instead")
        name, lock_name, timeout = lua.cond_wait_args(*args[:3])
        self.kernel.sync.cond_wait(proc.namespace, name, lock_name, proc.pid, proc.priority, waiter, timeout)
        return None

    def block_infer(self, proc: Process, lua: LuaProcess, args: tuple, waiter: Waiter) -> Any:
        inference = self.kernel.inference
        if inference is None:
            raise Unimplemented("this server runs no inference engine")
        inference.submit_from_lua(proc, waiter, from_lua(args[0] if args else None, "sys.infer"))
        return None

    def block_context_create(self, proc: Process, lua: LuaProcess, args: tuple, waiter: Waiter) -> Any:
        inference = self.kernel.inference
        if inference is None:
            raise Unimplemented("this server runs no inference engine")
        inference.create_from_lua(proc, waiter, from_lua(args[0] if args else None, "sys.context.create"))
        return None


# The syscalls Lua yields, from the syscall table; exit is no wait (_blocking_syscall ends the process).
_BLOCKS = {name: getattr(LuaRuntime, f"block_{name}") for name in sorted(LUA_YIELDS - {"exit"})}


def _end_killed(kernel: Kernel, proc: Process) -> None:
    """End `proc` for its kill_reason (lock held): a durable process whose replay diverged crashed."""
    journal = proc.runtime.journal if proc.runtime is not None else None
    if journal is not None and journal.divergence is not None:
        kernel.end_locked(proc, P.CRASHED, REPLAY_DIVERGENCE, error=journal.divergence)
    else:
        kernel.end_locked(proc, P.KILLED, proc.kill_reason)


def _startup_error(text: str, out_of_memory: bool) -> str:
    if out_of_memory or "memory" in text.lower():
        return "not enough memory to start (raise limits.memory_bytes)"
    return text

"""The kernel: the process table and the operations behind every syscall.

Every syscall, whether from an RPC or from a Lua program, lands in one of the
public methods here, or, for messages between Lua processes, in the C core
(`self.core`, see _core.c), which changes the same process table and
mailboxes. State changes happen under one lock (`self.lock`, a C lock both
sides take), held only for bookkeeping, never while program code runs or an
RPC waits.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections import OrderedDict
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..api import checks as C
from . import process as P
from ..api.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, KernelError, NotFound, PermissionDenied, ResourceExhausted,
    Unimplemented,
)
from ..lua.runtime import MEMORY_ERROR, LuaProcess, error_text, from_lua, lua_syntax_error
from .mailbox import Mailbox, Match, Message
from ..native import _lua
from .process import Limits, Process
from .scheduler import Scheduler
from .store import ProcessRecord, Store, StoredMessage, now_ms
from .waiting import TIMED_OUT, Timers, Waiter
from ..services.files import FileLimits, FileStore
from .logs import MAX_LINES as MAX_LOG_LINES, Logs
from ..python.runtime import Agents, PythonProcess
from ..services.sync import SyncTable

log = logging.getLogger(__name__)

NOTICE_HEADROOM = 64 << 10  # what an EXIT notice may take beyond the message limit (see _send_exit_notice)
MAX_ERROR = 16 << 10  # characters of an exit error kept; the rest is cut
# An ended process's result stays in memory (for Wait, lists and events) only up to this size;
# a bigger one is read back from the store when asked for, and lists and events leave it out.
RESULT_KEPT_BYTES = 1024
RESULT_IN_STORE = object()  # stands for such a result in the ended cache
MAX_SPAWN_DEPTH = 100  # how deep a process tree may grow (each spawn counts against every ancestor's limit)
SPAWN_OPTIONS = frozenset(("lua", "python", "path", "args", "name", "priority", "weight", "limits", "monitor",
                           "source_name"))


@dataclass
class KernelConfig:
    data_dir: str
    cpus: int = 0  # 0: one per core
    quantum_ms: float = 10.0
    aging_ms: float = 200.0  # a waiting process gains a priority level per this much waiting
    # About 0.2 ms of Lua here: fine-grained enough for a 10 ms quantum and
    # prompt kills, rare enough that the hook costs about 1%.
    hook_instructions: int = 100_000
    defaults: Limits = field(default_factory=lambda: Limits(
        memory_bytes=64 << 20, mailbox=10_000, mailbox_bytes=64 << 20, processes=16_384))
    userland_root: str | None = None
    max_message_bytes: int = 4 << 20
    max_processes: int = 65_536  # live processes and ports in the whole server
    process_log_bytes: int = 256 << 10  # characters of log a process keeps (the oldest lines go first)
    log_memory_bytes: int = 64 << 20  # characters of log kept in memory in all (ended processes' go first)
    file_limits: FileLimits = field(default_factory=FileLimits)
    agent_socket: str | None = None  # the Unix socket Python agents reach the kernel on; None: no Python userland
    python_memory_bytes: int = 1 << 30  # default address-space limit of a Python agent (an interpreter needs more)
    max_agents: int = 64  # live Python agents at once (each is an interpreter: ~30 MiB idle); 0: no limit
    ended_cache: int = 100_000  # ended processes kept in memory for Wait; older ones are read from the store

    @property
    def quantum_s(self) -> float:
        return self.quantum_ms / 1000.0


@dataclass
class SpawnSpec:
    """What Spawn takes, checked by the syscall layer or the Lua bridge."""

    lua: str | None = None
    python: str | None = None
    path: str | None = None
    args: Any = None
    name: str | None = None
    priority: int = 0
    weight: int = 0  # 0: the default weight
    source_name: str | None = None  # what errors call lua/python source (default "program")
    limits: Limits = field(default_factory=Limits)
    parent: int = 0
    monitor: bool = False
    log_to_server: bool = False  # also write the process's log lines to the server's log (boot programs)


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


class Kernel:
    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        self.lock = _lua.Lock()  # not re-entrant: methods named *_locked expect it held
        self.store = Store(config.data_dir)
        self.timers = Timers()
        self.sync = SyncTable(self.lock, self.timers)
        self.files = FileStore(pathlib.Path(config.data_dir) / "files", config.file_limits)
        self.agents: Agents | None = None
        if config.agent_socket:
            roots = (pathlib.Path(config.userland_root),) if config.userland_root else ()
            self.agents = Agents(pathlib.Path(config.data_dir) / "python", pathlib.Path(config.agent_socket), roots,
                                 config.max_agents)
        self.quantum_ns = int(config.quantum_ms * 1_000_000)
        self.scheduler = Scheduler(
            config.cpus or os.cpu_count() or 1, self.quantum_ns, self._run_slice, self._wants_cpu_back,
            aging_ns=int(config.aging_ms * 1_000_000),
        )
        self.procs: dict[int, Process] = {}
        # The C side: messages between Lua processes, and switching between them.
        self.core = _lua.Core(self.lock, self.procs, self.scheduler, lambda: self.store.take_ids("message"),
                              self.quantum_ns, Process, config.max_message_bytes)
        self.logs = Logs(config.process_log_bytes, config.log_memory_bytes)
        self.names: dict[str, int] = {}
        self.ended: OrderedDict[int, ProcessRecord] = OrderedDict()
        self.event_listeners: list[Callable[[str, ProcessRecord], None]] = []
        self.inference: Any = None  # set by the server when an engine is configured
        self._recover()

    # -- start-up and shutdown ------------------------------------------------------------
    def _recover(self) -> None:
        """Bring back ports with their messages; processes that were alive when the
        server went down end with reason "server_restart"."""
        for rec in self.store.live_records():
            if rec.kind == P.PORT:
                proc = self._new_process(rec.pid, P.PORT, rec.parent, rec.priority, Limits(**rec.limits), rec.namespace)
                proc.started_at_ms = rec.started_at_ms
                for m in self.store.port_messages(rec.pid):
                    proc.mailbox.deliver(
                        Message(m.id, m.sender, m.port, m.tag, m.body, m.data, m.correlation_id, m.sent_at_ms),
                        limited=False,
                    )
                if rec.name:
                    proc.name = rec.name
                    self.names[rec.name] = rec.pid
                self.procs[rec.pid] = proc
            else:
                rec.state, rec.exit_reason, rec.ended_at_ms = P.KILLED, "server_restart", now_ms()
                self.store.record_exit(rec, durable=True)

    def shutdown(self) -> None:
        with self.lock:
            live = [p for p in self.procs.values() if p.kind != P.PORT and not p.ended]
        for proc in live:
            self.kill(proc.pid, "shutdown")
        if self.inference is not None:
            self.inference.stop()
        if self.agents is not None:
            self.agents.shutdown()
        self.scheduler.stop()
        self.timers.stop()
        self.store.close()
        self.files.close()

    # -- process creation ------------------------------------------------------------------
    def _new_process(self, pid: int, kind: str, parent: int, priority: int, limits: Limits, namespace: str) -> Process:
        return Process(
            pid=pid, kind=kind, parent=parent, namespace=namespace, priority=priority, max_priority=priority,
            limits=limits, started_at_ms=now_ms(),
            mailbox=Mailbox(pid, limits.mailbox, self.core, durable=kind == P.PORT, byte_limit=limits.mailbox_bytes),
        )

    def spawn(self, spec: SpawnSpec) -> int:
        kind, source, program_name, program_path = self._resolve_program(spec)
        if spec.name is not None:
            C.name(spec.name)
        priority, weight = C.priority(spec.priority), C.weight(spec.weight or C.DEFAULT_WEIGHT)
        args = C.value(spec.args, "args", self.config.max_message_bytes)
        defaults = self.config.defaults
        if kind == P.PYTHON:
            if self.agents is None:
                raise Unimplemented("this server runs no Python userland (start llmosd with an agent socket)")
            check_python_syntax(source, program_name)
            defaults = Limits(**{**defaults.as_dict(), "memory_bytes": self.config.python_memory_bytes})
        else:
            check_syntax(source, program_name)
        limits = spec.limits.with_defaults(defaults)
        with self.lock:
            if spec.parent:
                parent = self.live_locked(spec.parent, "parent")
                if limits is not parent.limits:  # the shared defaults are within themselves
                    limits = _child_limits(parent, spec.limits, limits, kind)
                if priority > parent.max_priority:
                    raise PermissionDenied(f"a child's priority is at most its parent's ({parent.max_priority}), "
                                           f"not {priority}")
                lineage = (parent.pid,) + parent.ancestors
                ancestors = self._ancestors_with_room(lineage)
            elif spec.monitor:
                raise InvalidArgument("monitor needs a parent pid")
            else:
                lineage, ancestors = (), []
            if len(self.procs) >= self.config.max_processes:
                raise ResourceExhausted(f"the server runs its limit of {self.config.max_processes} processes")
            if spec.name and spec.name in self.names:
                raise AlreadyExists(f"the name {spec.name!r} is registered to pid {self.names[spec.name]}")
            pid = self.store.next_id("pid")
            proc = self._new_process(pid, kind, spec.parent, priority, limits, "default")
            proc.program, proc.program_name, proc.args = source, program_name, args
            proc.weight = weight
            proc.ancestors = lineage
            if kind == P.PYTHON:
                proc.runtime = PythonProcess(self, proc, program_path)
            proc.log_to_server = spec.log_to_server
            if spec.name:
                proc.name = spec.name
                self.names[spec.name] = pid
            if spec.monitor:
                proc.monitored_by.add(spec.parent)
            for ancestor in ancestors:
                ancestor.descendants += 1
            self.procs[pid] = proc
            self.store.record_spawn(proc)
            if limits.wall_ms:
                proc.wall_timer = self.timers.call_later(limits.wall_ms / 1000, lambda: self.kill(pid, "wall_limit"))
            self._emit("spawned", proc)
        self.scheduler.make_runnable(proc, new=True)
        return pid

    def _ancestors_with_room(self, lineage: tuple[int, ...]) -> list[Process]:
        """The live processes of a new child's `lineage` (its parent, grandparent...
        including those below an ancestor that ended); each must have room for
        one more descendant (lock held)."""
        if len(lineage) > MAX_SPAWN_DEPTH:
            raise ResourceExhausted(f"process trees are at most {MAX_SPAWN_DEPTH} levels deep")
        live = []
        for pid in lineage:
            proc = self.procs.get(pid)
            if proc is None:
                continue
            if proc.limits.processes and proc.descendants >= proc.limits.processes:
                raise ResourceExhausted(
                    f"pid {proc.pid} has its limit of {proc.limits.processes} live descendants (limits.processes)")
            live.append(proc)
        return live

    def spawn_from_dict(self, spec: dict, parent: int) -> int:
        """Spawn from the table a Lua program passed to sys.spawn."""
        if not SPAWN_OPTIONS.issuperset(spec):
            unknown = ", ".join(sorted(set(spec) - SPAWN_OPTIONS))
            raise InvalidArgument(f"sys.spawn: unknown option(s) {unknown}")
        limits = spec.get("limits") or {}
        if not isinstance(limits, dict):
            raise InvalidArgument(f"sys.spawn: limits must be a table of {', '.join(Limits.__slots__)}")
        for key in ("lua", "python", "path", "name", "source_name"):
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise InvalidArgument(f"sys.spawn: {key} must be a string")
        return self.spawn(SpawnSpec(
            lua=spec.get("lua"), python=spec.get("python"), path=spec.get("path"), args=spec.get("args"),
            name=spec.get("name"), priority=C.integer(spec.get("priority", 0), "sys.spawn: priority"),
            weight=C.integer(spec.get("weight", 0), "sys.spawn: weight"),
            limits=C.limits(limits, "sys.spawn: limits"), parent=parent, monitor=bool(spec.get("monitor")),
            source_name=spec.get("source_name"),
        ))

    def _resolve_program(self, spec: SpawnSpec) -> tuple[str, str, str, pathlib.Path | None]:
        """(kind, source, name for tracebacks, the file if given by path)."""
        given = [k for k in ("lua", "python", "path") if getattr(spec, k) is not None]
        if len(given) != 1:
            raise InvalidArgument("give exactly one program: lua (source), python (source) or path")
        source_name = "program" if spec.source_name is None else C.name(spec.source_name, "source_name")
        if spec.lua is not None:
            return P.LUA, spec.lua, source_name, None
        if spec.python is not None:
            return P.PYTHON, spec.python, source_name, None
        root = self.config.userland_root
        if not root:
            raise FailedPrecondition("this server has no userland root (--userland-root) to load programs from")
        rel = C.program_path(spec.path)
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not full.startswith(os.path.realpath(root) + os.sep):
            raise InvalidArgument(f"path {rel!r} must be relative and inside the userland root")
        if full.endswith(".lua"):
            kind = P.LUA
        elif full.endswith(".py"):
            kind = P.PYTHON
        else:
            raise InvalidArgument(f"path {rel!r}: programs end in .lua or .py")
        try:
            with open(full, encoding="utf-8") as f:
                return kind, f.read(), rel, pathlib.Path(full)
        except FileNotFoundError:
            raise NotFound(f"no program at {rel!r} under the userland root") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"cannot read program {rel!r}: {e}") from None

    def open_port(self, name: str | None = None, mailbox: int = 0) -> int:
        if name is not None:
            C.name(name)
        with self.lock:
            if name and name in self.names:
                raise AlreadyExists(f"the name {name!r} is registered to pid {self.names[name]}")
            if len(self.procs) >= self.config.max_processes:
                raise ResourceExhausted(f"the server runs its limit of {self.config.max_processes} processes")
            pid = self.store.next_id("pid")
            defaults = self.config.defaults
            limits = Limits(mailbox=mailbox or defaults.mailbox, mailbox_bytes=defaults.mailbox_bytes)
            proc = self._new_process(pid, P.PORT, 0, 0, limits, "default")
            proc.state = P.RUNNABLE
            if name:
                proc.name = name
                self.names[name] = pid
            self.procs[pid] = proc
            self.store.record_spawn(proc, durable=True)
            self._emit("spawned", proc)
        return pid

    # -- lookup ---------------------------------------------------------------------------
    def release_lock(self, pid: int, name: str) -> None:
        with self.lock:
            holder = self.live_locked(pid, "holder")
            self.sync.release(holder.namespace, name, pid)

    def live_locked(self, pid: int, role: str = "process") -> Process:
        """The live process `pid`, or NotFound / FailedPrecondition (ended). Lock held."""
        proc = self.procs.get(pid)
        if proc is None:
            if pid in self.ended or self._ended_record(pid) is not None:
                raise FailedPrecondition(f"{role} pid {pid} has ended")
            raise NotFound(f"no process with pid {pid}")
        return proc

    def _ended_record(self, pid: int) -> ProcessRecord | None:
        rec = self.ended.get(pid)
        if rec is None or rec.result is RESULT_IN_STORE:
            if not 0 < pid <= C.MAX_PID:  # the store holds only pids it gave out
                return None
            rec = self.store.load_process(pid)
            if rec is not None and rec.ended_at_ms is None:
                return None
        return rec

    def resolve(self, target: int | str) -> Process:
        if isinstance(target, str):
            pid = self.names.get(target)
            if pid is None:
                raise NotFound(f"no process is registered as {target!r}")
            return self.procs[pid]
        return self.live_locked(target, "receiver")

    def whereis(self, name: str) -> int | None:
        with self.lock:
            return self.names.get(name)

    # -- messages ---------------------------------------------------------------------------
    def send(self, sender: int, to: int | str, tag: str, body: Any, data: bytes, correlation_id: str) -> int:
        with self.lock:
            src = self.procs.get(sender) if sender else None
            if src is None and sender:
                self.live_locked(sender, "sender")  # raises the right error
            dst = self.procs.get(to) if type(to) is int else None
            if dst is None:
                dst = self.resolve(to)
            msg = self.core.new_message(sender, dst.pid, tag, body, data, correlation_id)
            self._deliver(dst, msg)
            if src is not None:
                src.mailbox.sent += 1
            return msg.id

    def _deliver(self, dst: Process, msg: Message, limited: bool = True) -> None:
        """Put `msg` in `dst`'s mailbox or straight into a waiting receiver's hands.
        A port's message is acknowledged only once stored, unless taken at once.
        Kernel notices (EXIT) are not `limited`: a process sends at most one,
        and dropping one would leave a monitor waiting forever."""
        if dst.kind == P.PORT and not any(match.accepts(msg) for _, match in dst.mailbox.receivers):
            if limited:
                dst.mailbox.check_room(msg)
            self._store_port_message(msg)
        dst.mailbox.deliver(msg, limited)

    def try_recv(self, pid: int, match: Match) -> Message | None:
        with self.lock:
            return self._take_locked(self.procs.get(pid) or self.live_locked(pid, "receiver"), match)

    def _take_locked(self, proc: Process, match: Match) -> Message | None:
        msg = proc.mailbox.take(match)
        if msg is not None and proc.kind == P.PORT:
            self.store.delete_message(msg.id)
        return msg

    def recv(self, pid: int, match: Match, waiter: Waiter, timeout_s: float | None) -> Message | None:
        """Take a matching message now, or register `waiter` to get one (None)."""
        with self.lock:
            return self._recv_locked(pid, match, waiter, timeout_s)

    def _recv_locked(self, pid: int, match: Match, waiter: Waiter, timeout_s: float | None) -> Message | None:
        proc = self.procs.get(pid) or self.live_locked(pid, "receiver")
        msg = self._take_locked(proc, match)
        if msg is not None:
            return msg
        proc.mailbox.wait(waiter, match)
        self._arm_timeout(waiter, timeout_s)
        return None

    def put_back(self, pid: int, msg: Message) -> None:
        """An RPC took `msg` but could not hand it to its client: keep it."""
        with self.lock:
            proc = self.procs.get(pid)
            if proc is None:
                return
            if proc.kind == P.PORT:
                self._store_port_message(msg)
            proc.mailbox.put_back(msg)

    def _store_port_message(self, msg: Message) -> None:
        self.store.put_message(StoredMessage(
            msg.id, msg.to, msg.sender, msg.tag, msg.body, msg.data, msg.correlation_id, msg.sent_at_ms,
        ))

    def _arm_timeout(self, waiter: Waiter, timeout_s: float | None) -> None:
        self.timers.time_out(self.lock, waiter, timeout_s)

    # -- exits -----------------------------------------------------------------------------
    def wait(self, pid: int, waiter: Waiter, timeout_s: float | None) -> ProcessRecord | None:
        """The final record of `pid` if it has ended, else register `waiter` (None)."""
        with self.lock:
            return self._wait_locked(pid, waiter, timeout_s)

    def _wait_locked(self, pid: int, waiter: Waiter, timeout_s: float | None) -> ProcessRecord | None:
        proc = self.procs.get(pid)
        if proc is None:
            rec = self._ended_record(pid)
            if rec is None:
                raise NotFound(f"no process with pid {pid}")
            return rec
        waiter.register(proc.exit_waiters, waiter)
        self._arm_timeout(waiter, timeout_s)
        return None

    def kill(self, pid: int, reason: str = "killed") -> bool:
        """End `pid` with `reason`; False if it had already ended."""
        C.text(reason, "reason")
        with self.lock:
            proc = self.procs.get(pid)
            if proc is None:
                if self._ended_record(pid) is not None:
                    return False
                raise NotFound(f"no process with pid {pid}")
            if proc.kind == P.PORT or proc.state in (P.BLOCKED, P.RUNNABLE):
                # Not running any code (a preempted process stays RUNNING): end it now.
                self.end_locked(proc, P.KILLED, reason)
            elif proc.kind == P.PYTHON:
                # Its exit, reported by the fork server, ends it with this reason.
                proc.kill_reason = reason
                proc.runtime.terminate()
            elif proc.kill_reason is None:
                # Running (or parked mid-slice): its own thread ends it at the next check.
                proc.kill_reason = reason
                self.scheduler.interrupt(proc)
            return True

    def end_locked(self, proc: Process, state: str, reason: str, result: Any = None, error: str | None = None) -> None:
        """Record the end of `proc` and tell everyone who asked (lock held)."""
        if proc.ended:
            return
        proc.state, proc.blocked_on = state, None
        if proc.waiter is not None:
            proc.waiter.abandon()
            proc.waiter = None
        if proc.wall_timer is not None:
            proc.wall_timer.cancel()
        proc.mailbox.close()
        self.sync.process_ended(proc.pid)
        self.files.process_ended(proc.pid)
        if proc.kind == P.PORT:
            self.store.delete_port_messages(proc.pid)
        del self.procs[proc.pid]
        for pid in proc.ancestors:
            ancestor = self.procs.get(pid)
            if ancestor is not None:
                ancestor.descendants -= 1
        if proc.name and self.names.get(proc.name) == proc.pid:
            del self.names[proc.name]
        if error is not None and len(error) > MAX_ERROR:
            error = f"{error[:MAX_ERROR]} ... [{len(error) - MAX_ERROR} characters cut]"
        rec = self._record(proc)
        rec.usage = self.usage(proc)
        rec.exit_reason, rec.result, rec.error, rec.ended_at_ms = reason, result, error, now_ms()
        self.store.record_exit(rec, durable=proc.kind == P.PORT)
        kept = rec if _fits(result, RESULT_KEPT_BYTES) else dataclasses.replace(rec, result=RESULT_IN_STORE)
        self.ended[proc.pid] = kept
        if len(self.ended) > self.config.ended_cache:
            self.logs.forget(self.ended.popitem(last=False)[0])
        for waiter in proc.exit_waiters:
            waiter.queue = None
            waiter.complete(rec)
        proc.exit_waiters.clear()
        for watcher in proc.monitored_by:
            if watcher in self.procs:
                self._send_exit_notice(watcher, rec)
        if proc.kind == P.PYTHON:
            self.logs.replace(proc, proc.runtime.log_lines(MAX_LOG_LINES))  # in place: `rec` shares the list
            proc.runtime.release()
        if self.inference is not None:
            self.inference.process_ended(proc.pid)  # its conversation contexts
        self.logs.ended(proc, rec)
        proc.runtime = None
        if proc.log_to_server:
            log.info("pid %d ended: %s (%s) %s", proc.pid, state, reason, error or json.dumps(result))
        self._emit("ended", kept)

    # -- names, monitors, priorities -------------------------------------------------------
    def register(self, pid: int, name: str) -> None:
        C.name(name)
        with self.lock:
            proc = self.live_locked(pid)
            owner = self.names.get(name)
            if owner is not None and owner != pid:
                raise AlreadyExists(f"the name {name!r} is registered to pid {owner}")
            if proc.name and proc.name != name:
                del self.names[proc.name]
            proc.name = name
            self.names[name] = pid
            self.store.record_name(pid, name)

    def monitor(self, watcher: int, target: int) -> None:
        with self.lock:
            self.live_locked(watcher, "watcher")
            proc = self.procs.get(target)
            if proc is not None:
                proc.monitored_by.add(watcher)
                return
            rec = self._ended_record(target)
            if rec is None:
                raise NotFound(f"no process with pid {target}")
            # Already ended: tell the watcher at once, as Erlang does. Asked
            # for, so it counts against the mailbox's limits like any message:
            # asking again and again must not flood the watcher.
            self._send_exit_notice(watcher, rec, limited=True)

    def _send_exit_notice(self, watcher: int, rec: ProcessRecord, limited: bool = False) -> None:
        """A process sends at most one notice to each watcher when it ends, and
        it is never refused, or a monitor would wait for ever: its result is a
        value of at most a message's size, and its error is cut short, so the
        notice fits the headroom the limit has for it."""
        notice = {"pid": rec.pid, "state": rec.state, "reason": rec.exit_reason, "result": rec.result,
                  "error": rec.error}
        msg = self.core.new_message(rec.pid, watcher, "EXIT", notice, b"", "", NOTICE_HEADROOM)
        self._deliver(self.procs[watcher], msg, limited)

    def set_priority(self, pid: int, priority: int | None, weight: int = 0, caller: int | None = None) -> None:
        """Change priority (None: keep) and weight (0: keep). A process (`caller`)
        may set a priority up to the target's ceiling and its own, never above:
        no program raises itself over what it was given. An external client
        may set any priority in range, which becomes the ceiling. A queued
        process moves at its next scheduling."""
        if priority is not None:
            priority = C.priority(priority)
        if weight:
            weight = C.weight(weight)
        with self.lock:
            proc = self.live_locked(pid)
            if priority is not None:
                if caller is None:
                    proc.max_priority = max(proc.max_priority, priority)
                else:
                    ceiling = min(proc.max_priority, self.live_locked(caller, "caller").max_priority)
                    if priority > ceiling:
                        raise PermissionDenied(f"a process may set pid {pid}'s priority up to {ceiling} (the lower "
                                               f"of its own ceiling and the target's), not {priority}")
                proc.priority = priority
            if weight:
                proc.weight = weight

    # -- inspection -----------------------------------------------------------------------
    def _record(self, proc: Process) -> ProcessRecord:
        return ProcessRecord(
            pid=proc.pid, kind=proc.kind, name=proc.name, parent=proc.parent, namespace=proc.namespace,
            priority=proc.priority, weight=proc.weight, limits=proc.limits.as_dict(),
            started_at_ms=proc.started_at_ms, state=proc.state, log=proc.log, log_dropped=proc.log_dropped,
        )

    def usage(self, proc: Process) -> dict[str, int]:
        runtime = proc.runtime
        return {
            "cpu_ms": (runtime.cpu_ns() if runtime is not None else proc.cpu_ns) // 1_000_000,
            "wall_ms": now_ms() - proc.started_at_ms,
            "messages_sent": proc.mailbox.sent,
            "messages_received": proc.mailbox.received,
            "tokens": proc.tokens,
            "memory_bytes": runtime.memory_used() if runtime is not None else 0,
            "mailbox_len": len(proc.mailbox),
            "mailbox_bytes": proc.mailbox.bytes,
            "processes": proc.descendants,
            "kv_bytes": self.inference.kv_bytes(proc.pid) if self.inference is not None else 0,
        }

    def _snapshot(self, proc: Process) -> tuple[ProcessRecord, str | None]:
        rec = self._record(proc)
        rec.usage = self.usage(proc)
        return rec, proc.blocked_on

    def get(self, pid: int) -> tuple[ProcessRecord, str | None]:
        """(record with usage, blocked_on) of a live or ended process."""
        with self.lock:
            proc = self.procs.get(pid)
            if proc is not None:
                return self._snapshot(proc)
        rec = self._ended_record(pid)
        if rec is None:
            raise NotFound(f"no process with pid {pid}")
        return rec, None

    def describe(self, pid: int | None) -> dict[str, Any]:
        """A process's state as a plain table for Lua's sys.info / sys.wait."""
        if pid is None:
            raise InvalidArgument("pid must be an integer")
        return describe_record(self.get(pid)[0])

    def list(self, states: set[str], name: str | None, parent: int, include_ended: bool,
             after_pid: int = 0) -> list[tuple]:
        """(record, blocked_on) of the processes with pids above `after_pid` that match, by pid."""
        def wanted(pid: int, state: str, pname: str | None, pparent: int) -> bool:
            return (pid > after_pid and (not states or state in states) and (not name or pname == name)
                    and (not parent or pparent == parent))

        with self.lock:
            out = [self._snapshot(p) for p in self.procs.values() if wanted(p.pid, p.state, p.name, p.parent)]
            if include_ended:
                out += [(rec, None) for rec in self.ended.values()
                        if wanted(rec.pid, rec.state, rec.name, rec.parent)]
        out.sort(key=lambda t: t[0].pid)
        return out

    def log(self, proc: Process, line: str) -> None:
        with self.lock:
            line = self.logs.append(proc, line)
        log.log(logging.INFO if proc.log_to_server else logging.DEBUG, "pid %d: %s", proc.pid, line)

    def read_log(self, pid: int, offset: int) -> tuple[list[str], int, int]:
        """(lines from `offset` on, next offset, lines dropped before offset)."""
        with self.lock:
            proc = self.procs.get(pid)
            runtime = proc.runtime if proc is not None and proc.kind == P.PYTHON else None
        if runtime is not None:  # an agent's log is its output file
            lines, dropped = runtime.log_lines(MAX_LOG_LINES), 0
            return lines[offset:], len(lines), 0
        rec = self.get(pid)[0]
        lines, dropped = list(rec.log or ()), rec.log_dropped
        start = max(offset - dropped, 0)
        return lines[start:], dropped + len(lines), max(dropped - offset, 0)

    def _emit(self, kind: str, proc_or_rec: Process | ProcessRecord) -> None:
        if not self.event_listeners:
            return
        rec = proc_or_rec if isinstance(proc_or_rec, ProcessRecord) else self._record(proc_or_rec)
        for listener in self.event_listeners:
            listener(kind, rec)

    # -- running Lua processes -----------------------------------------------------------
    def _wants_cpu_back(self, proc: Process, now_ns: int, others_waiting: bool) -> int | None:
        lua = proc.runtime
        if proc.kind != P.LUA or lua is None:
            return None
        return lua.wants_cpu_back(now_ns, self.quantum_ns, others_waiting)

    def _run_slice(self, proc: Process) -> None:
        """Run `proc` on this worker until it blocks, ends, or used its quantum."""
        try:
            if proc.kind == P.PYTHON:
                agent = proc.runtime  # None once ended: killed while it was queued
                if agent is not None:
                    agent.run_slice()
            else:
                self._run_lua_slice(proc)
        except Exception as e:  # a kernel bug: end the process rather than leave it stuck RUNNING
            log.exception("pid %d: kernel error", proc.pid)
            with self.lock:
                self.end_locked(proc, P.CRASHED, "error", error=f"kernel error: {e!r}")

    def python_blocking(self, pid: int, syscall: str) -> None:
        """An agent is about to wait in `syscall`: its CPU goes to someone else."""
        with self.lock:
            proc = self.procs.get(pid)
            if proc is not None and proc.kind == P.PYTHON and proc.state == P.RUNNING:
                proc.state, proc.blocked_on = P.BLOCKED, syscall
                proc.runtime.wake.set()

    def python_resumed(self, pid: int) -> None:
        """An agent's wait is over: it may run again when scheduled."""
        with self.lock:
            proc = self.procs.get(pid)
            if proc is None or proc.kind != P.PYTHON or proc.state != P.BLOCKED:
                return
            proc.state, proc.blocked_on = P.RUNNABLE, None
            if proc.runtime.in_slice:
                proc.runtime.requeue_after_slice = True
                return
        self.scheduler.make_runnable(proc)

    def set_result(self, pid: int, result: Any) -> None:
        """Exit: an agent's result before it ends; for a port, closing it."""
        C.value(result, "result", self.config.max_message_bytes)
        with self.lock:
            proc = self.live_locked(pid)
            if proc.kind == P.PORT:
                self.end_locked(proc, P.EXITED, "normal", result=result)
            elif proc.kind == P.PYTHON:
                proc.runtime.result = result
            else:
                raise FailedPrecondition("a Lua process sets its result with sys.exit or its return value")

    def _run_lua_slice(self, proc: Process) -> None:
        with self.lock:
            if proc.ended:
                return
            if proc.kill_reason is not None:
                self.end_locked(proc, P.KILLED, proc.kill_reason)
                return
            proc.state = P.RUNNING
        lua = proc.runtime
        if lua is None:
            try:
                lua = proc.runtime = LuaProcess(self, proc)
            except Exception as e:  # a memory limit too small for a Lua state
                with self.lock:
                    self.end_locked(proc, P.CRASHED, "error", error=_startup_error(str(e), isinstance(e, MemoryError)))
                return
            args: tuple = ()
        else:
            args = self._resume_args(proc)
        while True:
            # The core runs the process, and whoever it hands the CPU to when
            # it blocks in a receive (a reply it is waiting for): `proc` is the
            # one that ran last, `out` what it yielded (None: blocked already).
            proc, out = self.core.run(proc, args)
            if out is None:
                return
            lua = proc.runtime
            kind = out[0]
            if kind == b"sys":
                name = out[1].decode()
                with self.lock:
                    if proc.kill_reason is not None:
                        self.end_locked(proc, P.KILLED, proc.kill_reason)
                        return
                    answer = self._blocking_syscall(proc, name, out[2:])
                    if answer is None:
                        return  # blocked, or ended
                args = lua.answer(name, answer)
                if time.perf_counter_ns() - lua.state.slice_start >= self.quantum_ns and self.scheduler.should_yield(proc):
                    with self.lock:
                        proc.state = P.RUNNABLE
                        proc.resume_value = _Ready(args)
                    self.scheduler.requeue(proc)
                    return
                continue
            with self.lock:
                if kind == b"unstarted":  # the sandbox could not be built (its first step)
                    self.end_locked(proc, P.CRASHED, "error", error=_startup_error(out[1].decode(), out[2]))
                elif kind == b"done":
                    try:
                        result = self._lua_result(out[1], "result")
                    except KernelError as e:
                        self.end_locked(proc, P.CRASHED, "error", error=f"cannot return the result: {e}")
                    else:
                        self.end_locked(proc, P.EXITED, "normal", result=result)
                else:
                    text = error_text(out[1])
                    dying = out[2].decode() if len(out) > 2 and out[2] is not None else None
                    if proc.kill_reason is not None:
                        self.end_locked(proc, P.KILLED, proc.kill_reason)
                    elif dying == "memory_limit" or text == MEMORY_ERROR:
                        self.end_locked(proc, P.KILLED, "memory_limit", error=MEMORY_ERROR)
                    else:
                        self.end_locked(proc, P.CRASHED, "error", error=text)
            return

    def _lua_result(self, value: Any, what: str) -> Any:
        """A Lua process's result, checked as a message body is: whatever is stored can be returned."""
        return C.value(from_lua(value, what), what, self.config.max_message_bytes)

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
        lua = proc.runtime
        if name == "exit":
            try:
                result = self._lua_result(args[0] if args else None, "sys.exit")
            except KernelError as e:
                self.end_locked(proc, P.CRASHED, "error", error=f"cannot return the result: {e}")
                return None
            self.end_locked(proc, P.EXITED, "normal", result=result)
            return None
        waiter = LuaWaiter(self, proc)
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
        if name == "recv":
            match = lua.recv_match(*args[:4])
            return self._recv_locked(proc.pid, match, waiter, C.timeout_s(args[3], "sys.recv: timeout_ms"))
        if name == "wait":
            pid = C.pid(args[0] if args else None, "sys.wait: pid")
            timeout = C.timeout_s(args[1] if len(args) > 1 else None, "sys.wait: timeout_ms")
            if pid == proc.pid:
                raise InvalidArgument("sys.wait: a process cannot wait for itself")
            rec = self._wait_locked(pid, waiter, timeout)
            return describe_record(rec) if rec is not None else None
        if name == "sleep":
            self._arm_timeout(waiter, C.duration_ms(args[0] if args else None, "sys.sleep: ms") / 1000)
            return None
        if name == "lock_acquire":
            lock_name, kind, permits, timeout = lua.lock_options(args[0], args[1], "sys.lock.acquire")
            return self.sync.acquire(proc.namespace, lock_name, proc.pid, proc.priority, waiter, timeout, kind, permits)
        if name == "infer":
            if self.inference is None:
                raise Unimplemented("this server runs no inference engine")
            self.inference.submit_from_lua(proc, waiter, from_lua(args[0] if args else None, "sys.infer"))
            return None
        if name == "context_create":
            if self.inference is None:
                raise Unimplemented("this server runs no inference engine")
            self.inference.create_from_lua(proc, waiter, from_lua(args[0] if args else None, "sys.context.create"))
            return None
        raise InvalidArgument(f"unknown syscall {name!r}")


class _Ready:
    """Resume values computed already (a process requeued after a syscall)."""

    __slots__ = ("args",)

    def __init__(self, args: tuple) -> None:
        self.args = args


def describe_record(rec: ProcessRecord) -> dict[str, Any]:
    info = {
        "pid": rec.pid, "name": rec.name, "parent": rec.parent, "kind": rec.kind, "state": rec.state,
        "priority": rec.priority, "weight": rec.weight, "exit_reason": rec.exit_reason, "result": rec.result, "error": rec.error,
    }
    if rec.usage is not None:
        info["usage"] = rec.usage
    return {k: v for k, v in info.items() if v is not None}


def _child_limits(parent: Process, asked: Limits, limits: Limits, kind: str) -> Limits:
    """A child's limits: at most its parent's. Asking for more is refused; a
    server default above the parent's limit is lowered to it. A Python agent's
    memory limit is its address space, which an interpreter needs far more of
    than a Lua heap: it is not bounded by a parent's (only by the server's)."""
    out = limits.as_dict()
    for key, ceiling in parent.limits.as_dict().items():
        if not ceiling or (key == "memory_bytes" and kind == P.PYTHON):
            continue
        wanted = getattr(asked, key)
        if wanted > ceiling:
            raise PermissionDenied(f"a child's limits are at most its parent's: {key} {wanted} > {ceiling}")
        if not out[key] or out[key] > ceiling:
            out[key] = ceiling
    return Limits(**out)


def _startup_error(text: str, out_of_memory: bool) -> str:
    if out_of_memory or "memory" in text.lower():
        return "not enough memory to start (raise limits.memory_bytes)"
    return text


def check_python_syntax(source: str, name: str) -> None:
    try:
        compile(source, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise InvalidArgument(f"Python syntax error: {e}") from None


def check_syntax(source: str, name: str) -> None:
    """Compile (not run) a Lua program so that Spawn can refuse a bad one."""
    err = lua_syntax_error(source, name)
    if err is not None:
        raise InvalidArgument(f"Lua syntax error: {err}")


def _fits(value: Any, limit: int) -> bool:
    """Whether a (checked) value encodes in at most `limit` bytes."""
    try:
        _lua.value_size(value, limit)
    except _lua.TooLarge:
        return False
    return True

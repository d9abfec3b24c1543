"""The kernel: the process table and the operations on it that syscalls end in.

A syscall's entry in the table (api/syscalls.py) checks its arguments and
calls a public method here, or a subsystem (services/); messages between Lua
processes take the table's C implementation of send and receive instead
(lua/fast_paths.c), which changes the same process table and mailboxes.
Running a process is its userland's (kernel/runtime.py: the kernel never
imports lua/ or python/). State changes happen under one lock (`self.lock`, a
C lock both sides take), held only for bookkeeping, never while program code
runs or an RPC waits.

Why one file: every method here keeps the same invariants of the process table under that one
lock (names, ancestors' descendant counts, monitors, mailboxes, namespaces and who may touch
what); split, each part would reach into the others' state.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import pathlib
import secrets
from collections import Counter, OrderedDict
import dataclasses
from typing import Any, Callable

from ..api import checks as C
from ..api.authority import DEFAULT_NAMESPACE, Caller, authorize, not_found
from . import process as P
from ..api.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, KernelError, NotFound, PermissionDenied, ResourceExhausted,
    Unimplemented,
)
from .mailbox import Mailbox, Match, Message
from ..native import _kernel
from .process import Limits, Process
from .namespaces import Namespaces
from .scheduler import Scheduler
from .store import ProcessRecord, Store, StoredMessage, now_ms
from .waiting import Timers, Waiter
from ..services.files import FileStore
from .config import KernelConfig, SpawnSpec, resolve_program
from .logs import MAX_LINES as MAX_LOG_LINES, LogLine, Logs
from .runtime import Runtime
from ..services.sync import SyncTable
from ..api.audit import AuditLog
from ..api.tokens import Tokens, digest
from .acks import Acks, take_batch
from .deadletters import DeadLetters
from .idempotency import IdempotencyKeys
from .journal import PROGRAM_CHANGED, Journal, ProcessJournal, WaitPlace, message_row, program_hash

log = logging.getLogger(__name__)
# A message of Kernel.send_batch: (tag, body, data, correlation_id, notify_undelivered, idempotency_key).
BatchEntry = tuple[str, Any, bytes, str, bool, str]

NOTICE_HEADROOM = 64 << 10  # what an EXIT notice may take beyond the message limit (see _exit_notice)
MAX_ERROR = 16 << 10  # characters of an exit error kept; the rest is cut
# An ended process's result stays in memory (for Wait, lists and events) only up to this size;
# a bigger one is read back from the store when asked for, and lists and events leave it out.
RESULT_KEPT_BYTES = 1024
RESULT_IN_STORE = object()  # stands for such a result in the ended cache
MAX_SPAWN_DEPTH = 100  # how deep a process tree may grow (each spawn counts against every ancestor's limit)


class Kernel:
    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        self.lock = _kernel.Lock()  # not re-entrant: methods named *_locked expect it held
        self.store = Store(config.data_dir, config.log_retention)
        self.timers = Timers()
        self.sync = SyncTable(self.lock, self.timers)
        self.files = FileStore(pathlib.Path(config.data_dir) / "files", config.file_limits)
        self.runtimes: dict[str, Runtime] = {}  # process kind -> its userland (add_runtime)
        self.quantum_ns = int(config.quantum_ms * 1_000_000)
        self.scheduler = Scheduler(
            config.cpus or os.cpu_count() or 1, self.quantum_ns, self._run_slice, self._wants_cpu_back,
            aging_ns=int(config.aging_ms * 1_000_000),
        )
        self.procs: dict[int, Process] = {}
        # The C side: messages between Lua processes, and switching between them.
        self.core = _kernel.Core(self.lock, self.procs, self.scheduler, lambda: self.store.take_ids("message"),
                              self.quantum_ns, Process, config.max_message_bytes)
        self.core.refill_ids()
        self.dead_letters = DeadLetters(self.store, self.procs, self.core.new_message, self._deliver,
                                        config.dead_letter_limit)
        self.acks = Acks(self.lock, self.timers, self.procs, self.store, self._store_port_message,
                         self.dead_letters, self.live_locked)
        self.idempotency = IdempotencyKeys(self.store, config.idempotency_window_ms, config.idempotency_keys)
        self.logs = Logs(config.process_log_bytes, config.log_memory_bytes)
        self.names: dict[tuple[str, str], int] = {}  # (namespace, name) -> pid
        self.tokens = Tokens(self.store)
        self.namespaces = Namespaces(self.scheduler, config.namespace_quotas)
        self.audit = AuditLog(config.data_dir, config.audit_rows)
        self.live_in: dict[str, int] = {}  # namespace -> its live processes and ports (namespace_processes)
        self.ended: OrderedDict[int, ProcessRecord] = OrderedDict()
        self.event_listeners: list[Callable[[str, ProcessRecord], None]] = []
        # pid -> callbacks told (kernel lock held, so they must only hand off) that its log grew or it ended
        self.log_followers: dict[int, set[Callable[[], None]]] = {}
        self.inference: Any = None  # set by the server when an engine is configured
        self.journal = Journal(self.store)
        self.journals: dict[int, ProcessJournal] = {}  # live durable processes' (kernel/journal.py)
        self._durable_to_recover: list[tuple[ProcessRecord, dict[str, Any]]] = []  # until their runtime is added
        # Recovered durable processes wait for every runtime (start_recovered), and a monitored child
        # whose parent's runtime comes back after it waits here for its link: parent pid -> children.
        self._recovered: list[Process] = []
        # pid -> (state, reason, error) of those that end as start_recovered links them: a program that
        # changed, a kill answered before the crash.
        self._end_at_start: dict[int, tuple[str, str, str | None]] = {}
        self._monitors_to_link: dict[int, list[Process]] = {}
        # For /metrics: processes started by kind, and ended by (kind, state, reason); a Kill's
        # own reason text counts as "other", so that callers cannot grow this without bound.
        self.spawns: Counter[str] = Counter()
        self.exits: Counter[tuple[str, str, str]] = Counter()
        # Inference tokens (prompt + completion) used by each namespace since the start: its processes'
        # and its clients' requests without a pid (Infer, the OpenAI API), services/inference.py's _charge.
        self._recover()

    # -- start-up and shutdown ------------------------------------------------------------
    def add_runtime(self, runtime: Runtime) -> None:
        """Let processes of `runtime.kind` be spawned (before the server serves), and bring
        back its durable processes."""
        self.runtimes[runtime.kind] = runtime
        self._recover_durable(runtime)

    def _recover(self) -> None:
        """Bring back ports with their messages; processes that were alive when the
        server went down end with reason "server_restart", except durable ones,
        which their runtime brings back (_recover_durable)."""
        specs = self.journal.specs()
        live = self.store.live_records()
        for pid in specs.keys() - {rec.pid for rec in live}:  # ended, its journal not dropped yet
            self.store.enqueue(self.journal.ended_ops(pid))
        for rec in live:
            if rec.pid in specs:
                self._durable_to_recover.append((rec, specs[rec.pid]))
                continue
            if rec.kind == P.PORT:
                proc = self._new_process(rec.pid, P.PORT, rec.parent, rec.priority, Limits(**rec.limits), rec.namespace)
                proc.opener = rec.opener
                proc.started_at_ms = rec.started_at_ms
                self.live_in[proc.namespace] = self.live_in.get(proc.namespace, 0) + 1
                self.namespaces.add_locked(proc.namespace, proc.limits)
                for m in self.store.port_messages(rec.pid):
                    proc.mailbox.deliver(_stored_message(m), limited=False)
                if rec.name:
                    proc.name = rec.name
                    self.names[rec.namespace, rec.name] = rec.pid
                self.procs[rec.pid] = proc
            else:
                rec.state, rec.exit_reason, rec.ended_at_ms = P.KILLED, "server_restart", now_ms()
                self.store.record_exit(rec, durable=True)

    def _recover_durable(self, runtime: Runtime) -> None:
        """Recreate the durable processes of `runtime.kind` that had not ended (same pid, spec,
        name, mailbox, monitors of durable parents); each replays its journal, then goes on."""
        mine = [(rec, spec) for rec, spec in self._durable_to_recover if spec["kind"] == runtime.kind]
        if not mine:
            return
        self._durable_to_recover = [t for t in self._durable_to_recover if t[1]["kind"] != runtime.kind]
        entries, killed = self.journal.entries(), self.journal.kill_intents()
        with self.lock:
            earlier = [self.procs[p] for p in self.journals]  # brought back by another runtime already
            for rec, spec in mine:
                pid = rec.pid
                proc = self._new_process(pid, rec.kind, spec["parent"], spec["priority"], Limits(**spec["limits"]),
                                         rec.namespace, durable=True)
                proc.program, proc.program_name, proc.args = spec["program"], spec["program_name"], spec["args"]
                proc.weight, proc.ancestors, proc.started_at_ms = spec["weight"], spec["ancestors"], rec.started_at_ms
                proc.log_to_server = spec["log_to_server"]
                for m in self.store.stored_messages(pid):
                    proc.mailbox.deliver(_stored_message(m), limited=False)
                if rec.name and (proc.namespace, rec.name) not in self.names:
                    proc.name = rec.name
                    self.names[proc.namespace, rec.name] = pid
                if spec["monitor"]:
                    parent = self.procs.get(spec["parent"])
                    if parent is not None:
                        self._link_monitor(parent, proc)
                    else:  # a parent of another runtime, maybe brought back later
                        self._monitors_to_link.setdefault(spec["parent"], []).append(proc)
                for ancestor in proc.ancestors:
                    if ancestor in self.procs:
                        self.procs[ancestor].descendants += 1
                if earlier:  # its descendants of another kind came back before it (a Lua child of an agent)
                    proc.descendants = sum(1 for p in earlier if pid in p.ancestors)
                self.procs[pid] = proc
                for child in self._monitors_to_link.pop(pid, ()):  # of a runtime brought back before it
                    self._link_monitor(proc, child)
                self.live_in[proc.namespace] = self.live_in.get(proc.namespace, 0) + 1
                self.namespaces.add_locked(proc.namespace, proc.limits)
                journal = self.journals[pid] = ProcessJournal(pid, self.store, spec["seed"], entries.get(pid, []))
                self._retake_locks(proc, journal)
                self._hold_wait_place(proc, journal)
                try:
                    self.acks.set_policy(pid, self.acks.policy(spec["dead_letter"], spec["max_attempts"], proc.namespace))
                except KernelError:  # its dead-letter target is gone: messages go nowhere, as when it ends
                    pass
                path = spec["program_path"]
                runtime.attach(proc, pathlib.Path(path) if path else None)
                if path and _file_hash(path) != spec["program_hash"]:
                    self._end_at_start[pid] = (P.CRASHED, PROGRAM_CHANGED, (
                        f"the program {proc.program_name!r} changed since this durable process started: "
                        "a replay of its journal would run another program"))
                elif pid in killed:  # a kill answered before the crash (kernel/journal.py, rule 4)
                    self._end_at_start[pid] = (P.KILLED, killed[pid], None)
                self._recovered.append(proc)

    def start_recovered(self) -> None:
        """Run the durable processes brought back, once every runtime has brought back its own: none
        runs (and ends, or sends an EXIT notice) before the links between them are all made."""
        recovered, self._recovered, self._monitors_to_link = self._recovered, [], {}
        ending, self._end_at_start = self._end_at_start, {}
        with self.lock:  # ended now that every watcher is linked: each gets its EXIT notice
            for proc in recovered:
                if proc.pid in ending:
                    state, reason, error = ending[proc.pid]
                    self.end_locked(proc, state, reason, error=error)
        for proc in recovered:
            if not proc.ended:
                self.scheduler.make_runnable(proc, new=True)

    def _retake_locks(self, proc: Process, journal: ProcessJournal) -> None:
        """A recovered durable process holds again the locks its journal ends holding, before any
        process runs (lock held). Its journal is a prefix of the one ordered log, so no other's holds them."""
        for name, (kind, permits, count) in Journal.held_locks(journal.entries).items():
            for _ in range(count):
                if self.sync.try_acquire(proc.namespace, name, proc.pid, kind, permits) is None:
                    log.warning("pid %d: the lock %r it held is taken already", proc.pid, name)

    def _hold_wait_place(self, proc: Process, journal: ProcessJournal) -> None:
        """A recovered durable process whose journal ends waiting on a condition (its mutex given back,
        not woken) waits there again before any process runs (kernel/journal.py, rule 5; lock held)."""
        waiting = journal.waiting_at_end()
        if waiting is None:
            return
        name, lock_name, digest = waiting
        place = journal.place = WaitPlace()
        try:
            self.sync.cond_wait(proc.namespace, name, lock_name, proc.pid, proc.priority, place, None,
                                journal.on_woken(digest), holding=False, takes_mutex=False)
        except KernelError as e:  # its mutex became a semaphore meanwhile: the replayed wait says so
            journal.place = None
            log.warning("pid %d: its wait on condition %r is not held from the restart: %s", proc.pid, name, e)

    def shutdown(self) -> None:
        with self.lock:
            # Durable processes stay live in the store: the next start brings them back.
            live = [p for p in self.procs.values() if p.kind != P.PORT and not p.ended and p.pid not in self.journals]
        for proc in live:
            self.kill(proc.pid, "shutdown")
        if self.inference is not None:
            self.inference.stop()
        for runtime in self.runtimes.values():
            runtime.shutdown()
        self.scheduler.stop()
        self.timers.stop()
        self.store.close()
        self.audit.close()
        self.files.close()

    # -- process creation ------------------------------------------------------------------
    def _new_process(self, pid: int, kind: str, parent: int, priority: int, limits: Limits, namespace: str,
                     durable: bool = False, **fields: Any) -> Process:
        """`fields`: more of Process's fields (a spawn's program, args, ancestors)."""
        proc = Process(
            pid=pid, kind=kind, parent=parent, priority=priority, max_priority=priority,
            limits=limits, started_at_ms=now_ms(), **fields,
        )
        proc.namespace = sys.intern(namespace)  # interned: lua/fast_paths.c compares namespaces by pointer
        # (owner, limit, core, durable, byte_limit): by position, which the C type parses faster
        proc.mailbox = Mailbox(pid, limits.mailbox, self.core, durable or kind == P.PORT, limits.mailbox_bytes)
        return proc

    def spawn(self, spec: SpawnSpec, caller: Caller | None = None,
              on_spawned: Callable[[int], list] | None = None) -> int:
        """A new process, in its parent's namespace (no parent: the caller's). `on_spawned(pid)`: a
        durable parent's journal entry of this spawn, queued in one unit with a durable child's spec
        (kernel/journal.py)."""
        config = self.config
        kind, source, program_name, program_path = resolve_program(spec, config.userland_root)
        if spec.name is not None:
            C.name(spec.name)
        # (the defaults, which most spawns take, need no check)
        priority = C.priority(spec.priority) if spec.priority else 0
        weight = C.weight(spec.weight) if spec.weight else C.DEFAULT_WEIGHT
        args = None if spec.args is None else C.value(spec.args, "args", config.max_message_bytes)
        runtime = self.runtimes.get(kind)
        if runtime is None:
            raise Unimplemented(f"this server runs no {kind.title()} userland"
                                + (" (start llmosd with an agent socket)" if kind == P.PYTHON else ""))
        limits = spec.limits.with_defaults(runtime.check_program(source, program_name, config.defaults))
        with self.lock:
            if spec.parent:
                parent = self.live_locked(spec.parent, "parent", caller)
                self._authorize(caller, "spawn", parent)
                namespace = parent.namespace
                if limits is not parent.limits:  # the shared defaults are within themselves
                    limits = P.child_limits(parent, spec.limits, limits, kind)
                if priority > parent.max_priority:
                    raise PermissionDenied(f"a child's priority is at most its parent's ({parent.max_priority}), "
                                           f"not {priority}")
                lineage = (parent.pid,) + parent.ancestors
                ancestors = self._ancestors_with_room(lineage)
            elif spec.monitor:
                raise InvalidArgument("monitor needs a parent pid")
            else:
                if caller is not None and caller.role == "process":
                    raise PermissionDenied("a process spawns only its own children")
                lineage, ancestors = (), ()
                namespace = caller.namespace if caller is not None else DEFAULT_NAMESPACE
            self._check_room_locked(namespace)
            if spec.name and (namespace, spec.name) in self.names:
                raise AlreadyExists(f"the name {spec.name!r} is registered to pid {self.names[namespace, spec.name]}")
            dead_letters = self.acks.policy(spec.dead_letter, spec.max_attempts, namespace)
            limits = self.namespaces.reserve_locked(namespace, spec.limits, limits)
            pid = self.store.next_id("pid")
            proc = self._new_process(pid, kind, spec.parent, priority, limits, namespace, spec.durable,
                                     program=source, program_name=program_name, args=args, ancestors=lineage,
                                     log_to_server=spec.log_to_server)
            proc.weight = weight  # a ProcessFields field (kernel/process.c), not the dataclass's
            runtime.attach(proc, program_path)
            if spec.name:
                proc.name = spec.name
                self.names[namespace, spec.name] = pid
            if spec.monitor:
                self._link_monitor(parent, proc)
            for ancestor in ancestors:
                ancestor.descendants += 1
            self.procs[pid] = proc
            live_in = self.live_in
            live_in[namespace] = live_in.get(namespace, 0) + 1
            if dead_letters is not None:
                self.acks.set_policy(pid, dead_letters)
            self.store.record_spawn(proc)
            self.spawns[kind] += 1
            if on_spawned is not None or spec.durable:
                self._journal_spawn(proc, spec, program_path, seed_ops=on_spawned(pid) if on_spawned else [])
            if limits.wall_ms:
                proc.wall_timer = self.timers.call_later(limits.wall_ms / 1000, lambda: self.kill(pid, "wall_limit"))
            if self.event_listeners:
                self._emit("spawned", proc)
        self.scheduler.make_runnable(proc, new=True)
        return pid

    def _journal_spawn(self, proc: Process, spec: SpawnSpec, program_path: pathlib.Path | None,
                       seed_ops: list) -> None:
        """A durable parent's journal entry of a spawn (`seed_ops`) and, for a durable child, its journal
        and spec, queued in one unit (lock held)."""
        ops, pid = seed_ops, proc.pid
        if spec.durable:
            seed = int.from_bytes(os.urandom(6), "little")
            self.journals[pid] = ProcessJournal(pid, self.store, seed)
            ops.append(self.journal.spec_op(pid, {
                "kind": proc.kind, "program": proc.program, "program_name": proc.program_name,
                "program_path": str(program_path) if program_path else None, "program_hash": program_hash(proc.program),
                "args": proc.args, "priority": proc.priority, "weight": proc.weight, "limits": proc.limits.as_dict(),
                "parent": spec.parent, "monitor": spec.monitor, "ancestors": proc.ancestors, "seed": seed,
                "dead_letter": spec.dead_letter, "max_attempts": spec.max_attempts,
                "log_to_server": spec.log_to_server,
            }))
        if ops:
            self.store.enqueue(ops)

    def _check_room_locked(self, namespace: str) -> None:
        """Room for one more live process in the server and in `namespace` (lock held)."""
        if len(self.procs) >= self.config.max_processes:
            raise ResourceExhausted(f"the server runs its limit of {self.config.max_processes} processes")
        limit = self.config.namespace_processes
        if limit and self.live_in.get(namespace, 0) >= limit:
            raise ResourceExhausted(f"namespace {namespace!r} runs its limit of {limit} live processes "
                                    "(--namespace-processes)")

    def namespace_use(self, name: str, caller: Caller | None = None) -> dict[str, int | str]:
        """A namespace's use and quotas (GetNamespace): the caller's, or (admin) any."""
        name = name or (caller.namespace if caller is not None else DEFAULT_NAMESPACE)
        if caller is not None and not caller.sees(name):
            raise NotFound(f"no namespace {name!r}")
        files, limits = self.files.usage(name), self.config.file_limits
        with self.lock:
            live = self.live_in.get(name, 0)
            mine = [p for p in self.procs.values() if p.namespace == name]
            mailbox_bytes = sum(p.mailbox.bytes for p in mine)
            memory_bytes = sum(p.runtime.memory_used() for p in mine if p.runtime is not None)  # as usage() does
        kv_bytes = self.inference.namespace_kv_bytes(name) if self.inference is not None else 0
        tokens, tokens_last_minute = self.namespaces.token_use(name)
        quotas = self.namespaces.quotas(name)
        return {
            "memory_bytes": memory_bytes, "mailbox_bytes": mailbox_bytes,
            "weight": self.namespaces.weight(name), "quotas": dataclasses.asdict(quotas),
            "reserved": self.namespaces.reserved(name),
            "use": {"memory_bytes": memory_bytes, "mailbox_bytes": mailbox_bytes, "kv_bytes": kv_bytes,
                    "tokens": tokens, "tokens_per_minute": tokens_last_minute},
            "name": name, "live_processes": live, "max_live_processes": self.config.namespace_processes,
            "file_bytes": files.bytes, "max_file_bytes": limits.namespace_bytes,
            "files": files.files + files.directories, "max_files": limits.namespace_files,
            "tokens": sum(1 for _, ns, *_ in self.tokens.list() if ns == name),
        }

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

    def open_port(self, name: str | None = None, mailbox: int = 0, caller: Caller | None = None,
                  dead_letter: int = 0, max_attempts: int = 0) -> tuple[int, str]:
        """(pid, secret) of a new port in the caller's namespace, owned by the caller's key and by
        whoever holds the secret (api/authority.py)."""
        if name is not None:
            C.name(name)
        namespace = caller.namespace if caller is not None else DEFAULT_NAMESPACE
        with self.lock:
            if name and (namespace, name) in self.names:
                raise AlreadyExists(f"the name {name!r} is registered to pid {self.names[namespace, name]}")
            dead_letters = self.acks.policy(dead_letter, max_attempts, namespace)
            self._check_room_locked(namespace)
            pid = self.store.next_id("pid")
            defaults = self.config.defaults
            limits = Limits(mailbox=mailbox or defaults.mailbox, mailbox_bytes=defaults.mailbox_bytes)
            limits = self.namespaces.reserve_locked(namespace, Limits(), limits)
            proc = self._new_process(pid, P.PORT, 0, 0, limits, namespace)
            proc.opener = caller.key if caller is not None else ""
            secret = secrets.token_urlsafe(24)
            proc.secret = digest(secret)
            proc.state = P.RUNNABLE
            if name:
                proc.name = name
                self.names[namespace, name] = pid
            self.procs[pid] = proc
            self.live_in[namespace] = self.live_in.get(namespace, 0) + 1
            self.acks.set_policy(pid, dead_letters)
            self.store.record_spawn(proc, durable=True)
            self.spawns[P.PORT] += 1
            self._emit("spawned", proc)
        return pid, secret

    # -- lookup ---------------------------------------------------------------------------
    def release_lock(self, pid: int, name: str, caller: Caller | None = None,
                     then: Callable[[], None] | None = None) -> None:
        """`pid` gives back one permit of `name`; `then()`, under the same hold of the kernel lock."""
        with self.lock:
            holder = self.target_locked(caller, "lock.release", pid, "holder")
            self.sync.release(holder.namespace, name, pid)
            if then is not None:
                then()

    def live_locked(self, pid: int, role: str = "process", caller: Caller | None = None) -> Process:
        """The live process `pid`, or NotFound / FailedPrecondition (ended): for `caller`, one of
        another namespace is NotFound too, ended or not. Lock held."""
        proc = self.procs.get(pid)
        if proc is None:
            rec = self.ended.get(pid) or self._ended_record(pid)
            if rec is not None and (caller is None or caller.sees(rec.namespace)):
                raise FailedPrecondition(f"{role} pid {pid} has ended")
            raise not_found(pid)
        if caller is not None and not caller.sees(proc.namespace):
            raise not_found(pid)
        return proc

    def target_locked(self, caller: Caller | None, syscall: str, pid: int, role: str = "process") -> Process:
        """The live process `pid` that `caller` may apply `syscall` to (api/authority.py). Lock held."""
        proc = self.procs.get(pid) or self.live_locked(pid, role, caller)
        self._authorize(caller, syscall, proc)
        return proc

    def _authorize(self, caller: Caller | None, syscall: str, proc: Process) -> None:
        if caller is not None:
            authorize(caller, syscall, proc.pid, proc.namespace, lambda: proc.ancestors,
                      proc.opener if proc.kind == P.PORT else None, proc.pid in self.journals)

    def _authorize_ended(self, caller: Caller | None, syscall: str, rec: ProcessRecord) -> None:
        if caller is not None:
            authorize(caller, syscall, rec.pid, rec.namespace, lambda: self._lineage(rec),
                      rec.opener if rec.kind == P.PORT else None)

    def _lineage(self, rec: ProcessRecord) -> tuple[int, ...]:
        """An ended process's ancestors, from its parents' records (lock held)."""
        out, pid = [], rec.parent
        while pid and len(out) <= MAX_SPAWN_DEPTH:
            out.append(pid)
            live = self.procs.get(pid)
            if live is not None:
                return tuple(out) + live.ancestors
            parent = self.ended.get(pid) or self._ended_record(pid)
            pid = parent.parent if parent is not None else 0
        return tuple(out)

    def _ended_record(self, pid: int) -> ProcessRecord | None:
        rec = self.ended.get(pid)
        if rec is None or rec.result is RESULT_IN_STORE:
            if not 0 < pid <= C.MAX_PID:  # the store holds only pids it gave out
                return None
            rec = self.store.load_process(pid)
            if rec is not None and rec.ended_at_ms is None:
                return None
        return rec

    def resolve(self, target: int | str, caller: Caller | None = None) -> Process:
        if isinstance(target, str):
            pid = self.names.get((caller.namespace if caller is not None else DEFAULT_NAMESPACE, target))
            if pid is None:
                raise NotFound(f"no process is registered as {target!r}")
            return self.procs[pid]
        return self.live_locked(target, "receiver", caller)

    def whereis(self, name: str, caller: Caller | None = None) -> int | None:
        with self.lock:
            return self.names.get((caller.namespace if caller is not None else DEFAULT_NAMESPACE, name))

    # -- messages ---------------------------------------------------------------------------
    def send(self, sender: int, to: int | str, tag: str, body: Any, data: bytes, correlation_id: str,
             caller: Caller | None = None, notify_undelivered: bool = False, idempotency_key: str = "",
             on_sent: Callable[[Message], list] | None = None) -> int:
        """`sender` is the caller: a process's own pid (or 0, for a client, or a port it owns).
        `on_sent(msg)`: a durable sender's journal entry of this send, queued in one unit with the
        message's copy in a durable mailbox, and committed before a port gets it."""
        with self.lock:
            src = self._sender_locked(sender, caller)
            if idempotency_key:
                key = self.idempotency.key(sender, caller, idempotency_key)
                if (first := self.idempotency.first(key)) is not None:
                    return first
            dst = self._receiver_locked(to, caller)
            msg = self.core.new_message(sender, dst.pid, tag, body, data, correlation_id)
            msg.notify_undelivered = notify_undelivered
            # A stored mailbox keeps the key with the message, in its transaction (kernel/idempotency.py).
            also = self.idempotency.stored(key, msg.id) if idempotency_key and dst.mailbox.durable else None
            if on_sent is None:
                self._deliver(dst, msg, also=also)
            else:
                dst.mailbox.check_room(msg)  # before the journal says it was sent
                self.store.enqueue(on_sent(msg) + self._stored_ops(dst, msg))
                if dst.kind == P.PORT:
                    # Output commit: the entry and the port's copy in one transaction, before a client
                    # can see it (a crash between two commits would journal a send the port never got).
                    self.store.flush()
                dst.mailbox.deliver(msg, False)
                if also is not None:
                    self.store.transaction(also)
            if idempotency_key:  # remembered once delivered (kernel/idempotency.py): a refused send has no first id
                self.idempotency.remember(key, msg.id)
            if src is not None:
                src.mailbox.sent += 1
        if on_sent is None and dst.mailbox.durable and dst.kind != P.PORT:
            self.store.flush()  # in a durable mailbox before Send answers, as in a port
        self.core.refill_ids()  # the next block of message ids, reserved without the lock
        return msg.id

    def _sender_locked(self, sender: int, caller: Caller | None) -> Process | None:
        """The sending process (None: a client), checked: live, and the caller's to send as."""
        src = self.procs.get(sender) if sender else None
        if src is None and sender:
            self.live_locked(sender, "sender", caller)  # raises the right error
        if src is not None and caller is not None:
            self._check_sender(caller, src)
        return src

    def _receiver_locked(self, to: int | str, caller: Caller | None) -> Process:
        """The receiver named by pid or registered name, as `caller` may see it."""
        dst = self.procs.get(to) if type(to) is int else None
        if dst is None or (caller is not None and not caller.sees(dst.namespace)):
            dst = self.resolve(to, caller)
        return dst

    def send_batch(self, sender: int, to: int | str, batch: list[BatchEntry], caller: Caller | None = None) -> list[int]:
        """Send every message of `batch` to one receiver, in order: all or none. Each is made (and
        checked for size) first, then the mailbox's room for all of them, as if none were taken at once
        (ResourceExhausted: nothing is sent); a port's are stored in one transaction (with their
        idempotency keys), a durable mailbox's queued as one unit, both committed before this returns.
        A message whose idempotency key was sent before (or earlier in the batch) gets its first id."""
        with self.lock:
            src = self._sender_locked(sender, caller)
            dst = self._receiver_locked(to, caller)
            ids: list[int] = []
            new: list[Message] = []
            keys: dict[Any, int] = {}  # the batch's new keys -> their message ids
            for tag, body, data, correlation_id, notify_undelivered, idempotency_key in batch:
                key = self.idempotency.key(sender, caller, idempotency_key) if idempotency_key else None
                first = None if key is None else keys.get(key, self.idempotency.first(key))
                if first is not None:
                    ids.append(first)
                    continue
                msg = self.core.new_message(sender, dst.pid, tag, body, data, correlation_id)
                msg.notify_undelivered = notify_undelivered
                new.append(msg)
                ids.append(msg.id)
                if key is not None:
                    keys[key] = msg.id
            mailbox = dst.mailbox
            try:
                mailbox.check_room_for(len(new), sum(m.size for m in new))
            except ResourceExhausted as e:
                raise ResourceExhausted(f"{e}; nothing was sent: send fewer, or retry later") from None
            if mailbox.durable and new:
                also = [self.idempotency.stored_many(keys)] if keys else []
                if dst.kind == P.PORT:
                    self.store.put_messages(self.acks.kept_in_store(dst, new), also)
                else:
                    self.store.enqueue([message_row(m) for m in new])
                    if also:
                        self.store.transaction(lambda db: [write(db) for write in also])
            for msg in new:
                mailbox.deliver(msg, False)
            for key, message_id in keys.items():
                self.idempotency.remember(key, message_id)
            if src is not None:
                src.mailbox.sent += len(new)
        if dst.mailbox.durable and dst.kind != P.PORT:
            self.store.flush()  # in a durable mailbox before SendBatch answers, as in a port
        self.core.refill_ids()
        return ids

    def recv_many_locked(self, proc: Process, match: Match, most: int, budget: int) -> list[Message]:
        """A batch receive without ack: take up to `most` matching messages waiting now (as acks.take_batch
        bounds them by `budget` bytes); a port's leave the store in one transaction."""
        taken = take_batch(proc.mailbox, match, most, budget)
        if taken and proc.kind == P.PORT:
            self.store.delete_messages([msg.id for msg in taken])
        return taken

    def _check_sender(self, caller: Caller, src: Process) -> None:
        """`from` is always the caller: a process itself, or a port the client owns (lock held)."""
        if not caller.sees(src.namespace):
            raise not_found(src.pid)
        if src.pid == caller.pid:
            return
        if caller.role == "process" or src.kind != P.PORT or (src.opener != caller.key and caller.role != "admin"):
            raise PermissionDenied(f"from must be the caller (or a port it opened), not pid {src.pid}")

    def _stored_ops(self, dst: Process, msg: Message) -> list[tuple[str, Any]]:
        """The ops that store `msg` in `dst`'s mailbox, for the unit of the ordered queue of what sent it
        (a durable sender's entry, a durable process's end), queued before it is delivered: none for a
        mailbox that is not stored, or for a port's receive without ack that takes it at once (it
        consumes it: at most once, as in _deliver)."""
        if dst.kind == P.PORT:
            return [message_row(m) for m in self.acks.kept_in_store(dst, [msg])]
        return [message_row(msg)] if dst.mailbox.durable else []

    def _deliver(self, dst: Process, msg: Message, limited: bool = True, also: Callable | None = None) -> None:
        """Put `msg` in `dst`'s mailbox or straight into a waiting receiver's hands.
        A port's message is acknowledged only once stored, unless taken at once
        (`also`: a write that goes with it, in its transaction if it is stored).
        Kernel notices (EXIT) are not `limited`: a process sends at most one,
        and dropping one would leave a monitor waiting forever."""
        if dst.kind == P.PORT and not any(match.accepts(msg) for _, match in dst.mailbox.receivers):
            if limited:
                dst.mailbox.check_room(msg)
            self._store_port_message(msg, also)
        else:
            if dst.mailbox.durable and dst.kind != P.PORT:  # a durable process's: kept until its journal has it
                if limited:
                    dst.mailbox.check_room(msg)
                self.store.enqueue([message_row(msg)])
            if also is not None:
                self.store.transaction(also)
        dst.mailbox.deliver(msg, limited)

    def try_recv(self, pid: int, match: Match, caller: Caller | None = None) -> Message | None:
        with self.lock:
            return self._take_locked(self.target_locked(caller, "recv", pid, "receiver"), match)

    def _take_locked(self, proc: Process, match: Match) -> Message | None:
        msg = proc.mailbox.take(match)
        if msg is not None and proc.kind == P.PORT:
            self.store.delete_message(msg.id)
        return msg

    def recv(self, pid: int, match: Match, waiter: Waiter, timeout_s: float | None,
             caller: Caller | None = None) -> Message | None:
        """Take a matching message now, or register `waiter` to get one (None)."""
        with self.lock:
            return self.recv_locked(pid, match, waiter, timeout_s, caller)

    def recv_locked(self, pid: int, match: Match, waiter: Waiter, timeout_s: float | None,
                    caller: Caller | None = None) -> Message | None:
        proc = self.target_locked(caller, "recv", pid, "receiver")
        msg = self._take_locked(proc, match)
        if msg is not None:
            return msg
        proc.mailbox.wait(waiter, match)
        self.arm_timeout(waiter, timeout_s)
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

    def _store_port_message(self, msg: Message, also: Callable[[Any], None] | None = None) -> None:
        self.store.put_message(StoredMessage(
            msg.id, msg.to, msg.sender, msg.tag, msg.body, msg.data, msg.correlation_id, msg.sent_at_ms,
            msg.notify_undelivered,
        ), also)

    def arm_timeout(self, waiter: Waiter, timeout_s: float | None) -> None:
        self.timers.time_out(self.lock, waiter, timeout_s)

    # -- exits -----------------------------------------------------------------------------
    def wait(self, pid: int, waiter: Waiter, timeout_s: float | None,
             caller: Caller | None = None) -> ProcessRecord | None:
        """The final record of `pid` if it has ended, else register `waiter` (None)."""
        with self.lock:
            return self.wait_locked(pid, waiter, timeout_s, caller)

    def wait_locked(self, pid: int, waiter: Waiter, timeout_s: float | None,
                    caller: Caller | None = None) -> ProcessRecord | None:
        proc = self.procs.get(pid)
        if proc is None:
            rec = self._ended_record(pid)
            if rec is None:
                raise not_found(pid)
            self._authorize_ended(caller, "wait", rec)
            return rec
        self._authorize(caller, "wait", proc)
        waiter.register(proc.exit_waiters, waiter)
        self.arm_timeout(waiter, timeout_s)
        return None

    def kill(self, pid: int, reason: str = "killed", caller: Caller | None = None) -> bool:
        """End `pid` with `reason`; False if it had already ended."""
        C.text(reason, "reason")
        with self.lock:
            proc = self.procs.get(pid)
            if proc is None:
                rec = self._ended_record(pid)
                if rec is None:
                    raise not_found(pid)
                self._authorize_ended(caller, "kill", rec)
                return False
            self._authorize(caller, "kill", proc)
            if proc.kind == P.PORT or proc.state in (P.BLOCKED, P.RUNNABLE):
                # Not running any code (a preempted process stays RUNNING): end it now.
                self.end_locked(proc, P.KILLED, reason)
            elif proc.kill_reason is None:
                # Running (or parked mid-slice): its userland ends it with this reason. A durable
                # process's kill is durable before Kill answers (kernel/journal.py, rule 4).
                proc.kill_reason = reason
                if pid in self.journals:
                    self.store.enqueue([self.journal.kill_intent_op(pid, reason)])
                    self.store.flush()
                self.runtimes[proc.kind].kill(proc)
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
        pid, namespace, kind, procs = proc.pid, proc.namespace, proc.kind, self.procs
        proc.mailbox.close()
        self.acks.process_ended(proc)
        self.files.process_ended(pid)
        durable = self.journals.pop(pid, None) is not None
        del procs[pid]
        self.live_in[namespace] -= 1
        self.namespaces.release_locked(namespace, proc.limits)
        for ancestor_pid in proc.ancestors:
            ancestor = procs.get(ancestor_pid)
            if ancestor is not None:
                ancestor.descendants -= 1
        if proc.name and self.names.get((namespace, proc.name)) == pid:
            del self.names[namespace, proc.name]
        if error is not None and len(error) > MAX_ERROR:
            error = f"{error[:MAX_ERROR]} ... [{len(error) - MAX_ERROR} characters cut]"
        rec = self._record(proc)
        rec.usage = self.usage(proc)
        rec.exit_reason, rec.result, rec.error, rec.ended_at_ms = reason, result, error, now_ms()
        notices = [(procs[watcher], self._exit_notice(watcher, rec))
                   for watcher in proc.monitored_by if watcher in procs]
        if durable:
            # Its exit, its EXIT notices and its journal dropped: one unit, written before anyone sees its
            # end (a crash between an exit and its notices would leave a durable watcher waiting for ever).
            ops = [self.store.exit_op(rec), *self.journal.ended_ops(pid)]
            for dst, notice in notices:
                ops.extend(self._stored_ops(dst, notice))
            self.store.enqueue(ops)
            self.store.flush()
        else:
            self.store.record_exit(rec, durable=kind == P.PORT)
        # Its locks go to their waiters once its end is queued: a durable agent's journal entry of the
        # permit it is handed is queued off the kernel lock, and must come after the end it follows from.
        self.sync.process_ended(pid)
        self.exits[kind, state, reason if reason in P.EXIT_REASONS else "other"] += 1
        kept = rec if value_fits(result, RESULT_KEPT_BYTES) else dataclasses.replace(rec, result=RESULT_IN_STORE)
        ended = self.ended
        ended[pid] = kept
        _kernel.untrack(kept, kept.log)  # kept for long, never in a cycle: the cycle collector skips it (process.c)
        if len(ended) > self.config.ended_cache:
            self.logs.forget(ended.popitem(last=False)[0])
        if proc.exit_waiters:
            for waiter in proc.exit_waiters:
                waiter.queue = None
                waiter.complete(rec)
            proc.exit_waiters.clear()
        for dst, notice in notices:
            if durable:
                dst.mailbox.deliver(notice, False)  # stored by the unit above
            else:
                self._deliver(dst, notice, False)
            dst.monitoring.discard(pid)
        runtime = proc.runtime
        if kind != P.PORT:
            lines = runtime.log_lines(MAX_LOG_LINES) if runtime is not None else None
            if lines is not None:
                self.logs.replace(proc, lines)  # in place: `rec` shares the list
            if proc.log or proc.log_dropped:
                self.store.record_log(pid, list(proc.log), proc.log_dropped)
            self.runtimes[kind].ended(proc)
        if self.inference is not None:
            self.inference.process_ended(pid)  # its conversation contexts
        self.logs.ended(proc, rec)
        if self.log_followers:
            self._tell_log_followers(pid)
        proc.runtime = None
        if proc.log_to_server:
            log.info("pid %d ended: %s (%s) %s", pid, state, reason, error or json.dumps(result))
        if self.event_listeners:
            self._emit("ended", kept)

    # -- names, monitors, priorities -------------------------------------------------------
    def register(self, pid: int, name: str, caller: Caller | None = None) -> None:
        C.name(name)
        with self.lock:
            proc = self.target_locked(caller, "register", pid)
            owner = self.names.get((proc.namespace, name))
            if owner is not None and owner != pid:
                raise AlreadyExists(f"the name {name!r} is registered to pid {owner}")
            if proc.name and proc.name != name:
                del self.names[proc.namespace, proc.name]
            proc.name = name
            self.names[proc.namespace, name] = pid
            self.store.record_name(pid, name)

    def monitor(self, watcher: int, target: int, caller: Caller | None = None) -> None:
        """`watcher` (the caller, or a process it may act on) is told when `target` (in the
        namespace) ends."""
        with self.lock:
            watching = self.target_locked(caller, "monitor", watcher, "watcher")
            proc = self.procs.get(target)
            if proc is not None and (caller is None or caller.sees(proc.namespace)):
                self._link_monitor(watching, proc)
                return
            rec = self._ended_record(target) if proc is None else None
            if rec is None or (caller is not None and not caller.sees(rec.namespace)):
                raise not_found(target)
            # Already ended: tell the watcher at once, as Erlang does. Asked
            # for, so it counts against the mailbox's limits like any message:
            # asking again and again must not flood the watcher.
            self._deliver(self.procs[watcher], self._exit_notice(watcher, rec), limited=True)

    def monitor_again(self, watcher: int, target: Any) -> None:
        """A durable process's replayed monitor is set again (monitors live in memory); nothing if
        either has ended since."""
        with self.lock:
            watching = self.procs.get(watcher)
            proc = self.procs.get(target) if type(target) is int else None
            if watching is not None and proc is not None:
                self._link_monitor(watching, proc)

    def _exit_notice(self, watcher: int, rec: ProcessRecord) -> Message:
        """A process sends at most one notice to each watcher when it ends, and
        it is never refused, or a monitor would wait for ever: its result is a
        value of at most a message's size, and its error is cut short, so the
        notice fits the headroom the limit has for it."""
        notice = {"pid": rec.pid, "state": rec.state, "reason": rec.exit_reason, "result": rec.result,
                  "error": rec.error}
        return self.core.new_message(rec.pid, watcher, "EXIT", notice, b"", "", NOTICE_HEADROOM)

    def set_priority(self, pid: int, priority: int | None, weight: int = 0, caller: Caller | None = None) -> None:
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
            proc = self.target_locked(caller, "set_priority", pid)
            if priority is not None:
                if caller is None or caller.role != "process":
                    proc.max_priority = max(proc.max_priority, priority)
                else:
                    ceiling = min(proc.max_priority, self.live_locked(caller.pid, "caller").max_priority)
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
            opener=proc.opener,
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

    def get(self, pid: int, caller: Caller | None = None, syscall: str = "info") -> tuple[ProcessRecord, str | None]:
        """(record with usage, blocked_on) of a live or ended process."""
        with self.lock:
            proc = self.procs.get(pid)
            if proc is not None:
                self._authorize(caller, syscall, proc)
                return self._snapshot(proc)
        rec = self._ended_record(pid)  # may read the store: not under the lock
        if rec is None:
            raise not_found(pid)
        with self.lock:
            self._authorize_ended(caller, syscall, rec)
        return rec, None

    def _link_monitor(self, watcher: Process, target: Process) -> None:
        """`watcher` is told when `target` ends (lock held); each side keeps the link."""
        target.monitored_by.add(watcher.pid)
        if watcher.monitoring is None:
            watcher.monitoring = set()
        watcher.monitoring.add(target.pid)

    def monitor_links(self, pid: int) -> tuple[list[int], list[int]]:
        """(the live processes `pid` monitors, those that monitor it), for GetProcess."""
        with self.lock:
            proc = self.procs.get(pid)
            if proc is None:
                return [], []
            return sorted(proc.monitoring or ()), sorted(w for w in proc.monitored_by if w in self.procs)

    def list(self, states: set[str], name: str | None, parent: int, include_ended: bool,
             after_pid: int = 0, caller: Caller | None = None) -> list[tuple]:
        """(record, blocked_on) of the processes with pids above `after_pid` that match, by pid:
        those of the caller's namespace."""
        def wanted(pid: int, state: str, pname: str | None, pparent: int, namespace: str) -> bool:
            return (pid > after_pid and (not states or state in states) and (not name or pname == name)
                    and (not parent or pparent == parent) and (caller is None or caller.sees(namespace)))

        with self.lock:
            out = [self._snapshot(p) for p in self.procs.values()
                   if wanted(p.pid, p.state, p.name, p.parent, p.namespace)]
            if include_ended:
                out += [(rec, None) for rec in self.ended.values()
                        if wanted(rec.pid, rec.state, rec.name, rec.parent, rec.namespace)]
        out.sort(key=lambda t: t[0].pid)
        return out

    def log(self, proc: Process, line: str) -> None:
        with self.lock:
            line = self.logs.append(proc, line)
            self._tell_log_followers(proc.pid)
        server_log_line(proc, line)

    def read_log(self, pid: int, offset: int, caller: Caller | None = None) -> tuple[list[LogLine], int, int, bool]:
        """(lines from `offset` on with their times, next offset, lines dropped before offset,
        whether the process has ended). An ended process's log that memory let go of (or kept
        from before a restart) is read from the store; NotFound once the store has let it go too
        (--log-retention), unlike an empty log."""
        with self.lock:
            proc = self.procs.get(pid)
            if proc is not None:
                self._authorize(caller, "read_log", proc)
            runtime = proc.runtime if proc is not None else None
        lines = runtime.log_lines(MAX_LOG_LINES) if runtime is not None else None
        if lines is not None:  # kept by its userland (an agent's output file)
            return lines[offset:], len(lines), 0, False
        rec = self.get(pid, caller, "read_log")[0]
        entries, dropped = list(rec.log or ()), rec.log_dropped
        ended = rec.ended_at_ms is not None
        if ended and not entries and (rec.log is None or dropped) and rec.kind != P.PORT:
            stored = self.store.load_log(pid)
            if stored is None:
                raise NotFound(f"pid {pid}'s log is no longer kept (--log-retention {self.store.log_retention})")
            entries, dropped = stored
        start = max(offset - dropped, 0)
        return entries[start:], dropped + len(entries), max(dropped - offset, 0), ended

    def follow_log(self, pid: int, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` (kernel lock held: it must only hand off) whenever `pid`'s log grows or it ends;
        returns what stops it."""
        with self.lock:
            self.log_followers.setdefault(pid, set()).add(wake)

        def stop() -> None:
            with self.lock:
                followers = self.log_followers.get(pid)
                if followers is not None:
                    followers.discard(wake)
                    if not followers:
                        del self.log_followers[pid]
        return stop

    def _tell_log_followers(self, pid: int) -> None:
        followers = self.log_followers.get(pid)
        if followers:
            for wake in followers:
                wake()

    def _emit(self, kind: str, proc_or_rec: Process | ProcessRecord) -> None:
        if not self.event_listeners:
            return
        rec = proc_or_rec if isinstance(proc_or_rec, ProcessRecord) else self._record(proc_or_rec)
        for listener in self.event_listeners:
            listener(kind, rec)

    # -- running processes: their userlands' ------------------------------------------------
    def _wants_cpu_back(self, proc: Process, now_ns: int, others_waiting: bool) -> int | None:
        return self.runtimes[proc.kind].wants_cpu_back(proc, now_ns, others_waiting)

    def _run_slice(self, proc: Process) -> None:
        """Run `proc` on this worker until it blocks, ends, or used its quantum."""
        try:
            self.runtimes[proc.kind].run_slice(proc)
        except Exception as e:  # a kernel bug: end the process rather than leave it stuck RUNNING
            log.exception("pid %d: kernel error", proc.pid)
            with self.lock:
                self.end_locked(proc, P.CRASHED, "error", error=f"kernel error: {e!r}")

    def exit(self, pid: int, result: Any, caller: Caller | None = None) -> None:
        """The Exit syscall: a process's result before it ends; for a port, closing it."""
        C.value(result, "result", self.config.max_message_bytes)
        with self.lock:
            proc = self.target_locked(caller, "exit", pid)
            if proc.kind == P.PORT:
                self.end_locked(proc, P.EXITED, "normal", result=result)
            else:
                self.runtimes[proc.kind].exit(proc, result)


def _file_hash(path: str) -> str | None:
    """program_hash of a program file now (None: it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            return program_hash(f.read())
    except (OSError, UnicodeDecodeError):
        return None


_SCALARS = (int, float, bool)


def value_fits(value: Any, limit: int) -> bool:
    """Whether a (checked) value encodes in at most `limit` bytes."""
    if (value is None or type(value) in _SCALARS) and limit >= 11:  # a number or a flag: at most 11 bytes
        return True
    try:
        _kernel.value_size(value, limit)
    except _kernel.TooLarge:
        return False
    return True


def server_log_line(proc: Process, line: str, at_ms: int | None = None) -> None:
    """`proc`'s log `line`, written at `at_ms` (None: now), in the server's log: INFO for a boot
    program's (log_to_server), else DEBUG; with its pid (--log-format json's "pid") and its time."""
    level = logging.INFO if proc.log_to_server else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, "pid %d: %s", (proc.pid, line), None,
                            extra={"pid": proc.pid})
    if at_ms is not None:
        record.created, record.msecs = at_ms / 1000, float(at_ms % 1000)
    log.handle(record)


def _stored_message(m: StoredMessage) -> Message:
    """A stored mailbox's message as it was sent, its sender's wish for a notice included."""
    msg = Message(m.id, m.sender, m.port, m.tag, m.body, m.data, m.correlation_id, m.sent_at_ms)
    msg.notify_undelivered = m.notify_undelivered
    return msg

"""Processes: what the kernel knows about each one."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..api.errors import PermissionDenied
from ..native import _kernel
from .waiting import Waiter

# States, as in the .proto.
RUNNABLE = "RUNNABLE"
RUNNING = "RUNNING"
BLOCKED = "BLOCKED"
EXITED = "EXITED"
KILLED = "KILLED"
CRASHED = "CRASHED"
ENDED = frozenset((EXITED, KILLED, CRASHED))
# The reasons the kernel itself gives an end (a Kill may give any text).
EXIT_REASONS = frozenset(("normal", "killed", "error", "cpu_limit", "wall_limit", "memory_limit", "shutdown",
                          "server_restart"))

# A process's share of CPU within its priority level, as cgroup v2's cpu.weight (api/checks.py
# checks the range; the C side's vruntime charge reads it from here).
DEFAULT_WEIGHT = 100

LUA = "LUA"
PYTHON = "PYTHON"
PORT = "PORT"


@dataclass(slots=True, frozen=True)
class Limits:
    """Per-process limits; 0 means unlimited (after server defaults are applied). Never changed
    once made, so that processes share them (a spawn that asks for none: NO_LIMITS, then the
    server's defaults)."""

    cpu_ms: int = 0
    wall_ms: int = 0
    memory_bytes: int = 0
    tokens: int = 0
    mailbox: int = 0  # messages waiting at once
    mailbox_bytes: int = 0  # bytes waiting at once (Message.size)
    processes: int = 0  # live descendants at once
    kv_bytes: int = 0  # KV cache bytes its conversation contexts hold at once

    def as_dict(self) -> dict[str, int]:
        return {
            "cpu_ms": self.cpu_ms, "wall_ms": self.wall_ms, "memory_bytes": self.memory_bytes, "tokens": self.tokens,
            "mailbox": self.mailbox, "mailbox_bytes": self.mailbox_bytes, "processes": self.processes,
            "kv_bytes": self.kv_bytes,
        }

    def with_defaults(self, defaults: Limits) -> Limits:
        if self is NO_LIMITS or self == NO_LIMITS:
            return defaults
        return Limits(**{name: getattr(self, name) or getattr(defaults, name) for name in self.__slots__})


NO_LIMITS = Limits()  # none asked for: the server's defaults apply


@dataclass(eq=False, slots=True)
class Process(_kernel.ProcessFields):
    """What the kernel knows about a process. The fields the C side reads and writes on every
    message and hand-off are ProcessFields' (kernel/process.c), set to their defaults when the
    process is made: state (RUNNABLE), blocked_on (the blocking syscall, shown while BLOCKED),
    blocked_syscall (the last one, whose answer the next resume carries), resume_value,
    kill_reason (set when the kernel wants the process gone), mailbox (set by the kernel),
    weight (DEFAULT_WEIGHT), vruntime (ns on a CPU, scaled by DEFAULT_WEIGHT / weight) and
    namespace (interned: lua/fast_paths.c compares two by pointer)."""

    pid: int
    kind: str
    parent: int
    priority: int
    limits: Limits
    started_at_ms: int
    name: str | None = None
    program: str = ""  # source text of a Lua or Python program
    program_name: str = "program"  # chunk name shown in tracebacks
    args: Any = None
    # Monitoring: pids to tell when this process ends.
    monitored_by: set[int] = field(default_factory=set)
    monitoring: set[int] | None = None  # the live pids it monitors (made on its first monitor: most have none)
    # Parties blocked in Wait on this process.
    exit_waiters: list[Waiter] = field(default_factory=list)
    # The syscall this process is blocked in, if any.
    waiter: Waiter | None = None
    # Scheduling.
    runtime: Any = None  # a LuaProcess while the program lives
    parked: threading.Event | None = None  # set while preempted inside the count hook
    max_priority: int = 0  # the ceiling its priority may be raised back to: the one it was spawned with
    descendants: int = 0  # live processes below it, against limits.processes
    ancestors: tuple[int, ...] = ()  # parent, grandparent, ... (ended ones too), whose descendants it counts as
    queued_at: int = 0  # perf_counter_ns when last queued
    queued_vruntime: float = 0.0  # vruntime when last queued: what its namespace was charged up to
    yield_requested: bool = False  # the scheduler wants the CPU back before the quantum ends
    wall_timer: Any = None
    # Accounting. The mailbox counts messages sent and received; a Lua
    # process's CPU time is its State's (cpu_ns is a Python agent's).
    cpu_ns: int = 0
    tokens: int = 0
    log: list[tuple[int, str]] = field(default_factory=list)  # (written at ms, line): kernel/logs.py
    log_dropped: int = 0  # lines dropped from the front of `log` to bound its size
    log_bytes: int = 0  # bytes of the lines in `log`
    log_to_server: bool = False
    opener: str = ""  # a port's: the key of the client identity that opened it (api/authority.py)
    secret: str = ""  # a port's: the SHA-256 of the secret OpenPort returned (in memory only)

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def child_limits(parent: Process, asked: Limits, limits: Limits, kind: str) -> Limits:
    """A child's limits: at most its parent's. Asking for more is refused; a
    server default above the parent's limit is lowered to it. A Python agent's
    memory limit is its address space, which an interpreter needs far more of
    than a Lua heap: it is not bounded by a parent's (only by the server's)."""
    out = limits.as_dict()
    for key, ceiling in parent.limits.as_dict().items():
        if not ceiling or (key == "memory_bytes" and kind == PYTHON):
            continue
        wanted = getattr(asked, key)
        if wanted > ceiling:
            raise PermissionDenied(f"a child's limits are at most its parent's: {key} {wanted} > {ceiling}")
        if not out[key] or out[key] > ceiling:
            out[key] = ceiling
    return Limits(**out)

"""What the kernel is made with (KernelConfig), what Spawn asks of it (SpawnSpec), and the program that names."""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from ..api import checks as C
from ..api.errors import FailedPrecondition, InvalidArgument, NotFound
from ..services.files import FileLimits
from . import process as P
from .namespaces import Quotas
from .process import NO_LIMITS, Limits


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
    lib_dirs: tuple[str, ...] = ()  # --lib: directories Lua's require searches before llmos's own library
    max_message_bytes: int = 4 << 20
    max_processes: int = 65_536  # live processes and ports in the whole server
    namespace_processes: int = 0  # live processes and ports per namespace (0: only max_processes)
    namespace_quotas: Quotas = field(default_factory=Quotas)  # each namespace's until SetNamespace
    audit_rows: int = 100_000  # the audit log keeps this many newest rows
    process_log_bytes: int = 256 << 10  # characters of log a process keeps (the oldest lines go first)
    log_memory_bytes: int = 64 << 20  # characters of log kept in memory in all (ended processes' go first)
    log_retention: int = 10_000  # ended processes whose logs the store keeps (the newest pids); 0: none
    file_limits: FileLimits = field(default_factory=FileLimits)
    agent_socket: str | None = None  # the Unix socket Python agents reach the kernel on; None: no Python userland
    python_memory_bytes: int = 1 << 30  # default address-space limit of a Python agent (an interpreter needs more)
    max_agents: int = 64  # live Python agents at once (each is an interpreter: ~30 MiB idle); 0: no limit
    ended_cache: int = 100_000  # ended processes kept in memory for Wait; older ones are read from the store
    dead_letter_limit: int = 1_000_000  # dead letters a namespace's queue keeps; past it the oldest go
    idempotency_window_ms: int = 600_000  # how long a Send's idempotency_key is remembered
    idempotency_keys: int = 250_000  # keys remembered at most (~250 B each); past it the oldest are forgotten early

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
    limits: Limits = NO_LIMITS
    parent: int = 0
    monitor: bool = False
    log_to_server: bool = False  # also write the process's log lines to the server's log (boot programs)
    dead_letter: int = 0  # the pid that gets its undeliverable messages (kernel/acks.py); 0: none
    max_attempts: int = 0  # deliveries with ack before a message goes to dead_letter; 0: no limit
    durable: bool = False  # journaled and replayed across restarts (kernel/journal.py)


def resolve_program(spec: SpawnSpec, userland_root: str | None) -> tuple[str, str, str, pathlib.Path | None]:
    """The program a spawn names: (kind, source, name for tracebacks, the file if given by path)."""
    if (spec.lua is not None) + (spec.python is not None) + (spec.path is not None) != 1:
        raise InvalidArgument("give exactly one program: lua (source), python (source) or path")
    source_name = "program" if spec.source_name is None else C.name(spec.source_name, "source_name")
    if spec.lua is not None:
        return P.LUA, spec.lua, source_name, None
    if spec.python is not None:
        return P.PYTHON, spec.python, source_name, None
    root = userland_root
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

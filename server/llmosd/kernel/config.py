"""What the kernel is made with (KernelConfig) and what Spawn asks of it (SpawnSpec)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..services.files import FileLimits
from .process import Limits


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

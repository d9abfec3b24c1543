"""What the kernel needs from a userland: the interface each runtime (lua/, python/) implements.

The kernel never imports a userland. The daemon (main.py) makes each runtime
and registers it with `Kernel.add_runtime`; the kernel then reaches a
process's userland through `kernel.runtimes[proc.kind]`, and the process's own
side (a Lua state, an agent subprocess) through `proc.runtime`, which the
runtime sets and which provides `ProcessSide`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .logs import LogLine
from .process import Limits, Process


class ProcessSide(Protocol):
    """A live process's side in its userland (proc.runtime); read from any thread."""

    def cpu_ns(self) -> int: ...

    def memory_used(self) -> int: ...

    def log_lines(self, limit: int) -> list[LogLine] | None:
        """The process's last `limit` log lines with their times when its userland keeps it (an
        agent's output file); None: the kernel's."""


class Runtime(Protocol):
    kind: str  # process.LUA or process.PYTHON

    def check_program(self, source: str, name: str, defaults: Limits) -> Limits:
        """Refuse a program that cannot run (InvalidArgument, Unimplemented) before it is
        spawned, and return the server's default limits for this kind."""

    def attach(self, proc: Process, program_path: Path | None) -> None:
        """A process of this kind has just been created (kernel lock held)."""

    def run_slice(self, proc: Process) -> None:
        """Run `proc` on the calling worker thread until it blocks, ends or its quantum is spent."""

    def wants_cpu_back(self, proc: Process, now_ns: int, others_waiting: bool) -> int | None:
        """Seen from the scheduler's monitor: the start of `proc`'s running slice if it should
        be interrupted now, else None."""

    def kill(self, proc: Process) -> None:
        """`proc` is running (or parked mid-slice) and proc.kill_reason is set: end it
        soon (kernel lock held)."""

    def exit(self, proc: Process, result: Any) -> None:
        """The Exit syscall: set the result `proc` ends with (kernel lock held)."""

    def ended(self, proc: Process) -> None:
        """`proc` has ended: free what its userland holds for it (kernel lock held)."""

    def shutdown(self) -> None: ...

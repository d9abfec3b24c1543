"""The Python userland: programs run as sandboxed subprocesses (see sandbox/).

An agent talks to the kernel over gRPC on the kernel's agent socket, with a
token that lets it act only as its own pid (api/syscalls.py checks it). The
scheduler governs agents like Lua processes: one runs only while it holds a
virtual CPU; it is stopped (SIGSTOP) when its quantum is spent and someone
waits, and while it is blocked in a syscall, and continued (SIGCONT) when
it is scheduled again.

A virtual CPU is one CPU's worth of time, but an agent's threads (or the
processes it forks) can run on several host cores at once. So an agent's
CPU use is bounded as CFS bandwidth control bounds a cgroup's: CPU it uses
beyond the wall time it has held its virtual CPU is a debt, paid by staying
stopped, still holding that CPU (or, preempted, at the start of its next
slice), until the time held has caught up. Its use runs ahead of the time
held by at most a quantum per thread, so over time all agents together use
at most --cpus CPUs. The scheduler charges vruntime for the time it grants
(held); Usage.cpu_ms is the CPU the agent actually used.

A durable agent (spawn with durable) has its syscalls journaled at the agent socket's door and is
started again from the start after a restart (durable.py).

A boot agent (llmosd --spawn: log_to_server) has its output copied to the server's log as it is
written, as a Lua boot program's lines are (ServerLogCopier); other agents' output is only read
from their output file when asked for (log_lines).
"""
from __future__ import annotations

import codecs
import json
import logging
import os
import math
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import grpc

from ..kernel import process as P
from ..api.errors import InvalidArgument, ResourceExhausted
from ..kernel.kernel import server_log_line
from ..kernel.logs import MAX_LINE, LogLine, cut_line
from ..kernel.process import Limits
from .durable import agent_handler, durable_service
from .sandbox import Child, ExitStatus, Launcher, LauncherConfig, Limits as SandboxLimits, SpawnSpec
from .sandbox.launcher import unstamp

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel
    from ..kernel.process import Process

log = logging.getLogger(__name__)

# CPU an agent may use beyond the time it has held its virtual CPU before it
# is stopped to pay it back (see the module docstring).
THROTTLE_S = 0.002
# How often a boot agent's output is looked at for new lines (ServerLogCopier), and how much is read at once.
LOG_POLL_S = 0.05
LOG_CHUNK_BYTES = 64 << 10


class Agents:
    """The fork server, the credentials of the running Python agents, and how many may live at once."""

    def __init__(self, work_root: Path, socket_path: Path, read_only: tuple[Path, ...], max_agents: int) -> None:
        if max_agents < 0:
            raise ValueError("max_agents must be 0 (no limit) or more")
        self.config = LauncherConfig(work_root=work_root, kernel_socket=socket_path, read_only=read_only)
        self.launcher: Launcher | None = None
        self.tokens: dict[str, int] = {}  # token -> pid
        self.max_agents = max_agents  # 0: no limit
        self.live = 0  # Python processes spawned and not ended (kernel lock)
        self.stopping = False  # the server is stopping: its durable agents stay live in the store (_watch)
        self._start_lock = threading.Lock()

    def admit(self) -> None:
        """Count one more live agent, or refuse it (kernel lock held). An idle agent is an
        interpreter of its own (some 30 MiB), so their number is bounded server-wide."""
        if self.max_agents and self.live >= self.max_agents:
            raise ResourceExhausted(
                f"{self.live} Python agents are live, the most this server runs at once (--max-agents); "
                "spawn again when one has ended")
        self.live += 1

    def launcher_ready(self) -> Launcher:
        """The fork server, started on first use (it preloads grpc and the SDK: about a second)."""
        with self._start_lock:
            if self.launcher is None:
                launcher = Launcher(self.config)
                launcher.start()
                self.launcher = launcher
            return self.launcher

    def pid_of(self, token: str) -> int | None:
        return self.tokens.get(token)

    def shutdown(self) -> None:
        self.stopping = True
        if self.launcher is not None:
            self.launcher.shutdown()


class PythonRuntime:
    """The Python userland's runtime (kernel/runtime.py's interface)."""

    kind = P.PYTHON

    def __init__(self, kernel: Kernel) -> None:
        config = kernel.config
        assert config.agent_socket
        self.kernel = kernel
        roots = (Path(config.userland_root),) if config.userland_root else ()
        self.agents = Agents(Path(config.data_dir) / "python", Path(config.agent_socket), roots, config.max_agents)

    def check_program(self, source: str, name: str, defaults: Limits) -> Limits:
        try:
            compile(source, name, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            raise InvalidArgument(f"Python syntax error: {e}") from None
        return Limits(**{**defaults.as_dict(), "memory_bytes": self.kernel.config.python_memory_bytes})

    def attach(self, proc: Process, program_path: Path | None) -> None:
        proc.runtime = PythonProcess(self.kernel, self.agents, proc, program_path)

    def run_slice(self, proc: Process) -> None:
        agent = proc.runtime  # None once ended: killed while it was queued
        if agent is not None:
            agent.run_slice()

    def wants_cpu_back(self, proc: Process, now_ns: int, others_waiting: bool) -> int | None:
        return None  # its slice's own thread watches the quantum

    def kill(self, proc: Process) -> None:
        proc.runtime.terminate()  # the fork server's report of its exit ends it, with proc.kill_reason

    def exit(self, proc: Process, result: Any) -> None:
        proc.runtime.result = result

    def ended(self, proc: Process) -> None:
        proc.runtime.release()

    def server_stopping(self) -> None:
        """The server is about to stop: a durable agent that ends from now on (its calls fail as the
        agent socket stops) is not ended, and its next start brings it back."""
        self.agents.stopping = True

    def shutdown(self) -> None:
        self.agents.shutdown()

    def pid_of(self, token: str) -> int | None:
        """The live agent a call's llmos-token names."""
        return self.agents.pid_of(token)

    def agent_handler(self, method: Any, fn: Callable) -> Callable:
        """The agent socket's handler of `method`: `fn`, with durable agents' calls journaled."""
        return agent_handler(self.kernel, method, fn)

    def agent_services(self) -> list[grpc.GenericRpcHandler]:
        """The agent socket's services beyond llmos.v1.Kernel: durable agents' clock (python/durable.py)."""
        return [durable_service(self.kernel, self.agents.pid_of)]

    def blocking(self, pid: int, syscall: str) -> None:
        """An agent is about to wait in `syscall`: its CPU goes to someone else.
        The call may arrive after the slice it was made in has ended (the agent sent it just
        before it was stopped): the agent is RUNNABLE then, and is BLOCKED all the same, or it
        would be scheduled, and shown runnable, for as long as it waits."""
        kernel = self.kernel
        with kernel.lock:
            proc = kernel.procs.get(pid)
            if proc is None or proc.kind != P.PYTHON or proc.state not in (P.RUNNING, P.RUNNABLE):
                return
            agent = proc.runtime
            if proc.state == P.RUNNABLE:
                if agent.in_slice:
                    agent.requeue_after_slice = False  # its slice's end will not queue it
                else:
                    agent.queued_while_blocked = True  # its entry in the run queue is passed over
            proc.state, proc.blocked_on = P.BLOCKED, syscall
            agent.wake.set()

    def resumed(self, pid: int) -> None:
        """An agent's wait is over: it may run again when scheduled."""
        kernel = self.kernel
        with kernel.lock:
            proc = kernel.procs.get(pid)
            if proc is None or proc.kind != P.PYTHON or proc.state != P.BLOCKED:
                return
            proc.state, proc.blocked_on = P.RUNNABLE, None
            agent = proc.runtime
            if agent.queued_while_blocked:
                agent.queued_while_blocked = False  # its entry is still in the run queue
                return
            if agent.in_slice:
                agent.requeue_after_slice = True
                return
        kernel.scheduler.make_runnable(proc)


class PythonProcess:
    """One agent subprocess and the state its slices need."""

    def __init__(self, kernel: Kernel, agents: Agents, proc: Process, program_path: Path | None) -> None:
        agents.admit()
        self.kernel = kernel
        self.agents = agents
        self.proc = proc
        self.program_path = program_path
        self.token = secrets.token_urlsafe(32)
        self.child: Child | None = None
        self.wake = threading.Event()  # ends the current slice: blocked, exited or killed
        self.in_slice = False
        self.requeue_after_slice = False  # unblocked while its slice was still ending
        self.queued_while_blocked = False  # blocked while queued: that queue entry runs nothing
        self.result: Any = None  # set by the Exit syscall
        self.cpu_s = 0.0  # CPU seconds used, as last read
        self.debt_s = 0.0  # CPU seconds used beyond the virtual CPU time held, still to pay
        self._looked_at = 0.0  # monotonic time of the last charge in this slice
        self._cpu_lock = threading.Lock()
        self.log_copier: ServerLogCopier | None = None  # a boot agent's (log_to_server)

    def start(self) -> None:
        """Launch the subprocess (on the first slice)."""
        agents = self.agents
        proc = self.proc
        limits = proc.limits
        sandbox_limits = SandboxLimits(
            cpu_s=math.ceil(limits.cpu_ms / 1000) if limits.cpu_ms else None,
            memory_bytes=limits.memory_bytes or None,
            wall_s=None,  # the kernel's own wall timer ends it, with the same reason
        )
        agents.tokens[self.token] = proc.pid
        journal = self.kernel.journals.get(proc.pid)
        spec = SpawnSpec(
            pid=proc.pid, token=self.token, args_json=json.dumps(proc.args),
            source=None if self.program_path else proc.program, path=self.program_path, limits=sandbox_limits,
            durable_seed=None if journal is None else journal.seed,
        )
        self.child = agents.launcher_ready().spawn(spec)
        if proc.log_to_server:
            self.log_copier = ServerLogCopier(proc, self.child, self.kernel.config.process_log_bytes)
        threading.Thread(target=self._watch, name=f"agent-{proc.pid}", daemon=True).start()

    def run_slice(self) -> None:
        """Let the agent run (SIGCONT) until it blocks, ends, or its quantum is
        spent while someone waits; then stop it (SIGSTOP). The worker thread
        waits meanwhile, holding the virtual CPU the agent runs on, and keeps
        the agent stopped while it owes CPU (see the module docstring)."""
        kernel, proc = self.kernel, self.proc
        with kernel.lock:
            if proc.ended:
                return
            if self.queued_while_blocked:  # (see blocking): its wait's end queues it again
                self.queued_while_blocked = False
                return
            proc.state, self.in_slice, self.requeue_after_slice = P.RUNNING, True, False
            self.wake.clear()
        self._looked_at = time.monotonic()
        throttled = False
        if self.child is None:
            try:
                self.start()
            except Exception as e:  # the fork server is down, or refused
                with kernel.lock:
                    kernel.end_locked(proc, P.CRASHED, "error", error=f"cannot start the Python agent: {e}")
                return
            with kernel.lock:
                if proc.kill_reason is not None:  # killed while starting: its exit report ends it
                    self.child.kill()
        else:
            throttled = self.debt_s > THROTTLE_S  # a debt from its last slice: paid first
            if not throttled:
                self.child.cont()
        quantum_s = kernel.config.quantum_s
        try:
            while not self.wake.wait(min(self.debt_s, quantum_s) if throttled else quantum_s):
                self._charge()
                if proc.limits.cpu_ms and proc.cpu_ns > proc.limits.cpu_ms * 1_000_000:
                    kernel.kill(proc.pid, "cpu_limit")
                elif kernel.scheduler.should_yield(proc):
                    break
                elif throttled != (self.debt_s > THROTTLE_S):
                    throttled = not throttled
                    if throttled:
                        self.child.stop()
                    else:
                        self.child.cont()
        finally:
            self._charge()
            with kernel.lock:
                self.in_slice = False
                if proc.ended or proc.kill_reason is not None:
                    return  # the fork server's exit report ends it
                self.child.stop()
                requeue = self.requeue_after_slice
                if proc.state == P.RUNNING:  # preempted
                    proc.state = P.RUNNABLE
                    requeue = True
            if requeue:
                kernel.scheduler.requeue(proc)

    def _watch(self) -> None:
        """Wait for the fork server's report of the agent's exit, and end the process."""
        assert self.child is not None
        status = self.child.wait()
        assert status is not None
        if self.log_copier is not None:
            self.log_copier.join()  # its last lines reach the server's log before its end does
        self._take_cpu()  # the final figure, from the exit's resource usage
        kernel, proc = self.kernel, self.proc
        with kernel.lock:
            self.wake.set()
            if proc.ended or (self.agents.stopping and proc.pid in kernel.journals):
                return  # (a durable agent the server's stop killed comes back at its next start)
            state, reason, result, error = exit_outcome(status, self.result)
            if proc.kill_reason is not None:
                state, reason = P.KILLED, proc.kill_reason
            kernel.end_locked(proc, state, reason, result=result, error=error)

    def _charge(self) -> None:
        """Charge the time since the last look in this slice: the virtual CPU held
        to vruntime (the scheduler charges what it grants), and CPU used beyond
        it to the debt."""
        now = time.monotonic()
        held, self._looked_at = now - self._looked_at, now
        used = self._take_cpu()
        proc = self.proc
        self.kernel.core.charge(proc, int(held * 1e9))
        self.debt_s = max(self.debt_s + used - held, 0.0)

    def _take_cpu(self) -> float:
        """Read the CPU the agent has used (Usage.cpu_ms); the seconds used since the last reading."""
        if self.child is None:
            return 0.0
        with self._cpu_lock:  # the slice's thread and the exit watcher both read
            used = max(self.child.cpu_time() - self.cpu_s, 0.0)
            self.cpu_s += used
            self.proc.cpu_ns = int(self.cpu_s * 1e9)
        return used

    def terminate(self) -> None:
        """Kill the subprocess (it ends the process once the fork server reports its exit)."""
        self.agents.tokens.pop(self.token, None)
        if self.child is not None:
            self.child.kill()
        self.wake.set()

    def release(self) -> None:
        """The process has ended (kernel lock held): no subprocess, no token, one live agent fewer."""
        self.terminate()
        self.agents.live -= 1

    def log_lines(self, limit: int) -> list[LogLine]:
        """The agent's output file's last `limit` lines, each with the time its stdio stamped it."""
        if self.child is None:
            return []
        try:
            return self.child.read_log_lines(limit, self.proc.started_at_ms)
        except OSError:
            return []

    def memory_used(self) -> int:
        return self.child.rss() if self.child is not None else 0

    def cpu_ns(self) -> int:
        return self.proc.cpu_ns


class ServerLogCopier:
    """Copies a boot agent's output to the server's log as it is written: each line with the agent's
    pid and the time its stdio stamped it (unstamp), through kernel.server_log_line as a Lua boot
    program's lines; once the agent has exited, the rest (a last line without its newline too).

    Bounded like a process's own log: a line is cut at MAX_LINE characters and no more of it is
    held; output written faster than it is copied is left out down to its last `behind_bytes`
    (the per-process log cap), with a warning saying how much."""

    def __init__(self, proc: Process, child: Child, behind_bytes: int) -> None:
        self.proc, self.child, self.behind_bytes = proc, child, behind_bytes
        self._above_ms = proc.started_at_ms  # the time of the line above (unstamp)
        self._skipping = False  # in a line whose start was left out: not copied
        self._new_line()
        self._thread = threading.Thread(target=self._run, name=f"agent-{proc.pid}-log", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait until the agent's output has all been copied (once it has exited)."""
        self._thread.join()

    def _run(self) -> None:
        try:
            with open(self.child.log_path, "rb") as output:
                output.seek(self.child.log_start)
                while True:
                    exited = self.child.status is not None  # then all it wrote is in the file
                    copied = self._copy(output)
                    if exited:
                        break
                    if not copied:
                        self.child.wait(LOG_POLL_S)
            if self._begun:  # a last line without its newline
                self._end_line()
        except OSError as e:
            log.warning("pid %d's output is no longer copied to the server's log: %s", self.proc.pid, e,
                        extra={"pid": self.proc.pid})

    def _copy(self, output: BinaryIO) -> bool:
        """Copy what the agent has written since the last look (at most `behind_bytes`); whether
        there was any."""
        behind = os.fstat(output.fileno()).st_size - output.tell()
        if behind > self.behind_bytes:
            output.seek(behind - self.behind_bytes, os.SEEK_CUR)
            log.warning("pid %d's output: %d bytes left out of the server's log (written faster than copied)",
                        self.proc.pid, behind - self.behind_bytes, extra={"pid": self.proc.pid})
            behind, self._skipping = self.behind_bytes, True
            self._new_line()
        left = behind
        while left > 0:
            chunk = output.read(min(left, LOG_CHUNK_BYTES))
            if not chunk:
                break
            left -= len(chunk)
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                self._take(chunk[start:end])
                if self._skipping:
                    self._skipping = False
                else:
                    self._end_line()
                start = end + 1
            self._take(chunk[start:])
        return behind > 0

    def _new_line(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._kept: list[str] = []  # the line's first characters: its stamp and MAX_LINE more at most
        self._kept_chars = 0
        self._chars = 0  # the line's length so far
        self._last = ""  # its last character so far
        self._begun = False  # any of it has been read

    def _take(self, piece: bytes) -> None:
        if not self._skipping and piece:
            self._begun = True
            self._keep(self._decoder.decode(piece))

    def _keep(self, text: str) -> None:
        room = MAX_LINE + 32 - self._kept_chars  # 32: room for the stamp
        if room > 0 and text:
            self._kept.append(text[:room])
            self._kept_chars += min(len(text), room)
        self._chars += len(text)
        self._last = text[-1:] or self._last

    def _end_line(self) -> None:
        self._keep(self._decoder.decode(b"", final=True))  # a character cut short, as U+FFFD
        kept = "".join(self._kept)
        self._above_ms, line = unstamp(kept, self._above_ms, self.proc.started_at_ms, time.time_ns() // 1_000_000)
        chars = self._chars - (len(kept) - len(line))  # without its stamp and final "\r"
        if self._chars > self._kept_chars and self._last == "\r":
            chars -= 1  # the "\r" unstamp removes was beyond what was kept
        server_log_line(self.proc, cut_line(line, chars), self._above_ms)
        self._new_line()


def exit_outcome(status: ExitStatus, result: Any) -> tuple[str, str, Any, str | None]:
    """(state, exit reason, result, error) for an agent's exit status."""
    if status.reason == "exited":
        if status.code == 0:
            return P.EXITED, "normal", result, None
        return P.CRASHED, "error", None, f"exited with status {status.code}"
    if status.reason in ("exception", "sandbox_error"):
        return P.CRASHED, "error", None, status.error
    if status.reason in ("memory_limit", "cpu_limit", "wall_limit"):
        return P.KILLED, status.reason, None, status.error
    if status.reason == "killed":
        return P.KILLED, "killed", None, status.error
    return P.CRASHED, "error", None, f"killed by signal {status.signal}"

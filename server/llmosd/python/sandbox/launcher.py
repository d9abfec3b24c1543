"""The kernel-side half: Launcher (owns the zygote) and Child (one running agent)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .child import EXIT_SETUP, LOG_STAMP

log = logging.getLogger("llmosd.python.sandbox")

_SERVER_DIR = str(Path(__file__).resolve().parents[3])
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STAMP = re.compile(LOG_STAMP + "([0-9]{1,15}) ")  # what begins a line of an agent's log (child.py)
_STAMP_AT_LINE_STARTS = re.compile(b"(?m)^" + _STAMP.pattern.encode())
DEFAULT_PRELOAD = ("json", "grpc", "google.protobuf", "google.protobuf.struct_pb2", "llmos", "llmos.userland")


@dataclass(frozen=True)
class Limits:
    """Per-agent resource limits; None means unlimited.

    memory_bytes caps the address space (RLIMIT_AS), which includes the
    preloaded modules inherited from the zygote (see Launcher.baseline_vsz).
    processes counts tasks (threads included) and needs a user namespace and a
    non-root launcher; as root, agents get threads but no child processes.
    file_size also caps the process log, which the agent writes itself.
    cpu_s is enforced in whole seconds (rounded up) by RLIMIT_CPU.
    """

    cpu_s: float | None = None
    memory_bytes: int | None = 1 << 30
    wall_s: float | None = None
    open_files: int | None = 256
    processes: int | None = 64
    file_size: int | None = 64 << 20


@dataclass(frozen=True)
class SpawnSpec:
    """What to run: exactly one of source (Python text) or path (a file read before confinement)."""

    pid: int
    token: str
    source: str | None = None
    path: Path | None = None
    args_json: str = "null"
    limits: Limits = field(default_factory=Limits)
    env: dict[str, str] = field(default_factory=dict)
    # A durable agent's seed (kernel/journal.py): its interpreter's PYTHONHASHSEED and `random`'s
    # seed come from it, the same in every run (child.py).
    durable_seed: int | None = None


@dataclass(frozen=True)
class ExitStatus:
    """How an agent ended.

    reason is one of: "exited" (the program returned or called sys.exit; see
    code), "exception" (uncaught exception, code 1, error holds its last line),
    "memory_limit" (MemoryError escaped), "cpu_limit", "wall_limit", "killed"
    (Child.kill, Launcher.shutdown, or the fork server died), "signal" (died of
    another signal), "sandbox_error" (confinement failed before the program
    started; error says why).
    """

    reason: str
    code: int | None = None
    signal: int | None = None
    error: str | None = None
    cpu_s: float = 0.0
    max_rss: int = 0


@dataclass(frozen=True)
class LauncherConfig:
    """Launcher settings. disable names layers to leave off ("userns", "netns", "pidns",
    "landlock", "seccomp"); read_only adds paths agents may read (e.g. a userland root)."""

    work_root: Path
    kernel_socket: Path
    python: str = sys.executable
    allow_network: bool = False
    keep_workdirs: bool = False
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    read_only: tuple[Path, ...] = ()
    disable: frozenset[str] = frozenset()


@dataclass
class _Pending:
    """A spawn request waiting for the zygote's answer."""

    spec: SpawnSpec
    payload_fd: int
    workdir: Path
    log_path: Path
    done: threading.Event = field(default_factory=threading.Event)
    child: Child | None = None
    error: str = ""


class SandboxError(RuntimeError):
    """The fork server is not running, or could not start an agent."""


class Child:
    """A running (or finished) agent. Signals go through a pidfd, so they never hit a reused pid.

    Where agents may start processes (``Launcher.fork_limit`` other than "seccomp"), stop,
    cont and kill reach the agent's whole process group (the agent is a session leader, and
    the seccomp filter keeps its processes from leaving its group), and cpu_time counts every
    process it started.
    """

    def __init__(self, launcher: Launcher, spec: SpawnSpec, os_pid: int, pidfd: int, payload_fd: int,
                 workdir: Path, log_path: Path, forks: bool) -> None:
        self.pid = spec.pid
        self.os_pid = os_pid
        self.workdir = workdir
        self.log_path = log_path
        self.log_start = 0  # the log's size when this agent was spawned: its output follows (spawn)
        self._limits = spec.limits
        self._launcher = launcher
        self._pidfd = pidfd
        self._payload_fd = payload_fd
        self._forks = forks
        self._done = threading.Event()
        self._fd_lock = threading.Lock()
        self._status: ExitStatus | None = None
        self._killed = False
        self._cpu_s = 0.0  # the last reading of cpu_time(), kept once the process is gone

    def _signal(self, sig: int) -> bool:
        # Under the lock so that _finish cannot close the pidfd (and its number be reused) meanwhile.
        with self._fd_lock:
            if self._pidfd < 0:
                return False
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:  # exited, not yet reaped
                return False
            if self._forks:
                # The leader was alive (unreaped) just now, so its group id is still its own.
                try:
                    os.killpg(self.os_pid, sig)
                except OSError:
                    pass
        return True

    def _alive(self) -> bool:
        """True while the agent has not been reaped (so its host pid is still its own)."""
        with self._fd_lock:
            if self._pidfd < 0:
                return False
            try:
                signal.pidfd_send_signal(self._pidfd, 0)
            except OSError:
                return False
        return True

    def stop(self) -> bool:
        """SIGSTOP the agent (the scheduler's preemption); False if it has ended."""
        return self._signal(signal.SIGSTOP)

    def cont(self) -> bool:
        """SIGCONT the agent; False if it has ended."""
        return self._signal(signal.SIGCONT)

    def kill(self) -> bool:
        """SIGKILL the agent and, through its pid namespace, everything it started."""
        self._killed = True
        return self._signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """The exit status, or None if the agent is still running after timeout seconds."""
        if not self._done.wait(timeout):
            return None
        return self._status

    @property
    def status(self) -> ExitStatus | None:
        """The exit status if the agent has ended, else None."""
        return self._status

    def cpu_time(self) -> float:
        """CPU seconds used (user + system) by all the agent's threads, live and ended, and, where
        agents may fork, by every process it started; final once ended (then from its rusage)."""
        if self._status is not None:
            return self._status.cpu_s
        if self._forks:
            used = _tree_cpu(self.os_pid)
        else:
            try:
                used = time.clock_gettime(_cpu_clock(self.os_pid))
            except OSError:  # reaped already: its status comes next
                return self._cpu_s
        if self._alive():  # else the pid may have been reused before the reading
            self._cpu_s = max(self._cpu_s, used)
        return self._cpu_s

    def rss(self) -> int:
        """Resident set size in bytes now (0 once ended)."""
        if self._status is not None:
            return 0
        try:
            with open(f"/proc/{self.os_pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def read_log(self, max_bytes: int = 1 << 20) -> bytes:
        """The last max_bytes of the process log (stdout and stderr, interleaved), as the program
        wrote it: without the times its lines begin with."""
        return _STAMP_AT_LINE_STARTS.sub(b"", self._log_tail(max_bytes))

    def read_log_lines(self, limit: int, not_before_ms: int, max_bytes: int = 1 << 20) -> list[tuple[int, str]]:
        """The last `limit` lines of the log, each with the time it was begun (ms since the epoch;
        see unstamp: a line without a believable stamp has the time of the line above it, the first
        `not_before_ms`)."""
        now_ms = time.time_ns() // 1_000_000
        text = self._log_tail(max_bytes).decode(errors="replace")
        lines = text.removesuffix("\n").split("\n")[-limit:] if text else []
        out, at = [], not_before_ms
        for line in lines:
            at, line = unstamp(line, at, not_before_ms, now_ms)
            out.append((at, line))
        return out

    def _log_tail(self, max_bytes: int) -> bytes:
        with open(self.log_path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            return f.read()

    def _finish(self, msg: dict[str, Any] | None) -> None:
        """Build the ExitStatus from the zygote's exit record (None: the zygote died)."""
        outcome: dict[str, Any] = {}
        try:
            raw = os.pread(self._payload_fd, 16384, 0)
            outcome = json.loads(raw) if raw and raw.startswith(b'{"kind"') else {}
        except (OSError, ValueError):
            pass
        finally:
            os.close(self._payload_fd)
            with self._fd_lock:
                os.close(self._pidfd)
                self._pidfd = -1
        if msg is None:
            status = ExitStatus("killed", error="the fork server died")
        else:
            status = _classify(msg, outcome, self._limits, self._killed)
        if not self._launcher.config.keep_workdirs:
            _remove_tree(self.workdir)
        self._status = status
        self._done.set()


def unstamp(line: str, above_ms: int, not_before_ms: int, now_ms: int) -> tuple[int, str]:
    """(the time it was begun, its text) of one `line` of an agent's log (without its newline), the
    line above it begun at `above_ms`.

    The program can write the file around the stamps its stdio writes (child.py), so a stamp is
    believed only if it is a possible time: from `not_before_ms` (the process's start) to `now_ms`
    (the reading); a line without a believable one (written around sys.stdout: raw fds, a
    subprocess's output, or a stamp the program made up) has the time of the line above it. A
    stamp at a line's start is removed; the program's own text, after it, is never read as one."""
    at = above_ms
    stamp = _STAMP.match(line)
    if stamp is not None:
        line = line[stamp.end():]
        if not_before_ms <= int(stamp.group(1)) <= now_ms:
            at = int(stamp.group(1))
    return at, line.removesuffix("\r")


def _cpu_clock(pid: int) -> int:
    """The clock id of process `pid`'s CPU time, as clock_getcpuclockid(3) makes it (CPUCLOCK_SCHED:
    nanosecond precision, the sum of all its threads, including those that have ended)."""
    return ((~pid) << 3) | 2


def _tree_cpu(root: int) -> float:
    """CPU seconds of `root` and of its descendants, live (their CPU clocks) or reaped (cutime, cstime)."""
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += time.clock_gettime(_cpu_clock(pid)) + (int(fields[13]) + int(fields[14])) / _CLK_TCK
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(child) for child in f.read().split())
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return total


def _classify(msg: dict[str, Any], outcome: dict[str, Any], limits: Limits, killed: bool) -> ExitStatus:
    """Exit reason from what the kernel says first; the agent's own record only refines a normal exit."""
    ws = msg["status"]
    cpu, rss = msg["cpu_s"], msg["maxrss"]
    if os.WIFSIGNALED(ws):
        sig = os.WTERMSIG(ws)
        if msg["cause"] == "wall_limit":
            reason = "wall_limit"
        elif killed or msg["cause"] == "killed":
            reason = "killed"
        # RLIMIT_CPU is enforced on precise runtime, rusage comes from tick sampling: allow the gap.
        elif sig in (signal.SIGKILL, signal.SIGXCPU) and limits.cpu_s is not None and cpu >= limits.cpu_s * 0.8:
            reason = "cpu_limit"
        else:
            reason = "signal"
        return ExitStatus(reason, signal=sig, cpu_s=cpu, max_rss=rss)
    code = os.WEXITSTATUS(ws)
    kind = outcome.get("kind")
    if code == EXIT_SETUP and kind == "sandbox_error":
        return ExitStatus("sandbox_error", code=code, error=outcome.get("error"), cpu_s=cpu, max_rss=rss)
    if kind in ("exception", "memory_limit") and code == 1:
        return ExitStatus(kind, code=code, error=outcome.get("error"), cpu_s=cpu, max_rss=rss)
    return ExitStatus("exited", code=code, cpu_s=cpu, max_rss=rss)


def _remove_tree(path: Path) -> None:
    """rmtree that also clears directories the agent made unreadable; the agent is dead by now."""
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):  # never chmod through a link the agent planted
                os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _zygote_env() -> dict[str, str]:
    """Only what the interpreter needs: agents inherit the zygote's memory, so no kernel secrets."""
    keep = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
            "LD_LIBRARY_PATH")
    return {k: v for k, v in os.environ.items() if k in keep}


class Launcher:
    """Starts and contains sandboxed Python agents through a fork server (see the package docs)."""

    def __init__(self, config: LauncherConfig) -> None:
        self.config = config
        self.layers: frozenset[str] = frozenset()
        self.notices: list[str] = []
        self.fork_limit = "none"
        self.read_only: list[str] = []
        self.zygote_pid: int | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._children: dict[int, Child] = {}
        self._hello = threading.Event()
        self._start_error: BaseException | None = None
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()

    # -- lifecycle ---------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start the fork server and wait until it has preloaded and probed the host."""
        (self.config.work_root / "agents").mkdir(parents=True, exist_ok=True)
        (self.config.work_root / "logs").mkdir(parents=True, exist_ok=True)
        # The zygote is started from the reader thread, which lives exactly as long as
        # the zygote: its PR_SET_PDEATHSIG fires when the *thread* that forked it ends.
        self._reader = threading.Thread(target=self._run, name="pysandbox-zygote", daemon=True)
        self._reader.start()
        if not self._hello.wait(timeout):
            raise SandboxError("the fork server did not start in time")
        if self._start_error is not None:
            raise SandboxError(f"the fork server failed to start: {self._start_error}")
        log.info("python sandbox layers: %s; fork limit: %s", ", ".join(sorted(self.layers)) or "none",
                 self.fork_limit)
        for notice in self.notices:
            log.warning("python sandbox: %s", notice)

    def _run(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        injected = _SERVER_DIR  # so the zygote imports this very package; agents do not get it on sys.path
        config = {"preload": list(self.config.preload), "allow_network": self.config.allow_network,
                  "read_only": [str(p) for p in self.config.read_only],
                  "disable": sorted(self.config.disable), "injected_path": injected}
        boot = f"import sys\nsys.path.insert(1, {injected!r})\nfrom llmosd.python.sandbox.zygote import main\nmain()\n"
        try:
            proc = subprocess.Popen(
                [self.config.python, "-c", boot, str(theirs.fileno()), str(os.getpid()), json.dumps(config)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True, env=_zygote_env())
        except OSError as exc:
            self._start_error = exc
            self._hello.set()
            return
        finally:
            theirs.close()
        self._sock = ours
        self.zygote_pid = proc.pid
        try:
            self._read_loop()
        finally:
            proc.wait()
            self._closed.set()
            self._fail_all()
            if not self._hello.is_set():
                self._start_error = SandboxError(f"fork server exited with {proc.returncode}")
                self._hello.set()

    def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, 1 << 16, 4)
            except OSError:
                return
            if not data:
                return
            msg = json.loads(data)
            op = msg["op"]
            if op == "hello":
                self.layers = frozenset(msg["layers"])
                self.notices = msg["notices"]
                self.fork_limit = msg["fork_limit"]
                self.read_only = msg["read_only"]
                self._hello.set()
            elif op in ("spawned", "spawn_failed"):
                with self._lock:
                    pending = self._pending.pop(msg["seq"])
                    if op == "spawned":
                        # Registered here, not by spawn(), so an exit record that follows at once finds it.
                        pending.child = Child(self, pending.spec, msg["os_pid"], fds[0], pending.payload_fd,
                                              pending.workdir, pending.log_path, self.fork_limit != "seccomp")
                        self._children[msg["seq"]] = pending.child
                    else:
                        pending.error = msg["error"]
                pending.done.set()
            elif op == "exit":
                with self._lock:
                    child = self._children.pop(msg["seq"], None)
                if child is not None:
                    child._finish(msg)
            elif op == "bye":
                return

    def _fail_all(self) -> None:
        """The zygote is gone: its agents died with it (PR_SET_PDEATHSIG)."""
        with self._lock:
            children, self._children = self._children, {}
            pending, self._pending = self._pending, {}
        for child in children.values():
            child._finish(None)
        for p in pending.values():
            p.error = "fork server gone"
            p.done.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Kill every agent and stop the fork server."""
        if self._sock is None or self._closed.is_set():
            return
        try:
            self._sock.send(json.dumps({"op": "shutdown"}).encode())
        except OSError:
            pass
        self._closed.wait(timeout)
        self._sock.close()

    # -- agents --------------------------------------------------------------------
    def spawn(self, spec: SpawnSpec, timeout: float = 30.0) -> Child:
        """Fork a sandboxed agent running spec's program; returns once it exists."""
        if (spec.source is None) == (spec.path is None):
            raise ValueError("give exactly one of source and path")
        if self._sock is None or self._closed.is_set():
            raise SandboxError("the launcher is not running")
        workdir = self.config.work_root / "agents" / str(spec.pid)
        log_path = self.config.work_root / "logs" / f"{spec.pid}.log"
        if workdir.exists():  # a durable agent's, left by a server killed before it could clean up
            _remove_tree(workdir)
        try:  # the log is appended to: a durable agent's earlier runs' output comes first
            log_start = log_path.stat().st_size
        except FileNotFoundError:
            log_start = 0
        payload = {"pid": spec.pid, "token": spec.token, "socket": str(self.config.kernel_socket),
                   "args_json": spec.args_json, "env": spec.env, "source": spec.source,
                   "durable_seed": spec.durable_seed,
                   "path": None if spec.path is None else str(Path(spec.path).resolve())}
        # The agent's secrets go straight to it in a memfd the zygote only passes on.
        payload_fd = os.memfd_create(f"llmos-agent-{spec.pid}", os.MFD_CLOEXEC)
        pending = _Pending(spec, payload_fd, workdir, log_path)
        try:
            os.write(payload_fd, json.dumps(payload).encode())
            with self._lock:
                self._seq += 1
                seq = self._seq
                self._pending[seq] = pending
            limits = asdict(spec.limits)
            request = {"op": "spawn", "seq": seq, "workdir": str(workdir), "log": str(log_path),
                       "limits": limits, "wall_s": limits.pop("wall_s")}
            socket.send_fds(self._sock, [json.dumps(request).encode()], [payload_fd])
            if not pending.done.wait(timeout):
                raise SandboxError(f"spawn of pid {spec.pid} timed out")
        except BaseException:
            if pending.child is None:
                os.close(payload_fd)
            raise
        if pending.child is None:
            os.close(payload_fd)
            raise SandboxError(f"spawn of pid {spec.pid} failed: {pending.error}")
        pending.child.log_start = log_start
        return pending.child

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


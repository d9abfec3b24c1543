"""The fork server (zygote): a single-threaded process that forks sandboxed agents.

Started by Launcher.start() as ``python -c ... zygote.main()`` with one end of a
SOCK_SEQPACKET socketpair. It imports the heavy modules once (grpc, protobuf,
json, the llmos SDK when importable), probes which sandbox layers the host
allows, and then forks each agent with clone(2) straight into new user,
network and pid namespaces. Being single-threaded is what makes the forks
safe; it never runs agent code itself and never sees an agent's token, source
or arguments (those travel in a memfd from the launcher to the child, so a
forked agent cannot find another agent's secrets in its copy of our memory).

Messages are JSON objects, one per datagram; fds ride along as SCM_RIGHTS.
  launcher -> zygote: {"op": "spawn", "seq", "workdir", "log", "limits", "wall_s"} + [payload memfd]
                      {"op": "shutdown"}
  zygote -> launcher: {"op": "hello", "layers", "notices", "fork_limit", "landlock_abi", "pid"}
                      {"op": "spawned", "seq", "os_pid"} + [pidfd]
                      {"op": "spawn_failed", "seq", "error"}
                      {"op": "exit", "seq", "status", "cpu_s", "maxrss", "cause"}
                      {"op": "bye"}
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import _linux
from .child import agent_main, map_ids

_SYSTEM_READ_ONLY = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib",
                     "/usr/share/zoneinfo", "/sys/devices/system/cpu")
_M_ARENA_MAX = -8


@dataclass
class _Agent:
    seq: int
    deadline: float | None
    cause: str | None = None  # why we killed it: "wall_limit" or "killed" (shutdown)


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _preload(names: list[str], notices: list[str]) -> list[str]:
    """Import the modules every agent would otherwise import itself; return the loaded ones' dirs."""
    dirs = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # optional: the SDK or grpc may be absent from this interpreter
            notices.append(f"preload {name}: not importable ({type(exc).__name__}: {exc})")
            continue
        path = getattr(mod, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)))
    return dirs


def _probe_child(flags: int, abi: int, layers_wanted: set[str]) -> int:
    """Fork a throwaway child that tries the per-child layers; 0 = all worked, else a bitmask."""
    uid, gid = os.geteuid(), os.getegid()  # inside the new namespace they read as 65534 until mapped
    pid = _linux.clone_fork(flags)
    if pid == 0:
        failed = 0
        try:
            if flags & _linux.CLONE_NEWUSER:
                map_ids(uid, gid)
        except OSError:
            failed |= 1
        try:
            _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
            if abi and "landlock" in layers_wanted:
                try:
                    _linux.landlock_restrict(abi, [])
                except OSError:
                    failed |= 2
            if "seccomp" in layers_wanted:
                try:
                    _linux.seccomp_install(_linux.build_seccomp_filter(True, True, None))
                except OSError:
                    failed |= 4
        except OSError:
            failed |= 6
        os._exit(failed)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def probe(disable: set[str], notices: list[str]) -> tuple[int, set[str], int]:
    """Find the namespace flags and layers this host allows: (clone flags, layers, landlock ABI)."""
    want = {"userns", "netns", "pidns", "landlock", "seccomp"} - disable
    flag_of = {"userns": _linux.CLONE_NEWUSER, "netns": _linux.CLONE_NEWNET, "pidns": _linux.CLONE_NEWPID}
    abi = _linux.landlock_abi() if "landlock" in want else 0
    if "landlock" in want and not abi:
        notices.append("landlock: not available in this kernel (or not x86-64); skipped")
    if "seccomp" in want and not _linux.IS_X86_64:
        notices.append("seccomp: the filter is written for x86-64 only; skipped")
        want.discard("seccomp")
    # Most isolating first; without CAP_SYS_ADMIN only combinations with a user namespace work.
    candidates = [["userns", "netns", "pidns"], ["userns", "netns"], ["netns", "pidns"], ["netns"],
                  ["pidns"], []]
    for names in candidates:
        if not set(names) <= want:
            continue
        flags = 0
        for n in names:
            flags |= flag_of[n]
        try:
            failed = _probe_child(flags, abi, want)
        except OSError:
            continue
        if failed & 1:
            continue
        layers = set(names) | {"rlimits"}
        for bit, name in ((2, "landlock"), (4, "seccomp")):
            if name in want and not (name == "landlock" and not abi):
                if failed & bit:
                    notices.append(f"{name}: refused by the host kernel; skipped")
                else:
                    layers.add(name)
        if "landlock" in layers and abi >= 4:
            layers.add("landlock_net")
        if "landlock" in layers and abi >= 6:
            layers.add("landlock_signal")
        for n in ("userns", "netns", "pidns"):
            if n in want and n not in layers:
                notices.append(f"{n}: refused by the host kernel; skipped")
        return flags, layers, abi
    raise OSError("could not fork a probe child at all")


def _fork_limit(layers: set[str], notices: list[str]) -> str:
    """How Limits.processes is enforced here.

    RLIMIT_NPROC counts per user and namespace, and the kernel never applies it
    to uid 0: with a user namespace and a non-root uid each agent gets its own
    count; as root the seccomp filter refuses new processes (threads remain).
    """
    if "userns" in layers and os.geteuid() != 0:
        return "rlimit"
    if "seccomp" in layers:
        notices.append("processes: RLIMIT_NPROC cannot hold here (uid 0 or no user namespace); "
                       "agents may start threads but no child processes (seccomp)")
        return "seccomp"
    notices.append("processes: neither RLIMIT_NPROC nor seccomp can limit forks here; fork bombs are not contained")
    return "none"


class Zygote:
    """The fork server's state and loop (see the module docstring)."""

    def __init__(self, ctrl: socket.socket, config: dict[str, Any]) -> None:
        self.ctrl = ctrl
        self.config = config
        self.notices: list[str] = []
        self.agents: dict[int, _Agent] = {}
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()

    def start(self) -> None:
        """Preload, compute the agents' read-only paths, probe the host, and say hello."""
        libc = ctypes.CDLL(None)
        # Few malloc arenas: each reserves 64 MiB of address space, which RLIMIT_AS counts.
        libc.mallopt(_M_ARENA_MAX, 2)
        injected = self.config.get("injected_path")
        package_dirs = _preload(self.config["preload"], self.notices)
        agent_path = [p for p in sys.path[1:] if p and p != injected]
        read_only = set(_SYSTEM_READ_ONLY) | set(self.config.get("read_only", []))
        read_only.update(os.path.abspath(p) for p in agent_path if os.path.exists(p))
        read_only.update(package_dirs)
        disable = set(self.config.get("disable", []))
        if self.config["allow_network"]:
            disable.add("netns")  # the host's network is what was asked for
        self.flags, self.layers, self.abi = probe(disable, self.notices)
        if self.config["allow_network"]:
            self.layers.discard("landlock_net")
        self.fork_limit = _fork_limit(self.layers, self.notices)
        if not self.config["allow_network"] and "netns" not in self.layers:
            if "seccomp" in self.layers:
                self.notices.append("network: no network namespace; seccomp still refuses non-Unix sockets")
            else:
                self.notices.append("network: neither a network namespace nor seccomp: agents can reach the network")
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            self.notices.append(f"zygote: {threads} threads after preloading; forking is not safe")
        self.plan_base = {
            "layers": sorted(self.layers), "landlock_abi": self.abi, "fork_limit": self.fork_limit,
            "allow_network": self.config["allow_network"], "uid": os.geteuid(), "gid": os.getegid(),
            "read_only": sorted(read_only), "sys_path": agent_path,
        }
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
        _send(self.ctrl, {"op": "hello", "pid": os.getpid(), "layers": sorted(self.layers),
                          "notices": self.notices, "fork_limit": self.fork_limit,
                          "landlock_abi": self.abi, "read_only": sorted(read_only)})

    def spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Fork one agent for a spawn request; answer with its pid and a pidfd."""
        payload_fd = fds[0]
        log_fd = -1
        try:
            os.mkdir(msg["workdir"], 0o700)
            log_fd = os.open(msg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            plan = dict(self.plan_base, workdir=msg["workdir"], limits=msg["limits"],
                        read_write=[msg["workdir"]])
            pid = _linux.clone_fork(self.flags)
            if pid == 0:
                agent_main(plan, log_fd, payload_fd, self.lifeline_r)
            # Opened before we can reap it, so the pidfd names exactly this child.
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            _send(self.ctrl, {"op": "spawn_failed", "seq": msg["seq"], "error": str(exc)})
            return
        finally:
            os.close(payload_fd)
            if log_fd >= 0:
                os.close(log_fd)
        wall = msg.get("wall_s")
        self.agents[pid] = _Agent(msg["seq"], None if wall is None else time.monotonic() + wall)
        try:
            _send(self.ctrl, {"op": "spawned", "seq": msg["seq"], "os_pid": pid}, [pidfd])
        finally:
            os.close(pidfd)

    def reap(self, block: bool = False) -> None:
        """Collect ended agents and report each one's exit status and resource usage."""
        while self.agents:
            try:
                pid, status, ru = os.wait4(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            agent = self.agents.pop(pid, None)
            if agent is None:
                continue
            try:
                _send(self.ctrl, {"op": "exit", "seq": agent.seq, "status": status,
                                  "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024,
                                  "cause": agent.cause})
            except OSError:
                pass  # launcher gone: keep reaping

    def enforce_wall(self) -> float | None:
        """SIGKILL agents past their wall limit; return seconds until the next deadline."""
        now = time.monotonic()
        nearest = None
        for pid, agent in self.agents.items():
            if agent.deadline is None or agent.cause:
                continue
            if agent.deadline <= now:
                agent.cause = "wall_limit"
                os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still this agent
            elif nearest is None or agent.deadline - now < nearest:
                nearest = agent.deadline - now
        return nearest

    def kill_all(self) -> None:
        """SIGKILL every agent and reap them all."""
        for pid, agent in self.agents.items():
            agent.cause = agent.cause or "killed"
            os.kill(pid, signal.SIGKILL)
        self.reap(block=True)

    def loop(self) -> None:
        """Serve requests until shutdown or until the launcher goes away."""
        while True:
            timeout = self.enforce_wall()
            ready, _, _ = select.select([self.ctrl, self.wake_r], [], [], timeout)
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            self.reap()
            if self.ctrl not in ready:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(self.ctrl, 1 << 16, 4)
            except ConnectionResetError:
                data, fds = b"", []
            if not data:  # the launcher died or closed: no agent may outlive it
                self.kill_all()
                return
            msg = json.loads(data)
            if msg["op"] == "spawn":
                self.spawn(msg, fds)
            elif msg["op"] == "shutdown":
                self.kill_all()
                _send(self.ctrl, {"op": "bye"})
                return


def main() -> None:
    """Entry point: ``zygote.main()`` with argv = [-c, ctrl_fd, launcher_pid, config_json]."""
    ctrl_fd, parent_pid, config = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    # SIGKILL when the launcher thread that started us dies; the check closes the race.
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    ctrl = socket.socket(fileno=ctrl_fd)
    zygote = Zygote(ctrl, config)
    zygote.start()
    zygote.loop()
    os._exit(0)

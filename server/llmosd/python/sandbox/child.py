"""The agent side: what a freshly forked child does before and while running the program.

Runs in the zygote's child (see zygote.py), single-threaded, and never returns:
it confines itself layer by layer, then runs the program as ``__main__`` and
ends the process with the program's exit code. The launcher learns the outcome
from the exit status plus a small JSON record the child writes into its
payload file (fd 3), which only the launcher and this child share.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import resource
import select
import signal
import sys
import threading
import time
import traceback
import types
from typing import Any, NoReturn

from . import _linux

PAYLOAD_FD = 3
# Each line of the agent's log begins with the time it was begun: LOG_STAMP, ms since the epoch,
# a space (launcher.py's read_log_lines reads them). The file has no times of its own, and the
# kernel reads it only when asked, so only the writer knows when a line was written.
LOG_STAMP = "\x1e"  # ASCII record separator: no text a program prints begins with it by chance
# Exit codes the launcher reads together with the outcome record.
EXIT_EXCEPTION = 1
EXIT_SETUP = 120  # the sandbox could not be set up; the log says why

_RO = _linux.LL_FS_READ_FILE | _linux.LL_FS_READ_DIR
_DEV_RW = _linux.LL_FS_READ_FILE | _linux.LL_FS_WRITE_FILE | _linux.LL_FS_TRUNCATE


def _write_outcome(record: dict[str, Any]) -> None:
    """Leave the outcome where the launcher will read it (best effort: the fd may be over its size limit)."""
    try:
        data = json.dumps(record).encode()[:16384]
        os.ftruncate(PAYLOAD_FD, 0)
        os.pwrite(PAYLOAD_FD, data, 0)
    except OSError:
        pass


def _stamp() -> str:
    return f"{LOG_STAMP}{time.time_ns() // 1_000_000} "


def _die_setup(message: str) -> NoReturn:
    try:
        os.write(2, f"{_stamp()}llmos sandbox: setup failed: {message}\n".encode())
    except OSError:
        pass
    _write_outcome({"kind": "sandbox_error", "error": message})
    os._exit(EXIT_SETUP)


def map_ids(uid: int, gid: int) -> None:
    """Map the agent's ids in its new user namespace to the launcher's own (the only mapping an
    unprivileged process may write), so files in its directory show their real owner."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _set_rlimits(limits: dict[str, Any], nproc: bool) -> None:
    def lim(res: int, value: float | int | None) -> None:
        if value is not None:
            v = int(value)
            resource.setrlimit(res, (v, v))

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    lim(resource.RLIMIT_AS, limits.get("memory_bytes"))
    # soft == hard: the kernel then sends SIGKILL (not a catchable SIGXCPU) at the limit,
    # which also reaches a pid namespace's init.
    cpu = limits.get("cpu_s")
    lim(resource.RLIMIT_CPU, None if cpu is None else max(1, -(-cpu // 1)))
    lim(resource.RLIMIT_NOFILE, limits.get("open_files"))
    lim(resource.RLIMIT_FSIZE, limits.get("file_size"))
    if nproc:
        lim(resource.RLIMIT_NPROC, limits.get("processes"))


def _confine(plan: dict[str, Any], program_dir: str | None) -> None:
    """Apply the layers in an order that works: ids, limits, no_new_privs, Landlock, caps, seccomp last."""
    layers = plan["layers"]
    if "userns" in layers:
        map_ids(plan["uid"], plan["gid"])
    os.chdir(plan["workdir"])
    _set_rlimits(plan["limits"], nproc=plan["fork_limit"] == "rlimit")
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    if "landlock" in layers:
        rules = [(p, _RO) for p in plan["read_only"] + ([program_dir] if program_dir else [])]
        rules += [(p, _linux.landlock_fs_rights(plan["landlock_abi"])) for p in plan["read_write"]]
        rules += [("/dev/null", _DEV_RW), ("/dev/zero", _RO), ("/dev/urandom", _RO), ("/dev/random", _RO)]
        _linux.landlock_restrict(plan["landlock_abi"], rules, deny_tcp=not plan["allow_network"])
    if "userns" in layers:
        # Full capabilities in its own user namespace are not needed by any program: drop them.
        _linux.drop_capabilities()
    if "seccomp" in layers:
        signal_guard = None if ("pidns" in layers or "landlock_signal" in layers) else os.getpid()
        _linux.seccomp_install(_linux.build_seccomp_filter(
            allow_fork=plan["fork_limit"] != "seccomp",
            allow_inet=plan["allow_network"],
            signal_self_only=signal_guard))


def _agent_env(payload: dict[str, Any], workdir: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "LLMOS_PID": str(payload["pid"]),
        "LLMOS_TOKEN": payload["token"],
        "LLMOS_SOCKET": payload["socket"],
        "LLMOS_ARGS": payload["args_json"],
        "LLMOS_WORKDIR": workdir,
    }
    env.update(payload.get("env") or {})
    return env


class _StampedLines(io.TextIOWrapper):
    """A line-buffered text stream on `fd` that begins each line with the time its first
    character is written (_stamp), so that every line of the log carries its time."""

    def __init__(self, fd: int) -> None:
        super().__init__(io.FileIO(fd, "w", closefd=False), line_buffering=True, errors="backslashreplace")
        self._mid_line = False  # the last write did not end its line: the next goes on without a stamp
        self._lock = threading.Lock()  # the program's threads share the stream
        os.register_at_fork(after_in_child=self._new_lock)  # a fork may copy the lock held

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not isinstance(text, str) or not text:
            return super().write(text)  # refused (or nothing) as TextIOWrapper words it
        stamp = _stamp()
        with self._lock:
            out = text[:-1].replace("\n", "\n" + stamp) + text[-1]  # a final newline: stamped by the next write
            super().write(out if self._mid_line else stamp + out)
            self._mid_line = not text.endswith("\n")
        return len(text)


def _reset_stdio() -> None:
    """Fresh stdio objects on fds 0-2; line-buffered so the process log is readable while it runs,
    each line stamped with its time."""
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = _StampedLines(1)
    sys.stderr = _StampedLines(2)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _finish(code: int) -> NoReturn:
    """End like an interpreter would after __main__: join threads, run atexit, flush, exit."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # joins non-daemon threads as Py_Finalize does
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # the program's own handlers may fail; the exit code stands
        pass
    os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def agent_main(plan: dict[str, Any], log_fd: int, payload_fd: int, lifeline_fd: int) -> NoReturn:
    """Confine this process as `plan` says, then run the program from the payload. Never returns."""
    try:
        _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        # The zygote may have died between clone and prctl: its end of the lifeline is then closed.
        if select.select([lifeline_fd], [], [], 0)[0]:
            os._exit(EXIT_SETUP)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.dup2(payload_fd, PAYLOAD_FD)
        os.closerange(PAYLOAD_FD + 1, 1 << 20)  # close_range(2): zygote sockets, pipes, other logs
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)  # undo the zygote's handlers
        signal.set_wakeup_fd(-1)
        # pread: the launcher shares this file's offset.
        payload = json.loads(os.pread(PAYLOAD_FD, os.fstat(PAYLOAD_FD).st_size, 0))
        filename = f"<llmos:{payload['pid']}>"
        source = payload.get("source")
        path = payload.get("path")
        if source is None:
            with open(path, "rb") as f:
                source = f.read()
            filename = path
        _confine(plan, os.path.dirname(path) if path else None)
        env = _agent_env(payload, plan["workdir"])
        os.environ.clear()
        os.environ.update(env)
        _reset_stdio()
        sys.argv = [filename]
        sys.path[:] = [os.path.dirname(path) if path else plan["workdir"]] + plan["sys_path"]
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        _reset_stdio()
        traceback.print_exception(exc, limit=0)
        _write_outcome({"kind": "exception", "error": f"SyntaxError: {exc}"})
        _finish(EXIT_EXCEPTION)
    except BaseException as exc:  # anything here is the sandbox's fault, not the program's
        _die_setup(f"{type(exc).__name__}: {exc}")
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=filename, __builtins__=builtins)
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except SystemExit as exc:
        status = _exit_code(exc)
        _write_outcome({"kind": "exit", "code": status})
        _finish(status)
    except MemoryError as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        # A failed allocation raises a MemoryError with no message; one the program
        # raised itself, with a message, is an ordinary exception.
        kind = "exception" if exc.args else "memory_limit"
        _write_outcome({"kind": kind, "error": "".join(traceback.format_exception_only(exc)).strip()})
        _finish(EXIT_EXCEPTION)
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # from the program's frame on
        _write_outcome({"kind": "exception", "error": "".join(traceback.format_exception_only(exc)).strip()})
        _finish(EXIT_EXCEPTION)
    _write_outcome({"kind": "exit", "code": 0})
    _finish(0)

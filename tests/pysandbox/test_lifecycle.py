"""Running programs: exit codes, exceptions, logs, environment, signals, limits and cleanup."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from llmosd.python.sandbox import Launcher, LauncherConfig, Limits, SpawnSpec

from _sbx import RunFn, spawn, launcher, run  # noqa: F401  (fixtures, used by name)


def test_exit_codes_and_exceptions(run: RunFn) -> None:
    assert run("x = 1")[0].reason == "exited"
    assert run("x = 1")[0].code == 0
    st, _ = run("import sys; sys.exit(3)")
    assert (st.reason, st.code) == ("exited", 3)
    st, log = run("def f():\n    return 1 / 0\nf()")
    assert (st.reason, st.code) == ("exception", 1)
    assert st.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in log and "in f" in log and "child.py" not in log
    st, log = run("def broken(:\n    pass")
    assert st.reason == "exception" and st.error.startswith("SyntaxError")
    st, log = run("raise SystemExit('bye')")
    assert (st.reason, st.code) == ("exited", 1) and "bye" in log


def test_stdout_and_stderr_go_to_the_log(run: RunFn) -> None:
    st, log = run("""
        import sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        sys.stdout.write("no newline at exit")
    """)
    assert st.code == 0
    assert log.index("to stdout") < log.index("to stderr")
    assert log.endswith("no newline at exit")


def test_environment_cwd_and_arguments(launcher: Launcher, run: RunFn) -> None:
    st, log = run("""
        import json, os, sys
        print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("LLMOS_")}))
        print(os.getcwd())
        print(os.environ["EXTRA"], __name__, sys.argv[0])
    """, args={"n": [1, 2]}, token="secret-token", env={"EXTRA": "x"})
    assert st.code == 0, log
    lines = log.splitlines()
    env = json.loads(lines[0])
    assert env["LLMOS_TOKEN"] == "secret-token"
    assert json.loads(env["LLMOS_ARGS"]) == {"n": [1, 2]}
    assert env["LLMOS_SOCKET"] == str(launcher.config.kernel_socket)
    workdir = launcher.config.work_root / "agents" / env["LLMOS_PID"]
    assert lines[1] == str(workdir) == env["LLMOS_WORKDIR"]
    assert lines[2] == f"x __main__ <llmos:{env['LLMOS_PID']}>"
    assert not workdir.exists()  # cleaned up with the process


def test_program_from_a_path_imports_its_siblings(launcher: Launcher, tmp_path) -> None:
    (tmp_path / "helper.py").write_text("VALUE = 41\n")
    (tmp_path / "main.py").write_text("import helper\nprint(helper.VALUE + 1)\n")
    child = launcher.spawn(SpawnSpec(pid=99999, token="t", path=tmp_path / "main.py"))
    st = child.wait(30)
    assert st is not None and st.code == 0, child.read_log()
    assert child.read_log() == b"42\n"


def test_workdir_is_private_and_writable(run: RunFn) -> None:
    st, log = run("""
        import os
        os.makedirs("a/b")
        with open("a/b/f.txt", "w") as f:
            f.write("data")
        os.chmod("a", 0)  # the launcher must still be able to clean up
        print(oct(os.stat(".").st_mode & 0o777))
    """)
    assert st.code == 0, log
    assert log.strip() == "0o700"


def test_stop_and_continue(launcher: Launcher) -> None:
    child = spawn(launcher, "while True: pass", Limits(wall_s=30))
    try:
        time.sleep(0.3)
        assert child.stop()
        time.sleep(0.1)
        with open(f"/proc/{child.os_pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "T"
        frozen = child.cpu_time()
        time.sleep(0.4)
        assert child.cpu_time() - frozen < 0.02
        assert child.cont()
        time.sleep(0.4)
        assert child.cpu_time() - frozen > 0.1
    finally:
        child.kill()
    st = child.wait(10)
    assert st is not None and st.reason == "killed" and st.signal == signal.SIGKILL
    assert not child.stop() and not child.cont()


def _settle(what: object, message: str, tries: int = 250) -> object:
    for _ in range(tries):
        got = what()  # type: ignore[operator]
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message}")


def test_stop_continue_and_cpu_time_cover_forked_processes(tmp_path: Path) -> None:
    """Where agents may start processes, the scheduler's stop reaches all of them, and the
    agent's CPU time counts theirs (seccomp is left off here: as root it would refuse forks)."""
    config = LauncherConfig(work_root=tmp_path, kernel_socket=tmp_path / "k.sock", disable=frozenset({"seccomp"}))
    with Launcher(config) as launcher:
        assert launcher.fork_limit != "seccomp"
        child = spawn(launcher, """
            import os
            for _ in range(2):
                if os.fork() == 0:
                    break
            while True:
                pass
        """, Limits(wall_s=30, processes=8))
        try:
            agent = psutil.Process(child.os_pid)
            tree = _settle(lambda: (lambda t: t if len(t) == 3 else None)([agent] + agent.children(recursive=True)),
                           "the agent and its two children")
            _settle(lambda: child.cpu_time() > 0.6, "the three processes to burn CPU")
            seen = sum(p.cpu_times().user + p.cpu_times().system for p in tree)
            assert abs(child.cpu_time() - seen) < 0.2 * seen + 0.05, (child.cpu_time(), seen)
            assert child.stop()
            _settle(lambda: all(p.status() == psutil.STATUS_STOPPED for p in tree), "every process to stop")
            frozen = child.cpu_time()
            time.sleep(0.4)
            assert child.cpu_time() - frozen < 0.02
            assert child.cont()
            _settle(lambda: child.cpu_time() - frozen > 0.3, "the processes to run again")
        finally:
            child.kill()
        st = child.wait(10)
        assert st is not None and st.reason == "killed"


def test_cpu_limit(run: RunFn) -> None:
    st, _ = run("while True: pass", Limits(cpu_s=1, wall_s=20))
    assert st.reason == "cpu_limit", st
    assert 0.8 <= st.cpu_s < 3


def test_cpu_limit_ignoring_sigxcpu(run: RunFn) -> None:
    st, _ = run("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass",
                Limits(cpu_s=1, wall_s=20))
    assert st.reason == "cpu_limit", st


def test_wall_limit(run: RunFn) -> None:
    t = time.monotonic()
    st, _ = run("import time\ntime.sleep(30)", Limits(wall_s=0.5))
    assert st.reason == "wall_limit"
    assert time.monotonic() - t < 5


def test_memory_bombs(run: RunFn) -> None:
    limits = Limits(memory_bytes=768 << 20, wall_s=30)
    st, log = run("x = bytearray(4 << 30)", limits)
    assert st.reason == "memory_limit", (st, log)
    st, log = run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", limits)
    assert st.reason == "memory_limit", (st, log)
    assert st.max_rss < 768 << 20


def test_file_size_limit(run: RunFn) -> None:
    st, log = run("""
        try:
            with open("big", "wb") as f:
                f.write(b"x" * (2 << 20))
        except OSError as e:
            print("refused", e.errno)
    """, Limits(file_size=1 << 20))
    assert st.code == 0 and log.strip() == "refused 27", log  # EFBIG


def test_open_files_limit(run: RunFn) -> None:
    st, log = run("""
        fs = []
        try:
            while True:
                fs.append(open("/dev/null"))
        except OSError as e:
            print("refused", e.errno, len(fs) < 32)
    """, Limits(open_files=32))
    assert st.code == 0 and log.strip() == "refused 24 True", log  # EMFILE


def test_threads_work(run: RunFn) -> None:
    st, log = run("""
        import threading
        out = []
        ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(sorted(out))
    """)
    assert st.code == 0 and log.strip() == str(list(range(8))), log


def test_many_agents_at_once(launcher: Launcher) -> None:
    children = [spawn(launcher, f"import time\ntime.sleep(0.2)\nprint({i})") for i in range(20)]
    for i, c in enumerate(children):
        st = c.wait(30)
        assert st is not None and st.code == 0
        assert c.read_log() == f"{i}\n".encode()
    assert len({c.os_pid for c in children}) == 20

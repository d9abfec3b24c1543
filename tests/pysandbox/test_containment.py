"""Containment across process lifetimes, the kernel socket, other uids, and fallback layers."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import pytest
from _sbx import RunFn, spawn, launcher, run  # noqa: F401  (fixtures, used by name)

from llmosd.python.sandbox import Launcher, LauncherConfig

SERVER_DIR = Path(__file__).resolve().parents[2] / "server"
TEST_USER = "llmos-sbx-test"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


HOST_SCRIPT = """
import json, sys, time
from pathlib import Path
from typing import Iterator
from llmosd.python.sandbox import Launcher, LauncherConfig, Limits, SpawnSpec
root = Path(sys.argv[1])
launcher = Launcher(LauncherConfig(work_root=root, kernel_socket=root / "k.sock", python=sys.executable))
launcher.start()
fork = "import os\\ntry:\\n    for _ in range(3):\\n        if os.fork() == 0:\\n            break\\nexcept OSError:\\n    pass\\n"  # refused as root
kids = [launcher.spawn(SpawnSpec(pid=i, token="t", source=(fork if i == 0 else "") + "import time\\ntime.sleep(120)",
                                 limits=Limits(processes=8)))
        for i in range(4)]
print(json.dumps({"zygote": launcher.zygote_pid, "agents": [k.os_pid for k in kids],
                  "layers": sorted(launcher.layers), "fork_limit": launcher.fork_limit}), flush=True)
time.sleep(120)
"""


def _host_dies(python: str, root: Path, user: str | None = None) -> dict:
    """Start a launcher in a separate process, let it spawn sleepers, kill -9 it, report what survived."""
    env = dict(os.environ, PYTHONPATH=str(SERVER_DIR))
    cmd = [python, "-c", HOST_SCRIPT, str(root)]
    if user:
        cmd = _as_user(user) + cmd
    host = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True, cwd="/")
    try:
        info = json.loads(host.stdout.readline())
        time.sleep(0.3)  # let the agents settle into sleep (and fork, where allowed)
        assert not [p for p in info["agents"] if _gone(p)]
    finally:
        host.kill()  # SIGKILL: no cleanup code runs in the launcher's process
        host.wait()
    info["survivors"] = _wait_gone([info["zygote"]] + info["agents"])
    return info


def test_agents_die_with_the_launcher_process(tmp_path: Path) -> None:
    info = _host_dies(sys.executable, tmp_path)
    assert info["survivors"] == []


def test_shutdown_kills_everything(tmp_path: Path) -> None:
    launcher = Launcher(LauncherConfig(work_root=tmp_path, kernel_socket=tmp_path / "k.sock"))
    launcher.start()
    kids = [spawn(launcher, "import time\ntime.sleep(120)") for _ in range(3)]
    zygote = launcher.zygote_pid
    launcher.shutdown()
    assert [k.wait(5).reason for k in kids] == ["killed"] * 3
    assert _wait_gone([zygote] + [k.os_pid for k in kids]) == []


def test_zygote_death_is_reported(tmp_path: Path) -> None:
    launcher = Launcher(LauncherConfig(work_root=tmp_path, kernel_socket=tmp_path / "k.sock"))
    launcher.start()
    kid = spawn(launcher, "import time\ntime.sleep(120)")
    os.kill(launcher.zygote_pid, signal.SIGKILL)
    st = kid.wait(10)
    assert st is not None and st.reason == "killed" and "fork server" in st.error
    assert _wait_gone([kid.os_pid]) == []
    with pytest.raises(Exception, match="not running"):
        spawn(launcher, "pass")


def test_grpc_over_the_kernel_socket(launcher: Launcher, run: RunFn) -> None:
    """A real gRPC client inside the full sandbox reaches the kernel's Unix socket, and nothing else."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    sock = launcher.config.kernel_socket
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        st, log = run("""
            import os, grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            with grpc.insecure_channel("unix:" + os.environ["LLMOS_SOCKET"]) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                print("status", reply.status)
        """)
    finally:
        server.stop(None)
    assert st.code == 0 and log.strip() == "status 1", log  # SERVING


def test_signal_fallback_without_pid_namespace_or_landlock(tmp_path: Path) -> None:
    """With only seccomp left to guard signals, an agent may signal itself and no one else."""
    with Launcher(LauncherConfig(work_root=tmp_path, kernel_socket=tmp_path / "k.sock",
                                 disable=frozenset({"pidns", "landlock"}))) as launcher:
        if "seccomp" not in launcher.layers:
            pytest.skip("seccomp unavailable")
        assert "pidns" not in launcher.layers and "landlock" not in launcher.layers
        child = spawn(launcher, f"""
            import os, signal
            for pid in ({os.getpid()}, {launcher.zygote_pid}, -1):
                try:
                    os.kill(pid, signal.SIGKILL)
                    print("SENT", pid)
                except OSError as e:
                    print("refused", e.errno)
            os.kill(os.getpid(), 0)
            print("self ok")
        """)
        st = child.wait(30)
        log = child.read_log().decode()
        assert st.code == 0 and log.count("refused 1") == 3 and "self ok" in log, log


def _as_user(user: str) -> list[str]:
    """Command prefix that execs (no intermediate process, so a kill reaches the program) as `user`."""
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]


def _test_user() -> str:
    """An unprivileged account for the ordinary-user checks (created when we are root)."""
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        if os.geteuid() != 0 or not shutil.which("useradd"):
            pytest.skip(f"no user {TEST_USER} and cannot create one")
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", TEST_USER], check=True)
    return TEST_USER


def _user_python() -> str:
    """An interpreter the test user can run (the one running the tests may sit under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(_as_user(TEST_USER) + [candidate, "-c",
                                "import subprocess, sys; assert sys.version_info >= (3, 10); "
                                "subprocess.run([sys.executable, '-c', ''], check=True)"],  # it starts the zygote
                               capture_output=True, cwd="/")
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python >= 3.10 runnable by the test user")


USER_CHECKS = """
import json, socket, sys
from pathlib import Path
from typing import Iterator
from llmosd.python.sandbox import Launcher, LauncherConfig, Limits, SpawnSpec
root = Path(sys.argv[1])
results = {}
with Launcher(LauncherConfig(work_root=root, kernel_socket=root / "k.sock", python=sys.executable)) as launcher:
    results["layers"] = sorted(launcher.layers)
    results["fork_limit"] = launcher.fork_limit
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    programs = {
        "fork_bomb": "import os\\nn = 0\\ntry:\\n    while True:\\n        if os.fork() == 0:\\n"
                     "            import time; time.sleep(30); os._exit(0)\\n        n += 1\\n"
                     "except OSError as e:\\n    print(n, e.errno)",
        "shadow": "open('/etc/shadow').read()",
        "tcp": f"import socket\\nsocket.create_connection(('127.0.0.1', {srv.getsockname()[1]}), timeout=2)",
        "outside": "open('/tmp/llmos-user-escape', 'w')",
        "ok": "print(open('f', 'w').write('abc'))",
        # a forked process tries to leave the agent's process group, which the scheduler stops as one
        "leave_group": "import os\\nr, w = os.pipe()\\nif os.fork() == 0:\\n    out = []\\n"
                       "    for leave in (os.setsid, lambda: os.setpgid(0, 0)):\\n        try:\\n"
                       "            leave()\\n            out.append('left')\\n        except OSError as e:\\n"
                       "            out.append(str(e.errno))\\n    os.write(w, ' '.join(out).encode())\\n"
                       "    os._exit(0)\\nos.wait()\\nprint(os.read(r, 100).decode())",
    }
    for name, src in programs.items():
        c = launcher.spawn(SpawnSpec(pid=len(results), token="t", source=src, limits=Limits(processes=8, wall_s=30)))
        st = c.wait(60)
        results[name] = [st.reason, st.code, st.error, c.read_log().decode()]
print(json.dumps(results))
"""


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A directory the test user owns, reachable by it (pytest's own tmp dirs are private to root)."""
    if os.geteuid() != 0:
        pytest.skip("the tests already run as an ordinary user; this one switches from root")
    pw = pwd.getpwnam(_test_user())
    path = Path(tempfile.mkdtemp(prefix="llmos-sbx-user-"))
    for sub in ("", "user", "dies"):
        (path / sub).mkdir(exist_ok=True)
        os.chown(path / sub, pw.pw_uid, pw.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_as_an_ordinary_user(user_dir: Path) -> None:
    user = TEST_USER
    python = _user_python()
    pw = pwd.getpwnam(user)
    root = user_dir / "user"
    env = dict(os.environ, PYTHONPATH=str(SERVER_DIR))
    out = subprocess.run(_as_user(user) + [python, "-c", USER_CHECKS, str(root)],
                         capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert {"rlimits", "userns", "netns", "pidns"} <= set(r["layers"]), r
    assert r["fork_limit"] == "rlimit"
    forks, err = r["fork_bomb"][3].split()
    assert r["fork_bomb"][:2] == ["exited", 0] and int(forks) < 8 and err == "11", r["fork_bomb"]
    assert r["shadow"][0] == "exception" and "PermissionError" in r["shadow"][2]
    assert r["tcp"][0] == "exception" and "OSError" in r["tcp"][2]
    assert r["outside"][0] == "exception" and "PermissionError" in r["outside"][2]
    assert r["ok"][:2] == ["exited", 0] and r["ok"][3] == "3\n"
    assert r["leave_group"][:2] == ["exited", 0] and r["leave_group"][3] == "1 1\n", r["leave_group"]  # EPERM
    assert not os.path.exists("/tmp/llmos-user-escape")

    # Killed with SIGKILL, an ordinary user's launcher leaves no process of that user behind,
    # including those its agents forked (the pid namespace takes them down).
    info = _host_dies(python, user_dir / "dies", user)
    assert info["survivors"] == []
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in os.listdir("/proc") if p.isdigit() and not _gone(int(p))
                and _owner(int(p)) == pw.pw_uid]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def test_allow_network(tmp_path: Path) -> None:
    """allow_network=True leaves out the network namespace and TCP denials, nothing else."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with Launcher(LauncherConfig(work_root=tmp_path, kernel_socket=tmp_path / "k.sock",
                                 allow_network=True)) as launcher:
        assert "netns" not in launcher.layers and "landlock_net" not in launcher.layers
        child = spawn(launcher, f"""
            import socket
            socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=5).sendall(b"hi")
            try:
                open("/etc/shadow")
            except OSError as e:
                print("refused", e.errno)
        """)
        conn, _ = server.accept()
        assert conn.recv(2) == b"hi"
        st = child.wait(30)
        log = child.read_log().decode()
        assert st.code == 0, log
        if "landlock" in launcher.layers:
            assert log.strip() == "refused 13"
    server.close()

"""Escape attempts: each must fail inside the sandbox while the launcher keeps working."""
from __future__ import annotations

import os
import socket
import time

import pytest
from _sbx import RunFn, layers_needed, spawn, launcher, run  # noqa: F401  (fixtures, used by name)

from llmosd.python.sandbox import Launcher, Limits


@pytest.fixture(autouse=True)
def launcher_still_works(run: RunFn):
    """After every escape attempt, a plain program must still run normally."""
    yield
    st, log = run("print('alive')")
    assert (st.reason, st.code, log) == ("exited", 0, "alive\n")


def test_tcp_connection_to_the_host(launcher: Launcher, run: RunFn) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    st, log = run(f"""
        import socket
        for family, addr in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET6, ("::1", {port}))):
            try:
                socket.create_connection(addr, timeout=2)
                print("CONNECTED")
            except OSError as e:
                print("refused", e.errno)
        for family, kind in ((socket.AF_INET, socket.SOCK_DGRAM), (socket.AF_PACKET, socket.SOCK_RAW),
                             (socket.AF_NETLINK, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW)):
            try:
                socket.socket(family, kind)
                print("SOCKET", family)
            except OSError as e:
                print("refused", e.errno)
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        print("unix ok")
    """)
    assert st.code == 0, log
    assert "CONNECTED" not in log and "SOCKET" not in log and log.count("refused") == 6, log
    assert "unix ok" in log
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def test_read_etc_shadow(launcher: Launcher, run: RunFn) -> None:
    layers_needed(launcher, "landlock")
    st, log = run("""
        for path in ("/etc/shadow", "/etc/passwd", "/root/.bashrc", "/proc/self/root/etc/shadow"):
            try:
                open(path).read()
                print("READ", path)
            except OSError as e:
                print("refused", e.errno)
    """)
    assert st.code == 0 and "READ" not in log and log.count("refused") == 4, log


def test_read_another_agents_directory(launcher: Launcher, run: RunFn) -> None:
    layers_needed(launcher, "landlock")
    victim = spawn(launcher, """
        import os, time
        with open("secret.txt", "w") as f:
            f.write("s3cret")
        os.rename("secret.txt", "secret")
        time.sleep(60)
    """, Limits(wall_s=60))
    secret = victim.workdir / "secret"
    deadline = time.monotonic() + 10
    while not secret.exists():
        assert time.monotonic() < deadline, victim.read_log()
        time.sleep(0.01)
    try:
        st, log = run(f"""
            import os
            for op in (lambda: open({str(secret)!r}).read(), lambda: os.listdir({str(victim.workdir)!r}),
                       lambda: open({str(victim.workdir / 'planted')!r}, "w"),
                       lambda: open({str(victim.log_path)!r}).read()):
                try:
                    print("GOT", op())
                except OSError as e:
                    print("refused", e.errno)
        """)
        assert st.code == 0 and "GOT" not in log and log.count("refused") == 4, log
        assert not (victim.workdir / "planted").exists()
    finally:
        victim.kill()
    assert victim.wait(10).reason == "killed"


def test_write_outside_the_working_directory(launcher: Launcher, run: RunFn, tmp_path) -> None:
    layers_needed(launcher, "landlock")
    target = tmp_path / "escaped"
    st, log = run(f"""
        import os
        for path in ({str(target)!r}, "/tmp/llmos-escape", {str(launcher.config.work_root / 'x')!r},
                     os.path.join(os.path.dirname(__import__("json").__file__), "evil.py")):
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as e:
                print("refused", e.errno)
        try:
            os.symlink("/etc", "etc")
            open("etc/evil", "w")
            print("WROTE via link")
        except OSError as e:
            print("refused", e.errno)
    """)
    assert st.code == 0 and "WROTE" not in log and log.count("refused") == 5, log
    assert not target.exists() and not os.path.exists("/tmp/llmos-escape")


def test_no_exec(launcher: Launcher, run: RunFn) -> None:
    layers_needed(launcher, "landlock")
    st, log = run("""
        import os
        try:
            os.execv("/bin/sh", ["sh", "-c", "echo EXECUTED"])
        except OSError as e:
            print("refused", e.errno)
    """)
    assert st.code == 0 and log.startswith("refused"), log


def test_fork_bomb(launcher: Launcher, run: RunFn) -> None:
    st, log = run("""
        import os
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    import time
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            print("stopped after", n, "errno", e.errno)
    """, Limits(processes=16, wall_s=60))
    assert st.code == 0, log
    words = log.split()
    assert words[:2] == ["stopped", "after"] and int(words[2]) < 16 and words[4] == "11", log  # EAGAIN
    if launcher.fork_limit == "seccomp":
        assert int(words[2]) == 0


def test_ptrace_a_sibling(launcher: Launcher, run: RunFn) -> None:
    sibling = spawn(launcher, "import time\ntime.sleep(60)", Limits(wall_s=60))
    try:
        st, log = run(f"""
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
            for req in (PTRACE_ATTACH, PTRACE_SEIZE):
                r = libc.ptrace(req, {sibling.os_pid}, None, None)
                print("ATTACHED" if r == 0 else f"refused {{ctypes.get_errno()}}")
            try:
                open("/proc/{sibling.os_pid}/mem", "rb").read(1)
                print("READ MEM")
            except OSError as e:
                print("refused", e.errno)
        """)
        assert st.code == 0 and "ATTACHED" not in log and "READ MEM" not in log, log
        assert log.count("refused") == 3, log
        assert sibling.status is None  # untouched
    finally:
        sibling.kill()
    sibling.wait(10)


def test_kill_the_server(launcher: Launcher, run: RunFn) -> None:
    me = os.getpid()
    st, log = run(f"""
        import os, signal
        for pid in ({me}, {launcher.zygote_pid}, os.getppid(), -1):
            for sig in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    os.kill(pid, sig)
                    print("SENT", pid)
                except OSError as e:
                    print("refused", e.errno)
    """)
    # kill(-1) inside the agent's own pid namespace reaches nothing but itself, which it spares.
    assert st.code == 0, log
    assert f"SENT {me}" not in log and f"SENT {launcher.zygote_pid}" not in log, log
    os.kill(launcher.zygote_pid, 0)  # still there


def test_proc_of_the_parent(launcher: Launcher, run: RunFn) -> None:
    layers_needed(launcher, "landlock")
    z = launcher.zygote_pid
    st, log = run(f"""
        import os
        for path in ("/proc/{z}/environ", "/proc/{z}/mem", "/proc/{z}/root/etc/shadow",
                     "/proc/{z}/cwd/x", "/proc/{os.getpid()}/cmdline", "/proc/1/cmdline"):
            try:
                open(path, "rb").read(16)
                print("READ", path)
            except OSError as e:
                print("refused", e.errno)
        try:
            print("LISTED", len(os.listdir("/proc")))
        except OSError as e:
            print("refused", e.errno)
    """)
    assert st.code == 0 and "READ" not in log and "LISTED" not in log and log.count("refused") == 7, log


def test_namespace_and_mount_syscalls(launcher: Launcher, run: RunFn) -> None:
    layers_needed(launcher, "seccomp")
    st, log = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x10000000, 0x40000000
        for flags in (CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET):
            print("UNSHARED" if libc.unshare(flags) == 0 else f"refused {ctypes.get_errno()}")
        r = libc.mount(b"none", b".", b"tmpfs", 0, None)
        print("MOUNTED" if r == 0 else f"refused {ctypes.get_errno()}")
        r = libc.syscall(321, 0, None, 0)  # bpf(BPF_MAP_CREATE)
        print("BPF" if r >= 0 else f"refused {ctypes.get_errno()}")
    """)
    assert st.code == 0 and log.count("refused 1") == 5, log  # EPERM


def test_token_never_reaches_the_zygote(launcher: Launcher) -> None:
    """Agents are copies of the zygote's memory: it must never hold another agent's token."""
    token = "tok-" + os.urandom(12).hex()
    child = spawn(launcher, "print(__import__('os').environ['LLMOS_TOKEN'])", token=token)
    child.wait(30)
    assert child.read_log().decode().strip() == token
    found = False
    with open(f"/proc/{launcher.zygote_pid}/maps") as maps, open(f"/proc/{launcher.zygote_pid}/mem", "rb") as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                found = found or token.encode() in mem.read(end - start)
            except OSError:
                continue
    assert not found


def test_kernel_environment_does_not_reach_agents(launcher: Launcher, run: RunFn) -> None:
    """The zygote starts with a minimal environment, so agents cannot find the kernel's variables."""
    with open(f"/proc/{launcher.zygote_pid}/environ", "rb") as f:
        names = {item.split(b"=", 1)[0] for item in f.read().split(b"\0") if item}
    assert names <= {b"PATH", b"LANG", b"LC_ALL", b"LC_CTYPE", b"TZ", b"PYTHONPATH", b"PYTHONHOME",
                     b"VIRTUAL_ENV", b"LD_LIBRARY_PATH"}
    st, log = run("import os\nprint(sorted(k for k in os.environ if not k.startswith('LLMOS_')))")
    assert st.code == 0 and log.strip() == "['HOME', 'LANG', 'PATH', 'TMPDIR']", log

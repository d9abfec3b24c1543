#!/usr/bin/env python3
"""Python agent spawn latency and idle footprint, with `python -c` as the peer in the same run.

Spawn-to-first-statement: CLOCK_MONOTONIC (one clock for every process) read
just before Launcher.spawn() / subprocess.Popen() and by the program's first
statement. Footprint: PSS (shared pages split among their users, so the
zygote's preloaded image is counted once) and RSS of idle sandboxed agents,
scaled to how many fit in 8 GiB.

    python tools/bench_pyspawn.py [--runs 100] [--idle 32]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

from llmosd.python.sandbox import Child, Launcher, LauncherConfig, SpawnSpec  # noqa: E402

FIRST = "import os, time; os.write(1, repr(time.monotonic()).encode())\n"
GIB = 1 << 30


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def agent_first_statement(launcher: Launcher, pid: int) -> tuple[float, float, float]:
    """(spawn -> first statement, spawn() call, spawn -> exit reported), in ms."""
    t0 = time.monotonic()
    child = launcher.spawn(SpawnSpec(pid=pid, token="t", source=FIRST))
    t1 = time.monotonic()
    status = child.wait(30)
    t2 = time.monotonic()
    assert status is not None and status.code == 0, (status, child.read_log())
    first = float(child.read_log())
    return (first - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t0) * 1e3


def python_first_statement(python: str) -> tuple[float, float]:
    """`python -c <first statement>`: (spawn -> first statement, whole run), in ms."""
    t0 = time.monotonic()
    out = subprocess.run([python, "-c", FIRST], capture_output=True, check=True).stdout
    return (float(out) - t0) * 1e3, (time.monotonic() - t0) * 1e3


def python_pass(python: str) -> float:
    t0 = time.monotonic()
    subprocess.run([python, "-c", "pass"], check=True)
    return (time.monotonic() - t0) * 1e3


def memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes from smaps_rollup."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Pss:", "Rss:"):
                values[parts[0]] = int(parts[1]) * 1024
    return values["Pss:"], values["Rss:"]


IDLE_BARE = "import time\nprint('ready', flush=True)\ntime.sleep(3600)\n"
IDLE_GRPC = """import os, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel("unix:" + os.environ["LLMOS_SOCKET"])
health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
print("ready", flush=True)
time.sleep(3600)
"""


def idle_footprint(launcher: Launcher, source: str, n: int, first_pid: int) -> tuple[float, float]:
    """Mean (PSS, RSS) per idle agent, measured with n of them alive at once."""
    children: list[Child] = [launcher.spawn(SpawnSpec(pid=first_pid + i, token="t", source=source))
                             for i in range(n)]
    try:
        deadline = time.monotonic() + 60
        for c in children:
            while b"ready" not in c.read_log():
                assert c.status is None and time.monotonic() < deadline, (c.status, c.read_log())
                time.sleep(0.01)
        samples = [memory(c.os_pid) for c in children]
    finally:
        for c in children:
            c.kill()
        for c in children:
            c.wait(10)
    return statistics.mean(s[0] for s in samples), statistics.mean(s[1] for s in samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--idle", type=int, default=32, help="idle agents alive at once for the footprint")
    opts = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-pyspawn-"))
    python = sys.executable
    launcher = Launcher(LauncherConfig(work_root=root / "work", kernel_socket=root / "kernel.sock", python=python))
    t = time.monotonic()
    launcher.start()
    start_ms = (time.monotonic() - t) * 1e3
    for i in range(5):  # warm caches on both sides
        agent_first_statement(launcher, 10**6 + i)
        python_first_statement(python)
    agent, peer, peer_pass = [], [], []
    for i in range(opts.runs):  # interleaved, so both see the same machine load
        agent.append(agent_first_statement(launcher, i))
        peer.append(python_first_statement(python))
        peer_pass.append(python_pass(python))

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"unix:{launcher.config.kernel_socket}")
    server.start()
    try:
        bare = idle_footprint(launcher, IDLE_BARE, opts.idle, 2 * 10**6)
        with_grpc = idle_footprint(launcher, IDLE_GRPC, opts.idle, 3 * 10**6)
    finally:
        server.stop(None)
    zygote_pss, zygote_rss = memory(launcher.zygote_pid)
    launcher.shutdown()

    print(f"sandbox layers: {', '.join(sorted(launcher.layers))}; fork limit: {launcher.fork_limit}")
    print(f"fork server start (preload + probe): {start_ms:.0f} ms; its PSS {zygote_pss / 2**20:.1f} MiB, "
          f"RSS {zygote_rss / 2**20:.1f} MiB")
    print()
    print(f"{'spawn latency (ms), ' + str(opts.runs) + ' runs':<52}{'p50':>8}{'p99':>8}")
    rows = [
        ("sandboxed agent: spawn -> first statement", [a[0] for a in agent]),
        ("sandboxed agent: spawn() call returns", [a[1] for a in agent]),
        ("sandboxed agent: spawn -> exit reported", [a[2] for a in agent]),
        ("peer `python -c`: Popen -> first statement", [p[0] for p in peer]),
        ("peer `python -c pass`: whole run", peer_pass),
    ]
    for name, xs in rows:
        print(f"{name:<52}{pct(xs, 50):>8.1f}{pct(xs, 99):>8.1f}")
    ratio = pct([a[0] for a in agent], 50) / pct([p[0] for p in peer], 50)
    print(f"first statement, agent/peer p50: {ratio:.2f}x (target: agent p50 <= 30 ms)")
    print()
    print(f"{'idle agents (' + str(opts.idle) + ' alive)':<40}{'PSS MiB':>9}{'RSS MiB':>9}{'fit in 8 GiB (PSS)':>20}")
    for name, (pss, rss) in (("bare (time.sleep)", bare), ("with a gRPC channel to the kernel", with_grpc)):
        fit = int((8 * GIB - zygote_pss) // pss)
        print(f"{name:<40}{pss / 2**20:>9.2f}{rss / 2**20:>9.1f}{fit:>20,}")


if __name__ == "__main__":
    main()

"""Scheduler benchmark: fairness, weights and wake-up latency of Lua processes.

    python tools/bench_sched.py [--seconds 5] [--quick]

Runs a real llmosd with 2 virtual CPUs. Prints a table and saves a PNG of the
CPU shares (bench-out/sched_shares.png) when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import grpc

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
from llmosd_process import LlmosdServer  # noqa: E402

SPIN = "while true do end"
PY_SPIN = "while True:\n    pass\n"
PY_FIRST_SYSCALL = "from llmos.userland import sys\nsys.send(sys.args, sys.now())\n"

# A sender that wakes every few ms and messages a high-priority receiver,
# which notes how long after the send it got to run.
WAKER = """
local target = args.target
for i = 1, args.n do
  sys.sleep(args.every_ms)
  sys.send(target, sys.now())
end
sys.send(target, "done")
"""
RECEIVER = """
local lat = {}
while true do
  local m = sys.recv{}
  if m.body == "done" then return lat end
  lat[#lat + 1] = sys.now() - m.body
end
"""


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def cpu_ms(stub: kernel_pb2_grpc.KernelStub, pids: list[int]) -> list[float]:
    return [stub.GetProcess(pb.GetProcessRequest(pid=p)).usage.cpu_ms for p in pids]


def run_spinners(stub: kernel_pb2_grpc.KernelStub, weights: list[int], seconds: float, python: bool = False
                 ) -> list[float]:
    program = {"python": PY_SPIN} if python else {"lua": SPIN}
    pids = [stub.Spawn(pb.SpawnRequest(weight=w, **program)).pid for w in weights]
    if python:  # let every agent start before measuring
        time.sleep(1.0)
    start = cpu_ms(stub, pids)
    time.sleep(seconds)
    end = cpu_ms(stub, pids)
    for pid in pids:
        stub.Kill(pb.KillRequest(pid=pid))
    return [b - a for a, b in zip(start, end)]


def wake_latency(stub: kernel_pb2_grpc.KernelStub, spinners: int, n: int) -> list[float]:
    pids = [stub.Spawn(pb.SpawnRequest(lua=SPIN)).pid for _ in range(spinners)]
    time.sleep(0.5)
    receiver = stub.Spawn(pb.SpawnRequest(lua=RECEIVER, priority=10)).pid
    stub.Spawn(pb.SpawnRequest(lua=WAKER, priority=10, args=to_value({"target": receiver, "n": n, "every_ms": 7})))
    info = stub.Wait(pb.WaitRequest(pid=receiver, timeout_ms=120_000)).process
    for pid in pids:
        stub.Kill(pb.KillRequest(pid=pid))
    if info.state != pb.EXITED:
        raise RuntimeError(f"the receiver ended {pb.ProcessState.Name(info.state)}: {info.exit_reason} {info.error}")
    return list(from_value(info.result))


def python_spawn_latency(stub: kernel_pb2_grpc.KernelStub, n: int) -> list[float]:
    """ms from just before Spawn until the agent's first syscall (a send with its clock)."""
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    out = []
    for _ in range(n):
        start = time.time() * 1000
        pid = stub.Spawn(pb.SpawnRequest(python=PY_FIRST_SYSCALL, args=to_value(port))).pid
        msg = stub.Recv(pb.RecvRequest(pid=port, timeout_ms=30_000)).message
        out.append(from_value(msg.body) - start)
        stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=30_000))
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    seconds = 1.5 if opts.quick else opts.seconds
    quantum_ms = 10.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = LlmosdServer(pathlib.Path(tmp) / "data", "--cpus", "2", "--quantum-ms", str(quantum_ms))
        server.start()
        try:
            stub = kernel_pb2_grpc.KernelStub(grpc.insecure_channel(server.target))
            equal = run_spinners(stub, [100] * 8, seconds)
            index = jain(equal)
            rows.append(("8 equal CPU-bound Lua processes, 2 vCPUs: Jain's index", f"{index:.4f}", "≥ 0.99",
                         index >= 0.99))
            # Two processes per weight: with one each, the heaviest would want 4/7 of
            # two CPUs, more than the one CPU a single process can use.
            per_process = run_spinners(stub, [100, 200, 400] * 2, seconds)
            weighted = [per_process[i] + per_process[i + 3] for i in range(3)]
            shares = [w / sum(weighted) for w in weighted]
            want = [1 / 7, 2 / 7, 4 / 7]
            worst = max(abs(s - w) / w for s, w in zip(shares, want))
            rows.append(("weights 1:2:4 (2 processes each, 2 vCPUs): shares",
                         " / ".join(f"{s:.3f}" for s in shares) + f" (ideal {' / '.join(f'{w:.3f}' for w in want)})",
                         "within 5%", worst <= 0.05))
            py = run_spinners(stub, [100] * 8, seconds, python=True)
            py_index = jain(py)
            rows.append(("8 equal CPU-bound Python processes, 2 vCPUs: Jain's index", f"{py_index:.4f}", "≥ 0.95",
                         py_index >= 0.95))
            spawn = python_spawn_latency(stub, 20 if opts.quick else 100)
            p99_spawn = percentile(spawn, 0.99)
            rows.append(("Python agent: Spawn to first syscall, p50 / p99",
                         f"{statistics.median(spawn):.1f} / {p99_spawn:.1f} ms", "p50 ≤ 30 ms",
                         statistics.median(spawn) <= 30))
            lat = wake_latency(stub, 16, 50 if opts.quick else 300)
            p99 = percentile(lat, 0.99)
            rows.append(("high-priority wake-up with 16 CPU-bound processes: p50 / p99",
                         f"{statistics.median(lat):.2f} / {p99:.2f} ms", f"p99 ≤ 2 quanta ({2 * quantum_ms:.0f} ms)",
                         p99 <= 2 * quantum_ms))
        finally:
            server.stop()
    print("llmos scheduler benchmark (2 virtual CPUs, quantum 10 ms)")
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    for name, value, target, ok in rows:
        print(f"{name.ljust(widths[0])}  {value.ljust(widths[1])}  {target.ljust(widths[2])}  {'yes' if ok else 'NO'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    out = pathlib.Path("bench-out")
    out.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(range(1, 9), equal)
    axes[0].set_title(f"8 equal processes (Jain {index:.3f})")
    axes[0].set_ylabel("CPU ms")
    axes[1].bar(["w=100", "w=200", "w=400"], weighted)
    axes[1].set_title("weights 1:2:4")
    fig.tight_layout()
    fig.savefig(out / "sched_shares.png")
    print(f"plot: {out / 'sched_shares.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

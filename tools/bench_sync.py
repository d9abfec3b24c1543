"""Lock benchmark: named mutexes as Lua programs use them, on a real llmosd.

    python tools/bench_sync.py             # about 15 s on 2 cores
    python tools/bench_sync.py --quick     # smaller counts, for a smoke test

Figures (printed as one table):
- uncontended sys.lock.acquire + sys.lock.release pairs per second from one
  Lua process (its run time minus that of the same program with no pairs, so
  spawn and wait are not counted);
- a mutex contended by N Lua processes (default 16) for a fixed time: each
  holds it across a sys.sleep(0), so that every other process queues while it
  holds, and every release is a handoff to a blocked waiter. Handoffs per
  second, and Jain's fairness index of the acquisitions per process (1.0 is
  perfectly even; the issue's target is >= 0.95 at equal priority).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import llmos
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
from llmosd_process import LlmosdServer  # noqa: E402

UNCONTENDED_LUA = """
for i = 1, args.n do
  sys.lock.acquire("bench-uncontended")
  sys.lock.release("bench-uncontended")
end
return args.n
"""

# A worker counts its acquisitions until told to stop, then reports to the coordinator.
WORKER_LUA = """
local n = 0
while true do
  if sys.recv{tag = "stop", timeout_ms = 0} then break end
  assert(sys.lock.acquire("bench-hot"), "acquire without a timeout returned nil")
  n = n + 1
  sys.sleep(0)  -- hold the lock across a yield: the others queue meanwhile
  sys.lock.release("bench-hot")
end
sys.send(args.coordinator, n, {tag = "count"})
"""

COORDINATOR_LUA = """
local workers = {}
for i = 1, args.processes do
  workers[i] = sys.spawn{lua = args.worker, args = {coordinator = sys.self()}}
end
sys.sleep(args.duration_ms)
for i = 1, #workers do sys.send(workers[i], nil, {tag = "stop"}) end
local counts = {}
for i = 1, #workers do
  local m = sys.recv{tag = "count", timeout_ms = 30000}
  assert(m, "a worker did not report its count")
  counts[#counts + 1] = m.body
end
return counts
"""


def jain(counts: list[int]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2)."""
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return total * total / (len(counts) * squares) if squares else 0.0


def run_program(k: llmos.Client, source: str, args: dict, timeout: float) -> tuple[object, float]:
    start = time.perf_counter()
    info = k.run(source, args=args, timeout=timeout)
    elapsed = time.perf_counter() - start
    if not info.ok:
        raise RuntimeError(f"benchmark program ended {info.state} ({info.exit_reason}): {info.error}")
    return info.result, elapsed


def uncontended(k: llmos.Client, n: int) -> float:
    """acquire+release pairs per second."""
    _, empty = run_program(k, UNCONTENDED_LUA, {"n": 0}, 60)
    _, full = run_program(k, UNCONTENDED_LUA, {"n": n}, 300)
    return n / max(full - empty, 1e-9)


def contended(k: llmos.Client, processes: int, duration_s: float) -> tuple[list[int], float]:
    """Acquisitions per process, and the handoffs per second over the window."""
    args = {"processes": processes, "duration_ms": int(duration_s * 1000), "worker": WORKER_LUA}
    counts, _ = run_program(k, COORDINATOR_LUA, args, duration_s + 60)
    assert isinstance(counts, list) and len(counts) == processes, counts
    return [int(c) for c in counts], sum(counts) / duration_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke test")
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of contention")
    parser.add_argument("--pairs", type=int, default=200_000, help="uncontended acquire+release pairs")
    opts = parser.parse_args()
    if opts.quick:
        opts.duration, opts.pairs = 1.0, 20_000

    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        server = LlmosdServer(pathlib.Path(tmp) / "data", "--model", "none")  # locks only: no engine
        server.start()
        try:
            with llmos.connect(server.target, rpc_timeout=None) as k:
                pairs_per_s = uncontended(k, opts.pairs)
                counts, handoffs_per_s = contended(k, opts.processes, opts.duration)
        finally:
            server.stop()

    fairness = jain(counts)
    rows = [
        ("uncontended acquire+release, 1 Lua process", f"{pairs_per_s:,.0f} pairs/s", ""),
        (f"contended mutex, {opts.processes} Lua processes, {opts.duration:g} s", f"{handoffs_per_s:,.0f} handoffs/s",
         ""),
        ("acquisitions per process (min / max)", f"{min(counts)} / {max(counts)}", ""),
        ("Jain's fairness index of acquisitions", f"{fairness:.4f}", ">= 0.95"),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':>{vwidth}}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {target}")
    if fairness < 0.95:
        sys.exit(1)


if __name__ == "__main__":
    main()

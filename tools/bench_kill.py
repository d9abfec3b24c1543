"""How soon a kill, a CPU limit or a wall-time limit ends a Lua process that is
inside a long library call (where no Lua hook fires), and how fast the
metered library is beside stock Lua (lupa) in the same run.

    python tools/bench_kill.py            # 5 trials of each
    python tools/bench_kill.py --quick    # 2 trials, for a smoke test

Prints two tables. The target of the first is 20 ms from when the end is due
to the end, whatever the function; of the second, at most about 2x stock Lua.
  - kill: from sending Kill to Wait answering (two gRPC calls on loopback included);
  - cpu_ms: the process's CPU time at its end minus its limit (it runs alone);
  - wall_ms: its lifetime (ended_at - started_at, in ms) minus its limit.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import lupa.lua54 as lupa

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
from llmosd_process import LlmosdServer  # noqa: E402

CPU_LIMIT_MS = 300
WALL_LIMIT_MS = 400

# Each spends its time inside one long call of the function it is named after,
# within the default memory limit (64 MiB): the one copy that makes a result
# string (or the VM's `..`) is not interruptible, and that limit bounds it.
HOGS = {
    "string.match (no repetition items)": "local s = ('a'):rep(2e6) return s:match(('.'):rep(2000) .. 'b')",
    "string.find %b()": "return (('('):rep(1e6)):find('%b()')",
    "string.gsub": "return (('a'):rep(1e6)):gsub('a-b', '')",
    "string.gmatch": "for _ in (('a'):rep(1e6)):gmatch('a-b') do end",
    "string.find plain": "local s = ('a'):rep(4e6) return s:find(('a'):rep(2e6) .. 'b', 1, true)",
    "string.format %q": "local s = ('\\0'):rep(2e6) while true do local q = string.format('%q', s) end",
    "string.upper (8 MiB)": "local s = ('a'):rep(2^23) while true do local u = s:upper() end",
    "string.rep (8 MiB)": "while true do local s = string.rep('abc', 2^21, ',') end",
    "table.move": "return table.move({}, 1, 2^40, 2, {})",
    "table.insert": "return table.insert(setmetatable({}, {__len = function() return 2^62 end}), 1, 1)",
    "table.concat": "return table.concat(setmetatable({}, {__index = type}), '', 1, 2^40)",
    "table.sort": "local t = {} for i = 1, 2^20 do t[i] = (i * 7919) % 1000003 end "
                  "while true do table.sort(t, math.ult) table.sort(t, function(a, b) return a > b end) end",
    "utf8.char (a million arguments)": "local t = {} for i = 1, 999000 do t[i] = 0x10FFFF end "
                                       "while true do local s = utf8.char(table.unpack(t)) end",
    "utf8.len (16 MiB)": "local s = ('a'):rep(2^24) while true do utf8.len(s) end",
    "tonumber(s, 2) (16 MiB)": "local s = ('1'):rep(2^24) while true do tonumber(s, 2) end",
    "os.date": "local f = ('%j'):rep(1e6) while true do local d = os.date(f) end",
    "load (6 MB chunk)": "local src = ('x = 1 '):rep(1e6) while true do load(src) end",
    "load (reader loops)": "return load(function() while true do end end)",
}

# Ordinary work, timed inside Lua (os.clock) both in llmos and in stock Lua.
SPEED = {
    "gmatch '%S+' over 5 MB of words": "local n = 0 for w in TEXT:gmatch('%S+') do n = n + 1 end",
    "gsub '(%w+)' -> '<%1>' over 5 MB": "local r, n = TEXT:gsub('(%w+)', '<%1>')",
    "gsub '%w+' -> string.upper over 5 MB": "local r, n = TEXT:gsub('%w+', string.upper)",
    "find a pattern at the end of 5 MB": "local a = (TEXT .. 'x=42'):find('x=(%d+)')",
    "find plain at the end of 5 MB": "local a = (TEXT .. 'needle'):find('needle', 1, true)",
    "match ('.'):rep(2000)..'b' on 200 kB": "local a = ('a'):rep(2e5):match(('.'):rep(2000) .. 'b')",
    "format 1e5 items": "for i = 1, 1e5 do local s = string.format('%d %5.2f %s %q', i, i / 3, 'x', 'y') end",
    "concat 1e6 numbers": "local t = {} for i = 1, 1e6 do t[i] = i end local s = table.concat(t, ',')",
    "sort 1e6 numbers": "local t = {} for i = 1, 1e6 do t[i] = (i * 7919) % 1000003 end table.sort(t)",
    "upper, reverse of 5 MB": "local a = TEXT:upper():reverse()",
}
SPEED_PRELUDE = "local TEXT = ('word '):rep(1e6) "


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spawn(stub: Any, lua: str, **limits: int) -> int:
    return stub.Spawn(pb.SpawnRequest(lua=lua, limits=pb.Limits(**limits))).pid


def wait(stub: Any, pid: int) -> pb.ProcessInfo:
    resp = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=60_000))
    if resp.timed_out:
        stub.Kill(pb.KillRequest(pid=pid))
        raise RuntimeError(f"pid {pid} did not end")
    return resp.process


def kill_latency(stub: Any, lua: str) -> float:
    pid = spawn(stub, lua)
    while stub.GetProcess(pb.GetProcessRequest(pid=pid)).state != pb.RUNNING:
        time.sleep(0.005)
    time.sleep(0.15)
    start = time.perf_counter()
    stub.Kill(pb.KillRequest(pid=pid, reason="bench"))
    info = wait(stub, pid)
    elapsed = time.perf_counter() - start
    if info.exit_reason != "bench":
        raise RuntimeError(f"ended with {info.exit_reason!r} before the kill: {info.error}")
    return elapsed * 1e3


def cpu_lateness(stub: Any, lua: str) -> float:
    info = wait(stub, spawn(stub, lua, cpu_ms=CPU_LIMIT_MS))
    if info.exit_reason != "cpu_limit":
        raise RuntimeError(f"ended with {info.exit_reason!r}: {info.error}")
    return float(info.usage.cpu_ms - CPU_LIMIT_MS)


def wall_lateness(stub: Any, lua: str) -> float:
    info = wait(stub, spawn(stub, lua, wall_ms=WALL_LIMIT_MS))
    if info.exit_reason != "wall_limit":
        raise RuntimeError(f"ended with {info.exit_reason!r}: {info.error}")
    return float(info.ended_at_ms - info.started_at_ms - WALL_LIMIT_MS)


def timed_llmos(stub: Any, code: str) -> float:
    lua = SPEED_PRELUDE + "local t0 = os.clock() " + code + " return os.clock() - t0"
    info = wait(stub, spawn(stub, lua))
    if info.state != pb.EXITED:
        raise RuntimeError(info.error)
    return from_value(info.result)


def timed_stock(code: str) -> float:
    return lupa.LuaRuntime().execute(SPEED_PRELUDE + "local t0 = os.clock() " + code + " return os.clock() - t0")


def print_table(headers: tuple, rows: list) -> None:
    cells = [headers] + rows
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 trials of each instead of 5")
    opts = parser.parse_args()
    trials = 2 if opts.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        server = LlmosdServer(pathlib.Path(tmp) / "data", "--model", "none", "--cpus", "1")
        server.start()
        try:
            with server.channel() as channel:
                stub = kernel_pb2_grpc.KernelStub(channel)
                rows, worst = [], 0.0
                for name, lua in HOGS.items():
                    row = [name]
                    for measure in (kill_latency, cpu_lateness, wall_lateness):
                        try:
                            samples = [measure(stub, lua) for _ in range(trials)]
                        except RuntimeError as e:
                            raise RuntimeError(f"{name}: {e}") from None
                        worst = max(worst, max(samples))
                        row.append(f"{statistics.median(samples):.1f} / {max(samples):.1f}")
                    rows.append(tuple(row))
                    print(f"  {name}: done", file=sys.stderr)
                print(f"Time from a kill or limit being due to the process's end, ms (p50 / max of {trials}); "
                      f"target 20 ms:")
                print_table(("library call the process is in", "kill", f"cpu_ms={CPU_LIMIT_MS}",
                             f"wall_ms={WALL_LIMIT_MS}"), rows)
                print(f"worst: {worst:.1f} ms -> {'met' if worst <= 20 else 'NOT met'}\n")

                rows, worst_ratio = [], 0.0
                for name, code in SPEED.items():
                    ours = min(timed_llmos(stub, code) for _ in range(trials))
                    stock = min(timed_stock(code) for _ in range(trials))
                    ratio = ours / stock if stock > 0 else float("nan")
                    worst_ratio = max(worst_ratio, ratio)
                    rows.append((name, f"{ours * 1e3:.1f} ms", f"{stock * 1e3:.1f} ms", f"{ratio:.2f}x"))
                print(f"Ordinary work, best of {trials} (os.clock inside Lua); target about 2x stock at most:")
                print_table(("work", "llmos (metered)", "stock Lua (lupa)", "ratio"), rows)
                print(f"worst ratio: {worst_ratio:.2f}x")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

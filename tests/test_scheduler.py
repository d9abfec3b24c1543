"""Scheduling policy and accounting, observed through the syscall interface."""
from __future__ import annotations

import pathlib
import time
from typing import Any

import grpc
import pytest

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd.launch import LlmosdServer

SPIN = "while true do end"


def spawn(stub: Any, lua: str, **kw: Any) -> int:
    args = kw.pop("args", None)
    return stub.Spawn(pb.SpawnRequest(lua=lua, args=to_value(args), **kw)).pid


def wait(stub: Any, pid: int, timeout_ms: int = 30_000) -> pb.ProcessInfo:
    resp = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=timeout_ms))
    assert not resp.timed_out, f"pid {pid} did not end"
    return resp.process


def cpu(stub: Any, pids: list[int]) -> list[int]:
    return [stub.GetProcess(pb.GetProcessRequest(pid=p)).usage.cpu_ms for p in pids]


def share_for(stub: Any, weights: list[int], seconds: float) -> list[int]:
    pids = [spawn(stub, SPIN, weight=w) for w in weights]
    before = cpu(stub, pids)
    time.sleep(seconds)
    after = cpu(stub, pids)
    for pid in pids:
        stub.Kill(pb.KillRequest(pid=pid))
    return [b - a for a, b in zip(before, after)]


def test_equal_processes_get_equal_cpu(stub: Any) -> None:
    used = share_for(stub, [100] * 4, 1.5)
    jain = sum(used) ** 2 / (len(used) * sum(u * u for u in used))
    assert jain > 0.95, used


def test_weights_share_cpu_in_proportion(stub: Any) -> None:
    used = share_for(stub, [100, 300] * 2, 2.0)
    light, heavy = used[0] + used[2], used[1] + used[3]
    assert 2.4 < heavy / light < 3.6, used


def test_higher_priority_runs_first(stub: Any) -> None:
    """With every CPU busy at priority 0, a priority-5 process still finishes its work,
    and a priority-0 newcomer waits its turn behind it."""
    spinners = [spawn(stub, SPIN) for _ in range(4)]
    try:
        urgent = spawn(stub, "local x = 0 for i = 1, 3e6 do x = x + i end return sys.now()", priority=5)
        info = wait(stub, urgent)
        assert info.state == pb.EXITED and info.priority == 5
    finally:
        for pid in spinners:
            stub.Kill(pb.KillRequest(pid=pid))


def test_aging_keeps_low_priority_from_starving(stub: Any) -> None:
    hogs = [spawn(stub, SPIN, priority=3) for _ in range(3)]
    try:
        low = spawn(stub, "local x = 0 for i = 1, 2e6 do x = x + i end return 'done'", priority=0)
        assert from_value(wait(stub, low, 60_000).result) == "done"
    finally:
        for pid in hogs:
            stub.Kill(pb.KillRequest(pid=pid))


def test_set_priority_and_weight(stub: Any) -> None:
    pid = spawn(stub, "sys.recv{}")
    stub.SetPriority(pb.SetPriorityRequest(pid=pid, priority=7, weight=250))
    info = stub.GetProcess(pb.GetProcessRequest(pid=pid))
    assert (info.priority, info.weight) == (7, 250)
    with pytest.raises(grpc.RpcError) as e:
        stub.SetPriority(pb.SetPriorityRequest(pid=pid, priority=1, weight=10**6))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    own = wait(stub, spawn(stub, "sys.set_priority(sys.self(), -4, 50) local i = sys.info() return {i.priority, i.weight}"))
    assert from_value(own.result) == [-4, 50]
    # A process lowers its priority and may go back up to its ceiling (what it was spawned with), no higher.
    back = wait(stub, spawn(stub, """
        sys.set_priority(sys.self(), -4)
        sys.set_priority(sys.self(), 2)
        local ok, err = pcall(sys.set_priority, sys.self(), 3)
        return {sys.info().priority, ok, err}""", priority=2))
    priority, ok, err = from_value(back.result)
    assert (priority, ok) == (2, False) and "up to 2" in err
    stub.Kill(pb.KillRequest(pid=pid))


def test_accounting_is_visible(stub: Any) -> None:
    pid = spawn(stub, """
        local peer = sys.spawn{lua = "local m = sys.recv{} sys.send(m.from, m.body)"}
        sys.send(peer, "ping") sys.recv{}
        print("hello", 42) sys.log("second line")
        local x = 0 for i = 1, 2e6 do x = x + i end
        sys.recv{}
    """)
    for _ in range(500):  # bounded: until it blocks in its last recv
        info = stub.GetProcess(pb.GetProcessRequest(pid=pid))
        if info.state == pb.BLOCKED and info.usage.messages_received == 1:
            break
        time.sleep(0.01)
    assert info.blocked_on == "recv"
    assert info.usage.messages_sent == 1 and info.usage.messages_received == 1
    assert info.usage.cpu_ms > 0 and info.usage.memory_bytes > 0
    log = stub.ReadLog(pb.ReadLogRequest(pid=pid))
    assert list(log.lines) == ["hello\t42", "second line"] and log.next_offset == 2
    assert list(stub.ReadLog(pb.ReadLogRequest(pid=pid, offset=1)).lines) == ["second line"]
    listed = {p.pid: p for p in stub.ListProcesses(pb.ListProcessesRequest(states=[pb.BLOCKED])).processes}
    assert listed[pid].usage.messages_sent == 1
    stub.Kill(pb.KillRequest(pid=pid))
    ended = wait(stub, pid)
    assert ended.usage.cpu_ms > 0 and ended.state == pb.KILLED


@pytest.mark.parametrize("limit, reason", [({"cpu_ms": 150}, "cpu_limit"), ({"wall_ms": 150}, "wall_limit")])
def test_limits_end_a_process_with_their_reason(stub: Any, limit: dict, reason: str) -> None:
    info = wait(stub, spawn(stub, SPIN, limits=pb.Limits(**limit)))
    assert (info.state, info.exit_reason) == (pb.KILLED, reason)


def test_cpu_limit_inside_a_coroutine_and_a_blocked_wall_limit(stub: Any) -> None:
    inside = wait(stub, spawn(stub, "coroutine.wrap(function() while true do end end)()",
                              limits=pb.Limits(cpu_ms=150)))
    assert inside.exit_reason == "cpu_limit"
    blocked = wait(stub, spawn(stub, "sys.recv{}", limits=pb.Limits(wall_ms=100)))
    assert blocked.exit_reason == "wall_limit"


def test_spawning_does_not_preempt_the_spawner(tmp_path: pathlib.Path) -> None:
    # One CPU and a long quantum: children queue behind their parent instead of
    # taking its CPU the moment they exist, as they would if a new process got
    # a sleeper's credit. The parent first runs a while and sleeps, so that the
    # scheduler's floor of CPU time has moved past a new process's zero.
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "1", "--quantum-ms", "200")
    server.start()
    try:
        with server.channel() as channel:
            stub = kernel_pb2_grpc.KernelStub(channel)
            out = from_value(wait(stub, spawn(stub, """
                local function spin(ms) local t0 = sys.now() while sys.now() - t0 < ms do end end
                spin(50)
                sys.sleep(1)
                local kids = 3
                for i = 1, kids do sys.spawn{lua = "sys.send(args, sys.now())", args = sys.self()} end
                spin(20)
                local done = sys.now()
                local started = {}
                for i = 1, kids do started[i] = sys.recv{}.body end
                return {done = done, started = started}
            """)).result)
        assert all(start >= out["done"] for start in out["started"]), out
    finally:
        server.stop()

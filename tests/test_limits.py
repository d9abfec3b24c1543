"""What the kernel bounds, whoever asks: the value model and the one message
size limit on every path, mailbox bytes, live processes per subtree and per
server, priority ranges and ceilings, a child's limits, durations, logs, and
CPU time actually used. Over real gRPC against real servers."""
from __future__ import annotations

import math
import os
import pathlib
import random
import re
import time
from typing import Any, Iterator

import grpc
import psutil
import pytest

import llmos
from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer
from llmosd.native import _kernel
from statuses import code_of

MiB = 1 << 20
WAIT_MS = 30_000


def run(stub: Any, lua: str, args: Any = None, **spawn: Any) -> pb.ProcessInfo:
    pid = stub.Spawn(pb.SpawnRequest(lua=lua, args=to_value(args), **spawn)).pid
    resp = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=WAIT_MS))
    assert not resp.timed_out
    return resp.process


def result(info: pb.ProcessInfo) -> Any:
    assert info.state == pb.EXITED, (pb.ProcessState.Name(info.state), info.exit_reason, info.error)
    return from_value(info.result)


@pytest.fixture
def small_server(tmp_path: pathlib.Path) -> Iterator[LlmosdServer]:
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--agent-socket", "none", "--cpus", "2",
                          "--max-processes", "40")
    server.start()
    yield server
    server.stop()


# -- the value model --------------------------------------------------------------------------
def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["null", "bool", "int", "float", "str", "list", "dict"] if depth < 5 else ["int", "str"])
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 127, 128, 2**31, -(2**53), 2**53, rng.randrange(-10**9, 10**9)])
    if kind == "float":
        return rng.choice([0.5, -1e300, 1e-300, 3.25, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return "".join(rng.choice("ab\u00e9\u4e2d\U0001F600\n") for _ in range(rng.choice([0, 1, 5, 127, 200, 20000])))
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    return {f"k{i}\u00e9" * rng.randrange(1, 70): _random_json(rng, depth + 1) for i in range(rng.randrange(0, 6))}


def test_a_values_size_is_its_protobuf_encoding_size() -> None:
    # One size for every path: what a gRPC client sends is what Lua and the kernel count.
    rng = random.Random(7)
    for _ in range(500):
        value = _random_json(rng)
        assert _kernel.value_size(value) == to_value(value).ByteSize(), value


def test_the_value_model_is_enforced_where_a_value_enters() -> None:
    for bad, why in [(2**53 + 1, "2^53"), (math.nan, "NaN"), (math.inf, "NaN"), ({1: "x"}, "keys"),
                     (b"raw", "data"), ("\ud800", "Unicode"), (object(), "JSON")]:
        with pytest.raises(_kernel.BadValue, match=re.escape(why)):
            _kernel.value_size(bad)
    deep: Any = 1
    for _ in range(32):
        deep = [deep]
    _kernel.value_size(deep)  # 32 levels, as deep as a Lua table may nest
    with pytest.raises(_kernel.BadValue, match="32 levels"):
        _kernel.value_size([deep])
    with pytest.raises(_kernel.TooLarge):
        _kernel.value_size(["x" * 1000] * 1000, 100_000)


def test_a_result_that_is_no_json_number_crashes_its_process_and_poisons_nothing(stub: Any) -> None:
    info = run(stub, "return math.maxinteger")
    assert info.state == pb.CRASHED and "2^53" in info.error, info.error
    # Everything that shows the record keeps working.
    assert stub.GetProcess(pb.GetProcessRequest(pid=info.pid)).state == pb.CRASHED
    assert stub.Wait(pb.WaitRequest(pid=info.pid)).process.state == pb.CRASHED
    listed = stub.ListProcesses(pb.ListProcessesRequest(include_ended=True)).processes
    assert info.pid in {p.pid for p in listed}
    got = result(run(stub, "return {n = 2^53, f = 2^63 + 0.0, ok = pcall(sys.send, sys.self(), {math.mininteger})}"))
    assert got == {"n": 2**53, "f": 2.0**63, "ok": False}


def test_two_keys_that_become_the_same_text_are_refused(stub: Any) -> None:
    got = result(run(stub, """
        local ok, err = pcall(sys.send, sys.self(), {[1] = "a", ["1"] = "b", x = 1})
        return err
    """))
    assert "both '1'" in got


def test_a_dag_costs_no_more_than_the_message_limit_to_refuse(llmosd: LlmosdServer, stub: Any) -> None:
    server = psutil.Process(llmosd.proc.pid)
    before = server.memory_info().rss
    got = result(run(stub, """
        local x = {} for i = 1, 30 do x = {x, x} end  -- 2^30 paths, 31 levels
        local s = {} local big = string.rep("y", 1 << 20) for i = 1, 256 do s[i] = big end
        local out = {}
        for _, v in ipairs({x, s}) do
            for _, to in ipairs({sys.self(), "nobody-by-this-name"}) do
                local ok, err = pcall(sys.send, to, v)
                out[#out + 1] = err
            end
        end
        local ok, err = pcall(sys.spawn, {lua = "return 1", args = x})
        out[#out + 1] = err
        return out
    """, limits=pb.Limits(memory_bytes=64 * MiB)))
    assert len(got) == 5 and all("larger than the limit" in err or "more than" in err for err in got), got
    assert server.memory_info().rss - before < 64 * MiB  # a shared table is converted once


def test_one_message_limit_between_lua_processes(stub: Any) -> None:
    got = result(run(stub, """
        local peer = sys.spawn{lua = "local m = sys.recv{} sys.send(m.from, #m.body)", limits = {memory_bytes = 64 << 20}}
        local ok, err = pcall(sys.send, peer, string.rep("x", 8 << 20))
        sys.send(peer, string.rep("x", 3 << 20))
        return {err = err, echoed = sys.recv{from = peer}.body}
    """, limits=pb.Limits(memory_bytes=128 * MiB)))
    assert "larger than the limit" in got["err"] and got["echoed"] == 3 << 20


def test_a_message_to_a_port_that_breaks_the_model_is_refused_and_nothing_is_lost(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    stub.Send(pb.SendRequest(to=port, body=to_value("first")))
    nan = pb.SendRequest(to=port)
    nan.body.number_value = math.nan
    assert code_of(lambda: stub.Send(nan)) == grpc.StatusCode.INVALID_ARGUMENT
    crashed = run(stub, "return pcall(sys.send, args, {n = math.maxinteger})", port)
    assert from_value(crashed.result) is False
    got = stub.Recv(pb.RecvRequest(pid=port, timeout_ms=1000))
    assert from_value(got.message.body) == "first"
    assert stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0)).timed_out
    stub.Exit(pb.ExitRequest(pid=port))


# -- mailbox bytes ----------------------------------------------------------------------------
def test_a_mailbox_holds_at_most_its_byte_limit(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    got = result(run(stub, """
        local box = sys.spawn{lua = "sys.recv{tag = 'never'}", limits = {mailbox_bytes = 1 << 20}}
        local piece = string.rep("z", 400000)
        local sent = 0
        for i = 1, 3 do
            if pcall(sys.send, box, piece) then sent = sent + 1 end
        end
        local ok, err = pcall(sys.send, box, piece)
        local usage = sys.info(box).usage
        sys.kill(box)
        return {sent = sent, err = err, usage = usage}
    """))
    assert got["sent"] == 2 and "bytes" in got["err"], got
    assert got["usage"]["mailbox_len"] == 2 and 800_000 < got["usage"]["mailbox_bytes"] < 820_000
    stub.Exit(pb.ExitRequest(pid=port))


def test_monitoring_an_ended_process_again_and_again_cannot_flood_a_mailbox(stub: Any) -> None:
    watcher = stub.OpenPort(pb.OpenPortRequest(mailbox=5)).pid
    ended = run(stub, "return 1").pid
    codes = []
    for _ in range(20):
        try:
            stub.Monitor(pb.MonitorRequest(watcher=watcher, target=ended))
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert codes[:5] == [grpc.StatusCode.OK] * 5
    assert set(codes[5:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert stub.GetProcess(pb.GetProcessRequest(pid=watcher)).usage.mailbox_len == 5
    stub.Exit(pb.ExitRequest(pid=watcher))


# -- live processes --------------------------------------------------------------------------
def test_a_subtree_holds_at_most_its_processes_limit(stub: Any) -> None:
    got = result(run(stub, """
        local idle = "sys.recv{tag = 'never'}"
        local spawner = [[
            for i = 1, 3 do sys.spawn{lua = "sys.recv{tag = 'never'}"} end
            sys.send(args, "ready") sys.recv{tag = 'never'}
        ]]
        local mid = sys.spawn{lua = spawner, args = sys.self()}
        sys.recv{from = mid}
        -- four below me (mid and its three); my limit is six
        local a = sys.spawn{lua = idle}
        local b = sys.spawn{lua = idle}
        local ok, err = pcall(sys.spawn, {lua = idle})
        local mine = sys.info().usage.processes
        sys.kill(a)
        local again = pcall(sys.spawn, {lua = "return 1"})
        return {err = err, mine = mine, again = again}
    """, limits=pb.Limits(processes=6)))
    assert "limits.processes" in got["err"] and got["mine"] == 6 and got["again"], got


def test_the_server_holds_at_most_max_processes(small_server: LlmosdServer) -> None:
    with small_server.channel() as channel:
        from llmos.v1 import kernel_pb2_grpc
        stub = kernel_pb2_grpc.KernelStub(channel)
        info = run(stub, """
            local n, err = 0, nil
            while true do
                local ok, e = pcall(sys.spawn, {lua = "sys.recv{tag = 'never'}"})
                if not ok then err = e break end
                n = n + 1
            end
            return {n = n, err = err}
        """)
        got = result(info)
        assert got["n"] == 39 and "limit of 40 processes" in got["err"], got  # 40 counts the spawner
        # The spawner has ended and its 39 children live on: room for one more, a port.
        stub.OpenPort(pb.OpenPortRequest())
        assert code_of(lambda: stub.OpenPort(pb.OpenPortRequest())) == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- priorities and a child's limits ------------------------------------------------------------
def test_priorities_have_a_range(stub: Any) -> None:
    for bad in (21, -21, 10**9, -(2**31)):
        assert code_of(lambda: stub.Spawn(pb.SpawnRequest(lua="return 1", priority=bad))) \
            == grpc.StatusCode.INVALID_ARGUMENT
    got = result(run(stub, "local ok, err = pcall(sys.set_priority, sys.self(), 1e15) return err"))
    assert "between -20 and 20" in got


def test_no_process_raises_a_priority_over_its_ceiling(stub: Any) -> None:
    got = result(run(stub, """
        local ok1, e1 = pcall(sys.spawn, {lua = "return 1", priority = 6})
        local child = sys.spawn{lua = "sys.recv{tag = 'never'}", priority = 2}
        local ok2, e2 = pcall(sys.set_priority, child, 5)
        sys.set_priority(child, -3)
        local ok3 = pcall(sys.set_priority, child, 2)
        sys.kill(child)
        return {e1 = e1, e2 = e2, ok3 = ok3}
    """, priority=5))
    assert "at most its parent's (5)" in got["e1"] and "up to 2" in got["e2"] and got["ok3"], got
    # The operator (an external client) may raise any process within the range.
    pid = stub.Spawn(pb.SpawnRequest(lua="sys.recv{tag = 'never'}")).pid
    stub.SetPriority(pb.SetPriorityRequest(pid=pid, priority=20))
    assert stub.GetProcess(pb.GetProcessRequest(pid=pid)).priority == 20
    stub.Kill(pb.KillRequest(pid=pid))


def test_a_childs_limits_are_at_most_its_parents(stub: Any) -> None:
    got = result(run(stub, """
        local ok, err = pcall(sys.spawn, {lua = "return 1", limits = {memory_bytes = 4 << 30}})
        local child = sys.spawn{lua = "return sys.info().pid"}
        local info = sys.wait(child)
        local ok2, err2 = pcall(sys.spawn, {lua = "return 1", limits = {cpu_ms = 10^9}})
        return {err = err, err2 = err2, child = sys.info(child)}
    """, limits=pb.Limits(memory_bytes=16 * MiB, cpu_ms=60_000)))
    assert "memory_bytes" in got["err"] and "cpu_ms" in got["err2"], got
    child = stub.GetProcess(pb.GetProcessRequest(pid=got["child"]["pid"]))
    assert child.limits.memory_bytes == 16 * MiB and child.limits.cpu_ms == 60_000  # defaults lowered to the parent's


# -- durations --------------------------------------------------------------------------------
def test_huge_durations_are_clamped_and_every_timer_keeps_firing(stub: Any) -> None:
    sleepers = [stub.Spawn(pb.SpawnRequest(lua=src)).pid for src in (
        "sys.sleep(1e300)", "sys.recv{timeout_ms = math.huge}", "sys.lock.acquire('held-for-ever') "
        "sys.spawn{lua = \"sys.lock.acquire('held-for-ever', {timeout_ms = 1e300})\"} sys.sleep(2^63)")]
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    forever = stub.Recv.future(pb.RecvRequest(pid=port, timeout_ms=9 * 10**18))
    wall = stub.Spawn(pb.SpawnRequest(lua="sys.recv{tag = 'never'}", limits=pb.Limits(wall_ms=2**64 - 1))).pid
    for bad in (lambda: stub.Recv(pb.RecvRequest(pid=port, timeout_ms=-1)),):
        assert code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT
    nan = run(stub, "return {pcall(sys.sleep, 0/0)}")
    assert "non-negative" in from_value(nan.result)[1]
    # Short timeouts still fire after all that.
    assert stub.Recv(pb.RecvRequest(pid=port, timeout_ms=200)).timed_out
    assert result(run(stub, "return sys.recv{timeout_ms = 50} == nil")) is True
    assert stub.GetProcess(pb.GetProcessRequest(pid=wall)).limits.wall_ms == 315_360_000_000
    forever.cancel()
    for pid in sleepers + [wall]:
        stub.Kill(pb.KillRequest(pid=pid))
    stub.Exit(pb.ExitRequest(pid=port))


# -- logs ----------------------------------------------------------------------------------------
def test_logs_are_bounded_per_line_and_per_process(stub: Any) -> None:
    info = run(stub, """
        local line = string.rep("l", 1 << 20)
        for i = 1, 20 do sys.log(i .. line) end
        for i = 1, 100 do sys.log("short " .. i) end
    """, limits=pb.Limits(memory_bytes=64 * MiB))
    log = stub.ReadLog(pb.ReadLogRequest(pid=info.pid))
    assert log.lines[-1] == "short 100"
    assert sum(len(line) for line in log.lines) <= 256 << 10
    assert all(len(line) < 17 << 10 for line in log.lines)
    assert log.next_offset == 120 and log.dropped > 0 and log.dropped + len(log.lines) == 120
    assert any("characters cut" in line for line in log.lines)


# -- CPU time actually used ------------------------------------------------------------------
def test_cpu_ms_is_cpu_actually_used(tmp_path: pathlib.Path) -> None:
    # More virtual CPUs than cores: the spinners share the cores, and what each
    # reports is what it got, not the time it held a virtual CPU.
    cores = len(os.sched_getaffinity(0))
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--agent-socket", "none", "--cpus", str(2 * cores))
    server.start()
    try:
        with llmos.Client(server.target) as k:
            pids = [k.spawn(lua="while true do end") for _ in range(2 * cores)]
            time.sleep(2.0)
            infos = [k.get(pid) for pid in pids]
            for pid in pids:
                k.kill(pid)
        used = sum(i.usage["cpu_ms"] for i in infos)
        wall = max(i.usage["wall_ms"] for i in infos)
        assert used <= cores * wall * 1.1 + 100, (used, cores, wall)
    finally:
        server.stop()

"""The Lua example programs (userland/lua/) and the kernel's message semantics,
exercised over real gRPC against a real llmosd with raw stubs."""
from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import grpc
import pytest

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from statuses import status_of

WAIT_MS = 20_000  # generous bound for any process in these tests to end


# -- helpers --------------------------------------------------------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def spawn(stub: Any, *, path: str | None = None, lua: str | None = None, args: Any = None, **kw: Any) -> int:
    req = pb.SpawnRequest(**kw)
    if path is not None:
        req.path = path
    if lua is not None:
        req.lua = lua
    if args is not None:
        req.args.CopyFrom(to_value(args))
    return stub.Spawn(req).pid


def wait(stub: Any, pid: int, timeout_ms: int = WAIT_MS) -> pb.ProcessInfo:
    resp = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=timeout_ms))
    assert not resp.timed_out, f"pid {pid} did not end within {timeout_ms} ms"
    return resp.process


def run(stub: Any, **kw: Any) -> pb.ProcessInfo:
    return wait(stub, spawn(stub, **kw))


def result(info: pb.ProcessInfo) -> Any:
    assert info.state == pb.EXITED, f"state {pb.ProcessState.Name(info.state)}, reason {info.exit_reason!r}, error {info.error!r}"
    assert info.exit_reason == "normal"
    return from_value(info.result)


def send(stub: Any, sender: int, to: int | str, body: Any = None, tag: str = "", data: bytes = b"",
         correlation_id: str = "") -> int:
    req = pb.SendRequest(tag=tag, data=data, correlation_id=correlation_id, **{"from": sender})
    if isinstance(to, str):
        req.to_name = to
    else:
        req.to = to
    if body is not None:
        req.body.CopyFrom(to_value(body))
    return stub.Send(req).message_id


def recv(stub: Any, pid: int, timeout_ms: int = 10_000, **match: Any) -> pb.Message:
    resp = stub.Recv(pb.RecvRequest(pid=pid, timeout_ms=timeout_ms, **match))
    assert not resp.timed_out, f"nothing for pid {pid} matching {match} within {timeout_ms} ms"
    return resp.message


def sender_of(msg: pb.Message) -> int:
    return getattr(msg, "from")


def assert_serving(stub: Any) -> None:
    """The server still answers and still runs programs."""
    assert result(run(stub, lua="return 6 * 7")) == 42


def wait_state(stub: Any, pid: int, state: int, timeout_s: float = 10.0) -> pb.ProcessInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.GetProcess(pb.GetProcessRequest(pid=pid))
        if info.state == state:
            return info
        assert time.monotonic() < deadline, f"pid {pid} stayed {pb.ProcessState.Name(info.state)}"
        time.sleep(0.01)


# -- the examples ---------------------------------------------------------------------------
def test_echo_through_a_port_with_correlation_ids(stub: Any) -> None:
    name = unique("echo")
    echo = spawn(stub, path="lua/echo.lua", args={"name": name})
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    # The name is registered by the program itself, so it may take a moment.
    deadline = time.monotonic() + 10
    while not stub.ListProcesses(pb.ListProcessesRequest(name=name)).processes:
        assert time.monotonic() < deadline, "echo never registered its name"
        time.sleep(0.01)

    bodies = {"c1": {"n": 1, "list": [1, "two", None, True]}, "c2": "text", "c3": 3.5}
    for cid, body in bodies.items():
        send(stub, port, name, body, tag="ask", data=cid.encode() + b"\xff\x00", correlation_id=cid)
    # Replies taken out of order by correlation id.
    for cid in ("c3", "c1", "c2"):
        msg = recv(stub, port, correlation_id=cid)
        assert from_value(msg.body) == bodies[cid]
        assert msg.tag == "ask"
        assert msg.data == cid.encode() + b"\xff\x00"
        assert sender_of(msg) == echo
        assert msg.to == port

    send(stub, port, echo, None, tag="stop", correlation_id="bye")
    ack = recv(stub, port, correlation_id="bye")
    assert ack.tag == "stopped" and from_value(ack.body) == {"echoed": 3}
    assert result(wait(stub, echo)) == {"echoed": 3, "stopped_by": port}
    # The name went with the process.
    code, _ = status_of(lambda: send(stub, port, name, "late"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_echo_times_out_by_itself(stub: Any) -> None:
    assert result(run(stub, path="lua/echo.lua", args={"timeout_ms": 50})) == {"echoed": 0, "timed_out": True}


def test_ping_pong(stub: Any) -> None:
    assert result(run(stub, path="lua/ping_pong.lua", args={"n": 200})) == {"rounds": 200, "ponger": "normal"}


def test_map_reduce(stub: Any) -> None:
    items = list(range(1, 23))
    expected = sum(x * x for x in items)
    out = result(run(stub, path="lua/map_reduce.lua", args={"items": items, "workers": 5}))
    assert out == {"sum": expected, "chunks": 5, "crashed": 0, "retried": 0}


def test_map_reduce_survives_a_worker_crash(stub: Any) -> None:
    items = list(range(1, 11))
    out = result(run(stub, path="lua/map_reduce.lua", args={"items": items, "workers": 3, "crash_chunk": 2}))
    assert out == {"sum": sum(x * x for x in items), "chunks": 3, "crashed": 1, "retried": 1}


def test_supervisor_restarts_a_crashing_worker(stub: Any) -> None:
    out = result(run(stub, path="lua/supervisor.lua", args={"intensity": 3, "fail_times": 2}))
    worker = out["children"]["worker"]
    assert out["restarts"] == 2
    assert worker["status"] == "done" and worker["result"] == 42 and worker["restarts"] == 2
    reasons = [e["reason"] for e in worker["exits"]]
    assert reasons == ["error", "error", "normal"]
    assert "flaky worker failing on attempt 1" in worker["exits"][0]["error"]
    pids = [e["pid"] for e in worker["exits"]]
    assert len(set(pids)) == 3 and pids == sorted(pids)  # fresh, increasing pids


def test_supervisor_gives_up_past_its_intensity(stub: Any) -> None:
    """More restarts than the intensity allows: the supervisor kills its children and crashes."""
    info = run(stub, path="lua/supervisor.lua", args={
        "intensity": 1, "period_ms": 600_000,
        "children": [{"id": "bad", "fail_times": 5}, {"id": "good", "lua": "sys.recv{tag = 'never'}"}],
    })
    assert info.state == pb.CRASHED and "supervisor: gave up: 1 restarts within 600000 ms" in info.error
    assert "child bad" in info.error and "flaky worker failing on attempt 2" in info.error
    kids = stub.ListProcesses(pb.ListProcessesRequest(parent=info.pid, include_ended=True)).processes
    assert sorted(k.exit_reason for k in kids) == ["error", "error", "shutdown"]  # bad twice; good, killed


def test_demo_ends_by_itself(stub: Any) -> None:
    out = result(run(stub, path="lua/demo.lua"))
    assert out["greeting"] == "hello, demo"
    assert out["failed"] == "error"
    ring = out["ring"]
    assert len(ring) == 4 and len(set(ring)) == 4  # the demo's pid and three agents


# -- messaging semantics --------------------------------------------------------------------
def test_thousand_messages_arrive_in_order_both_ways(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    # Lua -> port.
    sender = spawn(stub, lua="for i = 1, 1000 do sys.send(args.port, i, {tag = 'n'}) end return 'sent'",
                   args={"port": port})
    assert result(wait(stub, sender)) == "sent"
    got = [from_value(recv(stub, port, tag="n").body) for _ in range(1000)]
    assert got == list(range(1, 1001))
    # port -> Lua: the receiver checks the order itself and reports the first gap.
    collector = spawn(stub, lua="""
        local want = 1
        for i = 1, 1000 do
          local m = sys.recv{timeout_ms = 10000}
          if m == nil then return {error = 'timeout', at = want} end
          if m.body ~= want then return {error = 'order', at = want, got = m.body} end
          want = want + 1
        end
        return {ok = want - 1}
    """)
    for i in range(1, 1001):
        send(stub, port, collector, i)
    assert result(wait(stub, collector)) == {"ok": 1000}


def test_selective_receive_keeps_unmatched_in_order(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    pid = spawn(stub, lua="""
        local first = sys.recv{tag = 'go', timeout_ms = 10000}   -- sent last
        local out = {first.body}
        for i = 1, 5 do out[#out + 1] = sys.recv{timeout_ms = 10000}.body end
        return out
    """)
    for i, tag in enumerate(["a", "b", "a", "c", "b"]):
        send(stub, port, pid, f"{tag}{i}", tag=tag)
    send(stub, port, pid, "go!", tag="go")
    assert result(wait(stub, pid)) == ["go!", "a0", "b1", "a2", "c3", "b4"]

    # The same through a port's Recv: filter by tag, then take the rest.
    other = stub.OpenPort(pb.OpenPortRequest()).pid
    for i, tag in enumerate(["x", "y", "x", "y"]):
        send(stub, other, port, i, tag=tag)
    assert from_value(recv(stub, port, tag="y").body) == 1
    assert [from_value(recv(stub, port).body) for _ in range(3)] == [0, 2, 3]
    # Filter by sender.
    send(stub, other, port, "from other")
    send(stub, port, port, "from self")
    assert from_value(recv(stub, port, **{"from": port}).body) == "from self"
    assert from_value(recv(stub, port).body) == "from other"
    assert stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0)).timed_out


def test_registered_name_is_freed_on_exit(stub: Any) -> None:
    name = unique("named")
    pid = spawn(stub, lua="sys.recv{} return 1", name=name)
    code, details = status_of(lambda: spawn(stub, lua="return 1", name=name))
    assert code == grpc.StatusCode.ALREADY_EXISTS and name in details
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    send(stub, port, name, "wake up")
    assert result(wait(stub, pid)) == 1
    code, _ = status_of(lambda: send(stub, port, name, "anyone?"))
    assert code == grpc.StatusCode.NOT_FOUND
    # Free again: a new process can take it, also a killed one's.
    second = spawn(stub, lua="sys.recv{} return 2", name=name)
    stub.Kill(pb.KillRequest(pid=second))
    wait(stub, second)
    third = stub.OpenPort(pb.OpenPortRequest(name=name)).pid
    assert stub.ListProcesses(pb.ListProcessesRequest(name=name)).processes[0].pid == third


def test_monitors_deliver_exit_messages(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    crasher = spawn(stub, lua="sys.recv{tag = 'go'} error('boom')")
    stub.Monitor(pb.MonitorRequest(watcher=port, target=crasher))
    send(stub, port, crasher, None, tag="go")
    msg = recv(stub, port, tag="EXIT")
    assert sender_of(msg) == crasher
    body = from_value(msg.body)
    assert body["pid"] == crasher and body["state"] == "CRASHED" and body["reason"] == "error"
    assert "boom" in body["error"] and body["result"] is None

    # Monitoring an ended process tells at once (as in Erlang).
    stub.Monitor(pb.MonitorRequest(watcher=port, target=crasher))
    assert from_value(recv(stub, port, tag="EXIT", timeout_ms=2000).body)["reason"] == "error"

    # A Lua watcher gets the EXIT of a killed process, with the Kill reason.
    victim = spawn(stub, lua="sys.recv{}")
    watcher = spawn(stub, lua="""
        sys.monitor(args.victim)
        sys.send(args.port, 'watching')
        local m = sys.recv{tag = 'EXIT', timeout_ms = 10000}
        return {from = m.from, pid = m.body.pid, state = m.body.state, reason = m.body.reason}
    """, args={"victim": victim, "port": port})
    assert from_value(recv(stub, port, **{"from": watcher}).body) == "watching"
    stub.Kill(pb.KillRequest(pid=victim, reason="shut down by test"))
    assert result(wait(stub, watcher)) == {"from": victim, "pid": victim, "state": "KILLED",
                                           "reason": "shut down by test"}


def test_kill_blocked_and_cpu_bound_processes(stub: Any) -> None:
    blocked = spawn(stub, lua="sys.recv{} return 'unreachable'")
    wait_state(stub, blocked, pb.BLOCKED)
    assert stub.GetProcess(pb.GetProcessRequest(pid=blocked)).blocked_on == "recv"
    assert not stub.Kill(pb.KillRequest(pid=blocked)).already_ended
    info = wait(stub, blocked, 5000)
    assert info.state == pb.KILLED and info.exit_reason == "killed"

    spinner = spawn(stub, lua="local n = 0 while true do n = n + 1 end")
    wait_state(stub, spinner, pb.RUNNING)
    assert not stub.Kill(pb.KillRequest(pid=spinner, reason="enough")).already_ended
    info = wait(stub, spinner, 5000)
    assert info.state == pb.KILLED and info.exit_reason == "enough"
    # Killing an ended process is not an error.
    assert stub.Kill(pb.KillRequest(pid=spinner)).already_ended
    assert_serving(stub)


def test_wait_on_an_ended_process_and_timeouts(stub: Any) -> None:
    pid = spawn(stub, lua="return {answer = 42}")
    first = wait(stub, pid)
    again = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=0))
    assert not again.timed_out and again.process.pid == pid
    assert from_value(again.process.result) == {"answer": 42} == from_value(first.result)
    assert again.process.ended_at_ms >= again.process.started_at_ms > 0
    sleeper = spawn(stub, lua="sys.recv{}")
    assert stub.Wait(pb.WaitRequest(pid=sleeper, timeout_ms=0)).timed_out
    assert stub.Wait(pb.WaitRequest(pid=sleeper, timeout_ms=50)).timed_out
    stub.Kill(pb.KillRequest(pid=sleeper))
    assert wait(stub, sleeper).state == pb.KILLED


def test_lua_wait_returns_a_live_childs_final_info(stub: Any) -> None:
    """sys.wait on a child that is still running must block and then return its info table."""
    parent = spawn(stub, lua="""
        local child = sys.spawn{lua = 'sys.sleep(50) return 7'}
        local info = sys.wait(child, 5000)
        return {state = info.state, result = info.result, reason = info.exit_reason}
    """)
    resp = stub.Wait(pb.WaitRequest(pid=parent, timeout_ms=3000))
    if resp.timed_out:
        stub.Kill(pb.KillRequest(pid=parent))
    assert not resp.timed_out, "the parent never came back from sys.wait"
    assert result(resp.process) == {"state": "EXITED", "result": 7, "reason": "normal"}


def test_lua_wait_timeout_returns_nil(stub: Any) -> None:
    out = run(stub, lua="""
        local child = sys.spawn{lua = 'sys.recv{}'}
        local info = sys.wait(child, 30)
        sys.kill(child)
        return info == nil
    """)
    assert result(out) is True


# -- durability -------------------------------------------------------------------------------
def _stub(server: Any) -> Any:
    return kernel_pb2_grpc.KernelStub(server.channel())


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "kill-9"])
def test_pids_and_port_messages_survive_the_server(fresh_llmosd: Any, how: int) -> None:
    stub = _stub(fresh_llmosd)
    ended = spawn(stub, lua="return 'kept'")
    assert result(wait(stub, ended)) == "kept"
    running = spawn(stub, lua="sys.recv{}")
    port = stub.OpenPort(pb.OpenPortRequest(name="inbox")).pid
    sender = stub.OpenPort(pb.OpenPortRequest()).pid
    for i in range(5):
        send(stub, sender, port, {"i": i}, tag="t", data=bytes([i, 255]), correlation_id=f"c{i}")
    send(stub, sender, "inbox", "by name")
    before = max(ended, running, port, sender)

    fresh_llmosd.stop(how)
    fresh_llmosd.start()
    stub = _stub(fresh_llmosd)

    # Messages to the port, in order, with every field.
    for i in range(5):
        msg = recv(stub, port, timeout_ms=2000)
        assert (from_value(msg.body), msg.tag, msg.data, msg.correlation_id, sender_of(msg)) == (
            {"i": i}, "t", bytes([i, 255]), f"c{i}", sender)
    assert from_value(recv(stub, port, timeout_ms=2000).body) == "by name"
    assert stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0)).timed_out
    # The port kept its name; taken messages are gone for good.
    send(stub, sender, "inbox", "after restart")
    assert from_value(recv(stub, port, timeout_ms=2000).body) == "after restart"
    # Exit records survive; a process alive at the end was ended by the shutdown,
    # or (kill -9) is found ended with "server_restart" at start-up.
    assert result(wait(stub, ended, 2000)) == "kept"
    info = wait(stub, running, 2000)
    assert info.state == pb.KILLED
    assert info.exit_reason == ("shutdown" if how == signal.SIGTERM else "server_restart")
    # Pids are never reused.
    new = [spawn(stub, lua="return 1"), stub.OpenPort(pb.OpenPortRequest()).pid]
    assert min(new) > before
    assert result(wait(stub, new[0])) == 1


def test_taken_port_messages_stay_taken_after_kill_9(fresh_llmosd: Any) -> None:
    stub = _stub(fresh_llmosd)
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    for i in range(3):
        send(stub, port, port, i)
    assert from_value(recv(stub, port).body) == 0
    fresh_llmosd.stop(signal.SIGKILL)
    fresh_llmosd.start()
    stub = _stub(fresh_llmosd)
    assert [from_value(recv(stub, port, timeout_ms=2000).body) for _ in range(2)] == [1, 2]
    assert stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0)).timed_out


# -- errors ---------------------------------------------------------------------------------
def test_mailbox_full_is_resource_exhausted(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest(mailbox=3)).pid
    for i in range(3):
        send(stub, port, port, i)
    code, details = status_of(lambda: send(stub, port, port, 3))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in details
    # Nothing was dropped or half-stored: taking one makes room for one.
    assert from_value(recv(stub, port).body) == 0
    send(stub, port, port, 3)
    assert [from_value(recv(stub, port).body) for _ in range(3)] == [1, 2, 3]

    # A Lua process's mailbox limit.
    lua = spawn(stub, lua="sys.sleep(100000)", limits=pb.Limits(mailbox=2))
    send(stub, port, lua, 1)
    send(stub, port, lua, 2)
    code, _ = status_of(lambda: send(stub, port, lua, 3))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # And from inside Lua: a clear error, not a silent drop.
    out = run(stub, lua="local ok, err = pcall(sys.send, args.to, 'x') return {ok = ok, err = err}",
              args={"to": lua})
    got = result(out)
    assert got["ok"] is False and "full" in got["err"]
    stub.Kill(pb.KillRequest(pid=lua))

    # A message over the kernel's size limit (4 MiB), still under gRPC's own.
    code, details = status_of(lambda: send(stub, port, port, "x" * 4_200_000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than the limit" in details, details
    assert_serving(stub)


def test_sending_from_a_dead_pid_is_failed_precondition(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    dead = spawn(stub, lua="return 1")
    wait(stub, dead)
    code, details = status_of(lambda: send(stub, dead, port, "ghost"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and str(dead) in details
    # Sending to a dead pid is refused the same way (README: "Sending from or to an ended pid is
    # FAILED_PRECONDITION, to an unknown one NOT_FOUND"), from gRPC and from Lua.
    code, details = status_of(lambda: send(stub, port, dead, "hello?"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and str(dead) in details, (code, details)
    out = run(stub, lua="local ok, err = pcall(sys.send, args, 'hello?') return {ok, err}", args=dead)
    ok, err = result(out)
    assert ok is False and str(dead) in err
    assert_serving(stub)


def test_unknown_pid_is_not_found(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    unknown = 10**12
    calls = {
        "send to": lambda: send(stub, port, unknown, 1),
        "send from": lambda: send(stub, unknown, port, 1),
        "send to name": lambda: send(stub, port, unique("nobody"), 1),
        "recv": lambda: stub.Recv(pb.RecvRequest(pid=unknown, timeout_ms=0)),
        "wait": lambda: stub.Wait(pb.WaitRequest(pid=unknown, timeout_ms=0)),
        "kill": lambda: stub.Kill(pb.KillRequest(pid=unknown)),
        "get": lambda: stub.GetProcess(pb.GetProcessRequest(pid=unknown)),
        "monitor": lambda: stub.Monitor(pb.MonitorRequest(watcher=port, target=unknown)),
        "register": lambda: stub.Register(pb.RegisterRequest(pid=unknown, name=unique("n"))),
        "path": lambda: spawn(stub, path="lua/no_such_program.lua"),
    }
    for what, call in calls.items():
        code, details = status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND, f"{what}: {code} {details}"
        assert details, what
    assert_serving(stub)


def test_name_taken_is_already_exists(stub: Any) -> None:
    name = unique("taken")
    holder = stub.OpenPort(pb.OpenPortRequest(name=name)).pid
    other = stub.OpenPort(pb.OpenPortRequest()).pid
    calls = {
        "spawn": lambda: spawn(stub, lua="return 1", name=name),
        "open port": lambda: stub.OpenPort(pb.OpenPortRequest(name=name)),
        "register": lambda: stub.Register(pb.RegisterRequest(pid=other, name=name)),
    }
    for what, call in calls.items():
        code, details = status_of(call)
        assert code == grpc.StatusCode.ALREADY_EXISTS and str(holder) in details, f"{what}: {code} {details}"
    out = run(stub, lua="local ok, err = pcall(sys.register, args.name) return {ok, err}", args={"name": name})
    ok, err = result(out)
    assert ok is False and name in err
    assert_serving(stub)


def test_bad_arguments_are_invalid_argument(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    calls = {
        "no program": lambda: stub.Spawn(pb.SpawnRequest()),
        "syntax error": lambda: spawn(stub, lua="return = 1"),
        "path escapes the root": lambda: spawn(stub, path="../pyproject.toml.lua"),
        "absolute path": lambda: spawn(stub, path="/etc/passwd.lua"),
        "not a program": lambda: spawn(stub, path="lua/echo.txt"),
        "monitor without parent": lambda: spawn(stub, lua="return 1", monitor=True),
        "empty name": lambda: stub.Register(pb.RegisterRequest(pid=port, name="")),
        "unprintable name": lambda: stub.OpenPort(pb.OpenPortRequest(name="bad\nname")),
        "no receiver": lambda: stub.Send(pb.SendRequest(**{"from": port})),
        "pid 0": lambda: stub.Wait(pb.WaitRequest(pid=0)),
        "negative timeout": lambda: stub.Recv(pb.RecvRequest(pid=port, timeout_ms=-1)),
    }
    for what, call in calls.items():
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {code} {details}"
        assert details, what
    code, details = status_of(lambda: spawn(stub, lua="return = 1"))
    assert "syntax" in details.lower()
    assert_serving(stub)

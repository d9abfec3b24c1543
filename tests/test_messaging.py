"""Messages between Lua processes, which the kernel's C side (lua/fast_paths.c,
kernel/mailbox.c) sends, receives and hands the CPU over for without entering
Python, and the cases it leaves to the Python side. Over real gRPC against a
real llmosd."""
from __future__ import annotations

from typing import Any

import grpc

from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value

WAIT_MS = 20_000


def run(stub: Any, lua: str, args: Any = None) -> pb.ProcessInfo:
    pid = stub.Spawn(pb.SpawnRequest(lua=lua, args=to_value(args))).pid
    resp = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=WAIT_MS))
    assert not resp.timed_out
    return resp.process


def result(info: pb.ProcessInfo) -> Any:
    assert info.state == pb.EXITED, (info.exit_reason, info.error)
    return from_value(info.result)


def test_a_ring_of_processes_passes_a_token_and_counts_every_message(stub: Any) -> None:
    # Three processes in a ring: each receive blocks its process and hands the
    # CPU to the next, woken by the send before it.
    got = result(run(stub, """
        local rounds = args.rounds
        local member = [[
            local nxt = sys.recv{tag = 'next'}.body
            for i = 1, args do
                local m = sys.recv{tag = 'token'}
                sys.send(nxt, m.body + 1, {tag = 'token'})
            end
        ]]
        local a = sys.spawn{lua = member, args = rounds}
        local b = sys.spawn{lua = member, args = rounds}
        sys.send(a, b, {tag = 'next'})
        sys.send(b, sys.self(), {tag = 'next'})
        local token = 0
        for i = 1, rounds do
            sys.send(a, token, {tag = 'token'})
            token = sys.recv{tag = 'token', from = b}.body
        end
        return {token = token, a = sys.info(a).usage, b = sys.info(b).usage}
    """, {"rounds": 2000}))
    assert got["token"] == 2 * 2000  # a and b each add one
    for member in ("a", "b"):
        assert got[member]["messages_received"] == 2000 + 1  # the tokens, and who is next
        assert got[member]["messages_sent"] == 2000


def test_selective_receive_between_lua_processes(stub: Any) -> None:
    got = result(run(stub, """
        local me = sys.self()
        local sender = [[
            local to, name = args.to, args.name
            for i = 1, 3 do
                sys.send(to, name .. i, {tag = (i == 2) and 'even' or 'odd', correlation_id = name .. '-' .. i})
            end
            sys.send(to, 'done', {tag = 'done'})
        ]]
        local x = sys.spawn{lua = sender, args = {to = me, name = 'x'}}
        sys.recv{tag = 'done', from = x}
        local y = sys.spawn{lua = sender, args = {to = me, name = 'y'}}
        sys.recv{tag = 'done', from = y}
        local out = {}
        out[#out + 1] = sys.recv{from = y, tag = 'odd'}.body           -- y1, past x's three
        out[#out + 1] = sys.recv{correlation_id = 'x-3'}.body           -- x3
        out[#out + 1] = sys.recv{tag = 'even'}.body                      -- x2, the oldest even
        local m = sys.recv{correlation_id = 'y-2'}
        out[#out + 1] = m.body .. ' ' .. m.tag .. ' ' .. m.correlation_id
        for i = 1, 2 do out[#out + 1] = sys.recv{}.body end              -- the rest, in order
        out[#out + 1] = tostring(sys.recv{timeout_ms = 0})
        return out
    """))
    assert got == ["y1", "x3", "x2", "y2 even y-2", "x1", "y3", "nil"]


def test_filters_the_core_leaves_to_python_are_checked_as_before(stub: Any) -> None:
    got = result(run(stub, """
        local out = {}
        for _, opts in ipairs{{from = 'me'}, {tag = 5}, {correlation_id = {}}, {from = 2.5}} do
            local ok, err = pcall(sys.recv, opts)
            out[#out + 1] = err
        end
        -- A pid given as a float that is an integer is a pid.
        local echo = sys.spawn{lua = "local m = sys.recv{} sys.send(m.from, m.body)"}
        sys.send(echo + 0.0, 'as float')
        out[#out + 1] = sys.recv{from = echo}.body
        return out
    """))
    assert "from must be an integer" in got[0]
    assert "tag must be a string" in got[1]
    assert "correlation_id must be a string" in got[2]
    assert "from must be an integer" in got[3]
    assert got[4] == "as float"


def test_bad_bodies_are_refused_with_the_reason(stub: Any) -> None:
    got = result(run(stub, """
        local peer = sys.spawn{lua = "sys.recv{tag = 'never'}"}
        local out = {}
        for _, body in ipairs{function() end, {1, {f = print}}, 0/0, '\\xff'} do
            local ok, err = pcall(sys.send, peer, body)
            out[#out + 1] = err
        end
        sys.kill(peer)
        return out
    """))
    assert "function cannot be sent" in got[0]
    assert "function cannot be sent" in got[1]
    assert "NaN" in got[2]
    assert "UTF-8" in got[3]


def test_a_process_blocked_in_a_core_receive_can_be_killed_and_inspected(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    pid = stub.Spawn(pb.SpawnRequest(lua="""
        local peer = sys.spawn{lua = "local m = sys.recv{} sys.send(m.from, 'pong')"}
        sys.send(peer, 'ping')
        sys.recv{}                     -- the pong
        sys.send(args.port, 'ready')
        sys.recv{tag = 'never'}
    """, args=to_value({"port": port}), name="blocked-in-core")).pid
    assert from_value(stub.Recv(pb.RecvRequest(pid=port, timeout_ms=WAIT_MS)).message.body) == "ready"
    for _ in range(200):
        info = stub.GetProcess(pb.GetProcessRequest(pid=pid))
        if info.state == pb.BLOCKED:
            break
    assert info.state == pb.BLOCKED and info.blocked_on == "recv"
    assert info.usage.messages_sent == 2 and info.usage.messages_received == 1
    # A message it does not match stays in its mailbox, and does not wake it.
    stub.Send(pb.SendRequest(**{"from": port}, to=pid, body=to_value("not for you"), tag="other"))
    assert stub.GetProcess(pb.GetProcessRequest(pid=pid)).usage.mailbox_len == 1
    stub.Kill(pb.KillRequest(pid=pid, reason="test"))
    final = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=WAIT_MS)).process
    assert final.state == pb.KILLED and final.exit_reason == "test"
    assert not stub.ListProcesses(pb.ListProcessesRequest(name="blocked-in-core")).processes
    try:
        stub.Send(pb.SendRequest(**{"from": port}, to=pid, body=to_value("late")))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        raise AssertionError("sending to an ended process succeeded")


def test_lua_sends_to_ports_are_stored_and_to_names_resolved(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest(name="messaging-port")).pid
    got = result(run(stub, """
        local id1 = sys.send(args.port, {n = 1}, {tag = 't', data = 'raw\\0bytes'})
        local id2 = sys.send('messaging-port', {n = 2})
        return {id1, id2}
    """, {"port": port}))
    assert got[0] < got[1]
    first = stub.Recv(pb.RecvRequest(pid=port, timeout_ms=WAIT_MS)).message
    assert from_value(first.body) == {"n": 1} and first.tag == "t" and first.data == b"raw\0bytes"
    assert first.id == got[0]
    assert from_value(stub.Recv(pb.RecvRequest(pid=port, timeout_ms=WAIT_MS)).message.body) == {"n": 2}


def test_a_process_alternating_sends_to_a_port_and_a_process_delivers_each_in_order(stub: Any) -> None:
    # After a first send to a port, the C side hands the sender's next sends there straight to the
    # Python side (a port's messages are stored): sends to processes stay on the C side, and what
    # the Python side refuses is refused as before.
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    got = result(run(stub, """
        local child = sys.spawn{lua = [[
            local seen = {}
            for i = 1, 3 do seen[i] = sys.recv{}.body end
            sys.send(args, seen, {tag = 'seen'})
        ]], args = args.port}
        local ids = {}
        for i = 1, 3 do
            ids[#ids + 1] = sys.send(args.port, {to = 'port', i = i})
            sys.send(child, i)
        end
        local ok, err = pcall(sys.send, args.port, {f = print})
        return {ids = ids, refused = not ok and err:find('function') ~= nil}
    """, {"port": port}))
    assert got["refused"]
    bodies = [stub.Recv(pb.RecvRequest(pid=port, timeout_ms=WAIT_MS)).message for _ in range(4)]
    assert [m.id for m in bodies[:3]] == got["ids"]
    assert [from_value(m.body) for m in bodies[:3]] == [{"to": "port", "i": i} for i in (1, 2, 3)]
    assert bodies[3].tag == "seen" and from_value(bodies[3].body) == [1, 2, 3]

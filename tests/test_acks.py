"""Acknowledged, at-least-once delivery (Recv with ack, Ack, Nack; sys.recv{ack=true}, sys.ack, sys.nack)
against a real llmosd over real gRPC, from external clients, Lua and Python agents."""
from __future__ import annotations

import signal
import textwrap
import time
from typing import Any

import grpc
import pytest

import llmos
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer
from statuses import code_of

WAIT_MS = 60_000  # generous bound for anything here to happen


@pytest.fixture
def k(llmosd: LlmosdServer) -> Any:
    with llmos.Client(llmosd.target) as client:
        yield client


def send(stub: Any, to: int, body: Any, sender: int = 0) -> int:
    req = pb.SendRequest(to=to, **{"from": sender})
    req.body.CopyFrom(to_value(body))
    return stub.Send(req).message_id


def recv(stub: Any, pid: int, timeout_ms: int = WAIT_MS, **fields: Any) -> pb.Message:
    reply = stub.Recv(pb.RecvRequest(pid=pid, timeout_ms=timeout_ms, **fields), timeout=WAIT_MS / 1000 + 5)
    assert not reply.timed_out, f"nothing for {pid}"
    return reply.message


def bodies_left(stub: Any, port: int) -> list[Any]:
    out = []
    while not (reply := stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0))).timed_out:
        out.append(from_value(reply.message.body))
    return out


def test_a_leased_message_is_hidden_until_acked_and_nack_puts_it_back_in_its_place(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    ids = [send(stub, port, i) for i in range(4)]
    first = recv(stub, port, ack=True)
    assert (first.id, first.attempt, first.redelivered) == (ids[0], 1, False)
    second = recv(stub, port, ack=True)
    assert second.id == ids[1]
    plain = recv(stub, port)  # hidden: the leased ones are not seen
    assert (plain.id, plain.attempt, plain.redelivered) == (ids[2], 0, False)
    stub.Nack(pb.AckRequest(pid=port, message_id=ids[1]))
    stub.Nack(pb.AckRequest(pid=port, message_id=ids[0]))
    again = recv(stub, port, ack=True)
    assert (again.id, again.attempt, again.redelivered, from_value(again.body)) == (ids[0], 2, True, 0)
    stub.Ack(pb.AckRequest(pid=port, message_id=ids[0]))
    assert code_of(stub.Ack, pb.AckRequest(pid=port, message_id=ids[0])) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Nack, pb.AckRequest(pid=port, message_id=ids[0])) == grpc.StatusCode.FAILED_PRECONDITION
    assert bodies_left(stub, port) == [1, 3]  # the nacked one back in its place, before the later one


def test_an_expired_lease_is_delivered_again_to_a_waiting_receiver(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    mid = send(stub, port, "job")
    assert recv(stub, port, ack=True, lease_ms=1).id == mid
    # This receive finds nothing (the message is leased) and waits; the lease runs out and hands it over.
    again = recv(stub, port, ack=True, lease_ms=WAIT_MS)
    assert (again.id, again.attempt, again.redelivered) == (mid, 2, True)
    stub.Ack(pb.AckRequest(pid=port, message_id=mid))
    assert bodies_left(stub, port) == []


def test_a_waiting_receiver_with_ack_leases_what_arrives(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    waiting = stub.Recv.future(pb.RecvRequest(pid=port, ack=True, timeout_ms=WAIT_MS), timeout=WAIT_MS / 1000)
    time.sleep(0.2)  # usually registered by now, and handed the message straight over; else it takes it
    mid = send(stub, port, "x")
    got = waiting.result().message
    assert (got.id, got.attempt) == (mid, 1)
    stub.Nack(pb.AckRequest(pid=port, message_id=mid))
    assert recv(stub, port, ack=True).attempt == 2


def test_leases_are_bounded_by_the_mailbox_limit_and_bad_calls_are_refused(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest(mailbox=2)).pid
    for i in range(2):
        send(stub, port, i)
    leased = [recv(stub, port, ack=True).id for _ in range(2)]
    send(stub, port, 2)
    assert code_of(stub.Recv, pb.RecvRequest(pid=port, ack=True, timeout_ms=0)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.Ack(pb.AckRequest(pid=port, message_id=leased[0]))
    assert from_value(recv(stub, port, ack=True).body) == 2
    inv = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Recv, pb.RecvRequest(pid=port, lease_ms=10)) == inv  # lease without ack
    assert code_of(stub.Recv, pb.RecvRequest(pid=port, ack=True, lease_ms=-1)) == inv
    assert code_of(stub.Ack, pb.AckRequest(pid=port, message_id=0)) == inv
    assert code_of(stub.Ack, pb.AckRequest(pid=port, message_id=1 << 60)) == inv
    assert code_of(stub.Ack, pb.AckRequest(pid=0, message_id=5)) == inv
    assert code_of(stub.Nack, pb.AckRequest(pid=1 << 40, message_id=5)) == grpc.StatusCode.NOT_FOUND
    other = stub.OpenPort(pb.OpenPortRequest()).pid  # a lease is its receiver's alone
    assert code_of(stub.Ack, pb.AckRequest(pid=other, message_id=leased[1])) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "kill-9"])
def test_a_leased_port_message_survives_a_restart_and_an_acked_one_does_not(fresh_llmosd: LlmosdServer,
                                                                              how: int) -> None:
    with fresh_llmosd.channel() as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        port = stub.OpenPort(pb.OpenPortRequest()).pid
        waiting = stub.Recv.future(pb.RecvRequest(pid=port, ack=True, timeout_ms=WAIT_MS), timeout=WAIT_MS / 1000)
        time.sleep(0.2)  # usually registered by now: then the message is handed straight over (and stored)
        ids = [send(stub, port, i) for i in range(3)]
        assert waiting.result().message.id == ids[0]
        assert recv(stub, port, ack=True).id == ids[1]
        stub.Ack(pb.AckRequest(pid=port, message_id=ids[1]))
    fresh_llmosd.stop(how)
    fresh_llmosd.start()
    with fresh_llmosd.channel() as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        assert bodies_left(stub, port) == [0, 2]


# -- Lua ---------------------------------------------------------------------------------------------
LUA_ACKS = textwrap.dedent("""
    local me = sys.self()
    for i = 1, 3 do sys.send(me, i) end
    local a = sys.recv{ack = true}
    local b = sys.recv{ack = true, lease_ms = 60000}
    sys.nack(a)
    local a2 = sys.recv{ack = true, timeout_ms = 0}
    sys.ack(a2)
    sys.ack(b.id)
    local three = sys.recv{timeout_ms = 0}
    local none = sys.recv{ack = true, timeout_ms = 0}
    local refused = {}
    refused.lease = select(2, pcall(sys.recv, {lease_ms = 5, timeout_ms = 0}))
    refused.flag = select(2, pcall(sys.recv, {ack = 1, timeout_ms = 0}))
    refused.unknown = select(2, pcall(sys.recv, {ack = true, leese_ms = 5}))
    refused.again = select(2, pcall(sys.ack, a2))
    refused.zero = select(2, pcall(sys.nack, 0))
    -- a receive with ack that waits: the parent sends once it blocks
    sys.send(args.port, me)
    local waited = sys.recv{ack = true, timeout_ms = 60000}
    sys.ack(waited)
    return {a = {a.body, a.attempt, a.redelivered}, b = {b.body, b.attempt}, a2 = {a2.body, a2.attempt, a2.redelivered},
            three = three.body, none = none == nil, refused = refused, waited = {waited.body, waited.attempt}}
""")


def test_lua_receives_with_ack(stub: Any, k: llmos.Client) -> None:
    port = k.open_port()
    req = pb.SpawnRequest(lua=LUA_ACKS)
    req.args.CopyFrom(to_value({"port": port}))
    pid = stub.Spawn(req).pid
    assert k.recv(port, timeout=WAIT_MS / 1000).body == pid
    for _ in range(3000):
        if k.get(pid).blocked_on == "recv":
            break
        time.sleep(0.01)
    k.send(pid, "late", sender=port)
    info = k.wait(pid, timeout=WAIT_MS / 1000)
    assert info.state == "EXITED", info.error
    out = info.result
    assert out["a"] == [1, 1, False] and out["b"] == [2, 1] and out["a2"] == [1, 2, True]
    assert out["three"] == 3 and out["none"] is True and out["waited"] == ["late", 1]
    assert "lease_ms is for a receive with ack" in out["refused"]["lease"]
    assert "ack must be a boolean" in out["refused"]["flag"]
    assert "unknown option(s) leese_ms" in out["refused"]["unknown"]
    assert "holds no lease" in out["refused"]["again"]
    assert "message_id is required" in out["refused"]["zero"]


def test_python_agent_receives_with_ack(k: llmos.Client) -> None:
    pid = k.spawn(python=textwrap.dedent("""
        from llmos.userland import sys
        me = sys.self()
        sys.send(me, "job")
        first = sys.recv(ack=True, lease_ms=60000)
        sys.nack(first)
        second = sys.recv(ack=True, timeout_ms=0)
        sys.ack(second.id)
        try:
            sys.ack(second)
        except Exception as e:
            again = type(e).__name__
        try:
            sys.recv(lease_ms=5, timeout_ms=0)
        except Exception as e:
            lease = type(e).__name__
        sys.exit({"first": [first.body, first.attempt, first.redelivered],
                  "second": [second.body, second.attempt, second.redelivered], "again": again, "lease": lease,
                  "left": sys.recv(timeout_ms=0)})
    """))
    info = k.wait(pid, timeout=WAIT_MS / 1000)
    assert info.state == "EXITED", info.error
    assert info.result == {"first": ["job", 1, False], "second": ["job", 2, True], "again": "FailedPrecondition",
                           "lease": "InvalidArgument", "left": None}


# -- dead letters ------------------------------------------------------------------------------------
def dead_letters(k: llmos.Client, port: int, n: int) -> list[Any]:
    out = [k.recv(port, tag="DEAD_LETTER", timeout=WAIT_MS / 1000) for _ in range(n)]
    assert all(m is not None for m in out)
    assert k.recv(port, tag="DEAD_LETTER", timeout=0) is None
    return out


def test_what_a_receiver_leaves_goes_to_its_dead_letter_target_in_order(stub: Any, k: llmos.Client) -> None:
    dlq, sender = k.open_port(), k.open_port()
    pid = k.spawn(lua="""
        local leased = sys.recv{ack = true, tag = "b"}
        sys.send(args, leased.id)
        sys.recv{tag = "never"}
    """, args=dlq, dead_letter=dlq)
    ids = [k.send(pid, "a", sender=sender, data=b"\x00\xff", correlation_id="c1")]
    ids.append(k.send(pid, "b", sender=sender, tag="b"))
    ids.append(k.send(pid, "c", sender=sender))
    assert k.recv(dlq, timeout=WAIT_MS / 1000).body == ids[1]  # "b" is leased now
    k.kill(pid)
    letters = dead_letters(k, dlq, 3)
    assert [m.body["message"]["id"] for m in letters] == ids  # original order, the leased one in its place
    first = letters[0]
    assert (first.sender, first.data, first.correlation_id) == (pid, b"\x00\xff", "c1")
    assert first.body == {"reason": "receiver_ended", "receiver": pid, "attempts": 0, "message": {
        "id": ids[0], "from": sender, "to": pid, "tag": "", "body": "a", "sent_at_ms": first.body["message"]["sent_at_ms"]}}
    assert [m.body["attempts"] for m in letters] == [0, 1, 0]


def test_a_message_past_max_attempts_goes_to_the_target(stub: Any, k: llmos.Client) -> None:
    dlq = k.open_port()
    port = k.open_port(dead_letter=dlq, max_attempts=2)
    mid = k.send(port, "poison", sender=port)
    for attempt in (1, 2):
        got = k.recv(port, ack=True, timeout=WAIT_MS / 1000)
        assert (got.id, got.attempt) == (mid, attempt)
        k.nack(port, mid)
    letter, = dead_letters(k, dlq, 1)
    assert letter.body["reason"] == "max_attempts" and letter.body["attempts"] == 2
    assert letter.body["message"]["body"] == "poison"
    assert k.recv(port, timeout=0) is None
    k.kill(port)  # nothing left: no more dead letters
    assert k.recv(dlq, timeout=0) is None


def test_dead_letter_options_are_checked(stub: Any, k: llmos.Client) -> None:
    inv = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.OpenPort, pb.OpenPortRequest(dead_letter=1 << 40)) == grpc.StatusCode.NOT_FOUND
    ended = k.open_port()
    k.kill(ended)
    assert code_of(stub.Spawn, pb.SpawnRequest(lua="return 1", dead_letter=ended)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Spawn, pb.SpawnRequest(lua="return 1", dead_letter=k.open_port(),
                                               max_attempts=2_000_000)) == inv
    out = k.wait(k.spawn(lua="""
        local r = {}
        r.neg = select(2, pcall(sys.spawn, {lua = "return 1", dead_letter = args, max_attempts = -1}))
        r.kind = select(2, pcall(sys.spawn, {lua = "return 1", dead_letter = "x"}))
        return r
    """, args=k.open_port()), timeout=WAIT_MS / 1000).result
    assert "max_attempts must be between 0" in out["neg"]
    assert "dead_letter must be an integer" in out["kind"]


def test_a_python_agent_spawns_with_a_dead_letter_target(k: llmos.Client) -> None:
    dlq = k.open_port()
    agent = k.spawn(python=textwrap.dedent("""
        from llmos.userland import sys
        child = sys.spawn(lua="sys.recv{tag = 'never'}", dead_letter=sys.args)
        sys.send(child, "left behind")
        sys.kill(child)
        sys.exit(child)
    """), args=dlq)
    child = k.wait(agent, timeout=WAIT_MS / 1000).result
    letter, = dead_letters(k, dlq, 1)
    assert letter.sender == child and letter.body["message"]["body"] == "left behind"


def test_a_lua_send_to_a_lua_receiver_blocked_with_ack_is_leased(k: llmos.Client) -> None:
    out = k.wait(k.spawn(lua="""
        local child = sys.spawn{lua = [[
            local m = sys.recv{ack = true, lease_ms = 60000}
            sys.nack(m)
            local again = sys.recv{ack = true, timeout_ms = 0}
            sys.ack(again)
            return {m.body, m.attempt, again.attempt, again.redelivered}
        ]]}
        for _ = 1, 5000 do
            local info = sys.info(child)
            if info.state == "BLOCKED" then break end  -- in its receive: the send hands over
            sys.sleep(1)
        end
        sys.send(child, "from lua")
        return sys.wait(child).result
    """), timeout=WAIT_MS / 1000)
    assert out.state == "EXITED", out.error
    assert out.result == ["from lua", 1, 2, True]


def test_a_cancelled_receive_with_ack_gives_the_message_back(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    waiting = stub.Recv.future(pb.RecvRequest(pid=port, ack=True, timeout_ms=WAIT_MS))
    time.sleep(0.2)
    waiting.cancel()
    mid = send(stub, port, "kept")
    got = recv(stub, port, ack=True)
    assert (got.id, got.attempt) == (mid, 1)  # not lost, and not counted as handed out to the cancelled call

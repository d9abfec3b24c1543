"""Batches: SendBatch, Recv with max_messages (with and without ack), Ack and Nack with message_ids,
against a real llmosd over real gRPC, its HTTP gateway and the SDK (llmos.Client and llmos.aio)."""
from __future__ import annotations

import asyncio
import signal
import time
from typing import Any, Iterator

import httpx
import pytest

import llmos
from llmos import aio
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer
from statuses import status_of


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """The name of the status `call` is refused with."""
    return status_of(call, *args, **kwargs)[0].name

WAIT_MS = 60_000  # generous bound for anything here to happen
MAX_BATCH = 1000
MAX_MESSAGE_BYTES = 1 << 20  # the module's server: small, so that a batch reply's byte bound is quick to reach


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    srv = LlmosdServer(tmp_path_factory.mktemp("batch") / "data", "--model", "none", "--cpus", "2",
                       "--http", "127.0.0.1:0", "--max-message-bytes", str(MAX_MESSAGE_BYTES))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def stub(server: LlmosdServer) -> Iterator[Any]:
    with server.channel() as channel:
        yield kernel_pb2_grpc.KernelStub(channel)


@pytest.fixture
def http(server: LlmosdServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=30) as client:
        yield client


def batch(to: int, *bodies: Any, **fields: Any) -> pb.SendBatchRequest:
    req = pb.SendBatchRequest(to=to, **fields)
    for body in bodies:
        req.messages.add().body.CopyFrom(to_value(body))
    return req


def bodies(messages: Any) -> list[Any]:
    return [from_value(m.body) for m in messages]


def left(stub: Any, port: int) -> list[Any]:
    """The bodies waiting in `port`'s mailbox, taken."""
    reply = stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0, max_messages=MAX_BATCH))
    return bodies(reply.messages)


def port_of(stub: Any, mailbox: int = 0) -> int:
    return stub.OpenPort(pb.OpenPortRequest(mailbox=mailbox)).pid


# -- SendBatch ------------------------------------------------------------------------------------------
def test_a_batch_is_delivered_in_order_with_its_options(stub: Any) -> None:
    port, sender = port_of(stub), port_of(stub)
    req = batch(port, 1, {"two": 2}, **{"from": sender})
    req.messages.add(tag="t", data=b"\x00\xff", correlation_id="c")  # no body: null
    ids = list(stub.SendBatch(req).message_ids)
    assert len(ids) == 3 and ids == sorted(ids)
    reply = stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0, max_messages=10))
    assert not reply.HasField("message") and not reply.timed_out
    assert [m.id for m in reply.messages] == ids
    assert bodies(reply.messages) == [1, {"two": 2}, None]
    last = reply.messages[2]
    assert (last.tag, last.data, last.correlation_id, getattr(last, "from")) == ("t", b"\x00\xff", "c", sender)
    assert [m.attempt for m in reply.messages] == [0, 0, 0]  # received without ack


def test_a_batch_that_does_not_fit_is_refused_whole(stub: Any) -> None:
    port = port_of(stub, mailbox=3)
    stub.Send(pb.SendRequest(to=port, body=to_value("first")))
    code, details = status_of(stub.SendBatch, batch(port, 1, 2, 3))  # 1 + 3 > 3 waiting
    assert (code.name, "nothing was sent" in details) == ("RESOURCE_EXHAUSTED", True)
    too_big = batch(port, 1)
    too_big.messages.add(data=b"x" * (MAX_MESSAGE_BYTES + 1))
    assert refused(stub.SendBatch, too_big) == "RESOURCE_EXHAUSTED"
    assert left(stub, port) == ["first"]  # nothing of either batch was stored or delivered


def test_a_batch_over_the_mailbox_s_bytes_is_refused_whole(stub: Any) -> None:
    pid = stub.Spawn(pb.SpawnRequest(lua="sys.recv{tag = 'never'}", limits=pb.Limits(mailbox_bytes=1000))).pid
    req = batch(pid)
    for _ in range(3):
        req.messages.add(data=b"x" * 400)  # each fits; the three do not
    code, details = status_of(stub.SendBatch, req)
    assert (code.name, "nothing was sent" in details) == ("RESOURCE_EXHAUSTED", True)
    assert stub.GetProcess(pb.GetProcessRequest(pid=pid)).usage.mailbox_len == 0
    stub.Kill(pb.KillRequest(pid=pid))


def test_hostile_batches_are_refused_and_nothing_is_sent(stub: Any) -> None:
    port = port_of(stub)
    hostile = {
        "empty": pb.SendBatchRequest(to=port),
        "too many": batch(port, *range(MAX_BATCH + 1)),
        "no receiver": batch(0, 1),
        "a key too long": pb.SendBatchRequest(to=port, messages=[pb.BatchMessage(), pb.BatchMessage(
            idempotency_key="k" * 1025)]),
        "a non-finite number": pb.SendBatchRequest(to=port, messages=[pb.BatchMessage(
            body=to_value(1)), pb.BatchMessage(body={"number_value": float("nan")})]),
    }
    for what, req in hostile.items():
        assert refused(stub.SendBatch, req) == "INVALID_ARGUMENT", what
    assert refused(stub.SendBatch, batch(1 << 60, 1)) == "NOT_FOUND"
    assert refused(stub.SendBatch, pb.SendBatchRequest(to_name="nobody-has-this-name", messages=[pb.BatchMessage()])) == "NOT_FOUND"
    assert left(stub, port) == []
    assert len(stub.SendBatch(batch(port, *range(MAX_BATCH))).message_ids) == MAX_BATCH  # the most is fine
    assert left(stub, port) == list(range(MAX_BATCH))


def test_idempotency_keys_in_a_batch_are_per_message(stub: Any) -> None:
    port, sender = port_of(stub), port_of(stub)
    req = pb.SendBatchRequest(to=port, messages=[
        pb.BatchMessage(body=to_value("a"), idempotency_key="ka"),
        pb.BatchMessage(body=to_value("b")),
        pb.BatchMessage(body=to_value("a again"), idempotency_key="ka"),  # earlier in the same batch
    ], **{"from": sender})
    first = list(stub.SendBatch(req).message_ids)
    assert first[2] == first[0] and first[1] != first[0]
    again = list(stub.SendBatch(req).message_ids)  # a retry: the keyed one is not stored again
    assert again[0] == first[0] and again[2] == first[0] and again[1] not in first
    assert left(stub, port) == ["a", "b", "b"]


def test_a_batch_to_a_port_is_stored_before_the_call_answers(fresh_llmosd: LlmosdServer) -> None:
    with fresh_llmosd.channel() as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        port = port_of(stub)
        stub.SendBatch(batch(port, *range(50)))
        leased = stub.Recv(pb.RecvRequest(pid=port, ack=True, max_messages=20, timeout_ms=0)).messages
        reply = stub.Ack(pb.AckRequest(pid=port, message_ids=[m.id for m in leased[:10]]))
        assert reply.settled == 10
        taken = stub.Recv(pb.RecvRequest(pid=port, max_messages=5, timeout_ms=0)).messages  # without ack: gone
        assert bodies(taken) == list(range(20, 25))
    fresh_llmosd.stop(signal.SIGKILL)
    fresh_llmosd.start()
    with fresh_llmosd.channel() as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        # The acknowledged and the taken are gone; the leased but not acknowledged are back.
        assert left(stub, port) == list(range(10, 20)) + list(range(25, 50))


# -- Recv with max_messages ---------------------------------------------------------------------------------
def test_a_batch_receive_takes_what_waits_up_to_its_size_and_leaves_the_rest(stub: Any) -> None:
    port = port_of(stub)
    stub.SendBatch(batch(port, *range(7)))
    first = stub.Recv(pb.RecvRequest(pid=port, max_messages=3, timeout_ms=0, ack=True))
    assert bodies(first.messages) == [0, 1, 2]
    assert [(m.attempt, m.redelivered) for m in first.messages] == [(1, False)] * 3
    rest = stub.Recv(pb.RecvRequest(pid=port, max_messages=100, timeout_ms=0))
    assert bodies(rest.messages) == [3, 4, 5, 6]
    empty = stub.Recv(pb.RecvRequest(pid=port, max_messages=100, timeout_ms=0))
    assert empty.timed_out and not empty.messages


def test_a_batch_receive_filters_as_recv_does(stub: Any) -> None:
    port = port_of(stub)
    req = pb.SendBatchRequest(to=port, messages=[pb.BatchMessage(tag="a" if i % 2 else "b", body=to_value(i))
                                                 for i in range(6)])
    stub.SendBatch(req)
    odd = stub.Recv(pb.RecvRequest(pid=port, tag="a", max_messages=10, timeout_ms=0, ack=True))
    assert bodies(odd.messages) == [1, 3, 5]
    assert left(stub, port) == [0, 2, 4]


def test_a_waiting_batch_receive_gets_the_first_and_what_came_with_it(stub: Any) -> None:
    port = port_of(stub)
    for ack in (False, True):
        waiting = stub.Recv.future(pb.RecvRequest(pid=port, max_messages=10, timeout_ms=WAIT_MS, ack=ack),
                                   timeout=WAIT_MS / 1000 + 5)
        time.sleep(0.2)  # usually waiting by now, and handed the first; else it finds all four waiting
        stub.SendBatch(batch(port, *range(4)))
        got = [waiting.result()]
        assert bodies(got[0].messages) == [0, 1, 2, 3]
        assert [m.attempt for m in got[0].messages] == ([1] * 4 if ack else [0] * 4)
        if ack:
            stub.Ack(pb.AckRequest(pid=port, message_ids=[m.id for m in got[0].messages]))
    assert left(stub, port) == []


def test_a_batch_reply_stops_at_the_message_size_limit(stub: Any) -> None:
    port = port_of(stub)
    piece = MAX_MESSAGE_BYTES // 3
    for i in range(5):
        stub.Send(pb.SendRequest(to=port, data=bytes([i]) * piece))
    sizes = []
    while not (reply := stub.Recv(pb.RecvRequest(pid=port, max_messages=10, timeout_ms=0))).timed_out:
        assert reply.ByteSize() <= MAX_MESSAGE_BYTES
        sizes.append([m.data[0] for m in reply.messages])
    assert sizes == [[0, 1], [2, 3], [4]]  # each reply as many as fit, every message once, in order
    big = port_of(stub)
    stub.Send(pb.SendRequest(to=big, data=b"y" * (MAX_MESSAGE_BYTES - 100)))  # alone larger than any batch
    assert len(stub.Recv(pb.RecvRequest(pid=big, max_messages=10, timeout_ms=0)).messages) == 1


def test_batch_receive_hostile_values(server: LlmosdServer, stub: Any, http: httpx.Client) -> None:
    port = port_of(stub)
    stub.SendBatch(batch(port, 1))
    for most in (MAX_BATCH + 1, 1 << 31, (1 << 32) - 1):
        assert refused(stub.Recv, pb.RecvRequest(pid=port, max_messages=most, timeout_ms=0)) == "INVALID_ARGUMENT", most
    for value in (-1, "many", 1.5, 1 << 40):
        r = http.post("/v1/kernel/Recv", json={"pid": port, "maxMessages": value, "timeoutMs": 0})
        assert (r.status_code, r.json()["error"]["status"]) == (400, "INVALID_ARGUMENT"), value
    assert refused(stub.Recv, pb.RecvRequest(pid=port, max_messages=5, timeout_ms=0, lease_ms=10)) == "INVALID_ARGUMENT"  # a lease without ack, as a single receive
    assert left(stub, port) == [1]  # refused calls took nothing
    # max_messages 0 is a plain receive: one message, in `message`
    stub.SendBatch(batch(port, 1, 2))
    one = stub.Recv(pb.RecvRequest(pid=port, timeout_ms=0))
    assert from_value(one.message.body) == 1 and not one.messages


def test_leases_of_a_batch_are_bounded_by_the_mailbox_limit(stub: Any) -> None:
    port = port_of(stub, mailbox=3)
    stub.SendBatch(batch(port, 1, 2))
    two = stub.Recv(pb.RecvRequest(pid=port, max_messages=10, ack=True, timeout_ms=0)).messages
    stub.SendBatch(batch(port, 3, 4, 5))
    one = stub.Recv(pb.RecvRequest(pid=port, max_messages=10, ack=True, timeout_ms=0)).messages
    assert bodies(one) == [3]  # room for one more lease
    assert refused(stub.Recv, pb.RecvRequest(pid=port, max_messages=10, ack=True, timeout_ms=0)) == "RESOURCE_EXHAUSTED"
    stub.Ack(pb.AckRequest(pid=port, message_ids=[m.id for m in list(two) + list(one)]))
    assert bodies(stub.Recv(pb.RecvRequest(pid=port, max_messages=10, ack=True, timeout_ms=0)).messages) == [4, 5]


def test_a_waiting_batch_receive_whose_first_lease_is_the_last_allowed_answers_it(stub: Any) -> None:
    port = port_of(stub, mailbox=2)
    stub.Send(pb.SendRequest(to=port, body=to_value("held")))
    held = stub.Recv(pb.RecvRequest(pid=port, ack=True, timeout_ms=0)).message
    waiting = stub.Recv.future(pb.RecvRequest(pid=port, max_messages=10, timeout_ms=WAIT_MS, ack=True),
                               timeout=WAIT_MS / 1000 + 5)
    time.sleep(0.2)  # usually waiting by now; else it finds both waiting and leases the one it has room for
    stub.SendBatch(batch(port, 1, 2))
    assert bodies(waiting.result().messages) == [1]
    assert left(stub, port) == [2]
    stub.Ack(pb.AckRequest(pid=port, message_id=held.id))


def test_the_leases_of_a_batch_run_out_together_and_come_back_in_order(stub: Any) -> None:
    port = port_of(stub)
    stub.SendBatch(batch(port, *range(5)))
    leased = stub.Recv(pb.RecvRequest(pid=port, max_messages=5, ack=True, lease_ms=100, timeout_ms=0)).messages
    stub.Ack(pb.AckRequest(pid=port, message_ids=[leased[1].id, leased[3].id]))
    again = stub.Recv(pb.RecvRequest(pid=port, max_messages=5, ack=True, timeout_ms=WAIT_MS),
                      timeout=WAIT_MS / 1000 + 5).messages
    got = list(again)
    while len(got) < 3:  # the rest of what ran out, if the first came back alone to the waiting receive
        got += stub.Recv(pb.RecvRequest(pid=port, max_messages=5, ack=True, timeout_ms=WAIT_MS),
                         timeout=WAIT_MS / 1000 + 5).messages
    assert bodies(got) == [0, 2, 4]
    assert [(m.attempt, m.redelivered) for m in got] == [(2, True)] * 3
    reply = stub.Ack(pb.AckRequest(pid=port, message_ids=[m.id for m in got]))
    assert (reply.settled, list(reply.not_leased)) == (3, [])


# -- Ack and Nack with message_ids ----------------------------------------------------------------------------
def test_ack_many_settles_each_and_reports_those_not_leased(stub: Any) -> None:
    port = port_of(stub)
    stub.SendBatch(batch(port, *range(4)))
    leased = stub.Recv(pb.RecvRequest(pid=port, max_messages=4, ack=True, timeout_ms=0)).messages
    ids = [m.id for m in leased]
    unknown = ids[-1] + 10_000
    reply = stub.Ack(pb.AckRequest(pid=port, message_ids=[ids[0], unknown, ids[1], ids[0]]))
    assert reply.settled == 2 and list(reply.not_leased) == [unknown, ids[0]]  # named twice: the second is not
    reply = stub.Nack(pb.AckRequest(pid=port, message_ids=[ids[3], ids[2], ids[1]]))
    assert reply.settled == 2 and list(reply.not_leased) == [ids[1]]
    back = stub.Recv(pb.RecvRequest(pid=port, max_messages=10, ack=True, timeout_ms=0)).messages
    assert [m.id for m in back] == [ids[2], ids[3]]  # nacked: back in their places, in id order
    assert [(m.attempt, m.redelivered) for m in back] == [(2, True), (2, True)]
    # Another's lease is not this pid's to settle: reported, not settled.
    other = port_of(stub)
    reply = stub.Ack(pb.AckRequest(pid=other, message_ids=[ids[2]]))
    assert reply.settled == 0 and list(reply.not_leased) == [ids[2]]
    assert stub.Ack(pb.AckRequest(pid=port, message_ids=[ids[2], ids[3]])).settled == 2


def test_ack_many_hostile_values_settle_nothing(stub: Any, http: httpx.Client) -> None:
    port = port_of(stub)
    stub.SendBatch(batch(port, 1, 2))
    ids = [m.id for m in stub.Recv(pb.RecvRequest(pid=port, max_messages=2, ack=True, timeout_ms=0)).messages]
    hostile = {
        "a zero id": pb.AckRequest(pid=port, message_ids=[ids[0], 0]),
        "an id above 2^53": pb.AckRequest(pid=port, message_ids=[ids[0], (1 << 53) + 1]),
        "too many": pb.AckRequest(pid=port, message_ids=[ids[0]] * (MAX_BATCH + 1)),
        "both fields": pb.AckRequest(pid=port, message_id=ids[1], message_ids=[ids[0]]),
        "no pid": pb.AckRequest(message_ids=[ids[0]]),
    }
    for what, req in hostile.items():
        for method in (stub.Ack, stub.Nack):
            assert refused(method, req) == "INVALID_ARGUMENT", what
    r = http.post("/v1/kernel/Ack", json={"pid": port, "messageIds": [ids[0], -1]})
    assert (r.status_code, r.json()["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert refused(stub.Ack, pb.AckRequest(pid=1 << 60, message_ids=[ids[0]])) == "NOT_FOUND"
    assert stub.Ack(pb.AckRequest(pid=port, message_ids=ids)).settled == 2  # all still leased
    assert refused(stub.Ack, pb.AckRequest(pid=port, message_id=ids[0])) == "FAILED_PRECONDITION"  # the single-id form keeps its status


# -- the HTTP gateway and the SDK ------------------------------------------------------------------------------
def test_batches_over_the_http_gateway(http: httpx.Client) -> None:
    def ok(method: str, body: dict[str, Any]) -> dict[str, Any]:
        r = http.post(f"/v1/kernel/{method}", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    port = int(ok("OpenPort", {})["pid"])
    ids = ok("SendBatch", {"to": port, "messages": [{"body": "a"}, {"body": {"n": 2}, "tag": "t"}]})["messageIds"]
    assert len(ids) == 2
    got = ok("Recv", {"pid": port, "ack": True, "maxMessages": 5, "timeoutMs": 0})["messages"]
    assert [m["body"] for m in got] == ["a", {"n": 2}] and [m["id"] for m in got] == ids
    reply = ok("Ack", {"pid": port, "messageIds": ids + ["999999999"]})
    assert reply["settled"] == 2 and reply["notLeased"] == ["999999999"]
    r = http.post("/v1/kernel/SendBatch", json={"to": port, "messages": []})
    assert (r.status_code, r.json()["error"]["status"]) == (400, "INVALID_ARGUMENT")


def test_the_sdk_batches(server: LlmosdServer) -> None:
    with llmos.Client(server.target) as k:
        port = k.open_port()
        ids = k.send_batch(port, ["a", llmos.Outgoing({"b": 1}, tag="t", correlation_id="c"), None])
        got = k.recv_many(port, 10, ack=True, timeout=0)
        assert [m.id for m in got] == ids and [m.body for m in got] == ["a", {"b": 1}, None]
        assert (got[1].tag, got[1].correlation_id, got[1].attempt) == ("t", "c", 1)
        assert k.nack_many(port, got[2:]) == []
        assert k.ack_many(port, [got[0], got[1].id, 12345678]) == [12345678]
        again = k.recv_many(port, 10, timeout=0)
        assert [(m.body, m.attempt) for m in again] == [(None, 0)]
        assert k.recv_many(port, 10, timeout=0) == []
        for bad in (0, -1, MAX_BATCH + 1):
            with pytest.raises(llmos.InvalidArgument):
                k.recv_many(port, bad, timeout=0)
        with pytest.raises(llmos.InvalidArgument):
            k.send_batch(port, [float("nan")])
        with pytest.raises(llmos.InvalidArgument):
            k.ack_many(port, 5)  # type: ignore[arg-type]
        small = k.open_port(mailbox=2)
        with pytest.raises(llmos.ResourceExhausted):
            k.send_batch(small, [1, 2, 3])
        # The SDK's made-up keys make a batch safe to send again: this one is keyed by the caller.
        keyed = [llmos.Outgoing(i, idempotency_key=f"k{i}") for i in range(2)]
        assert k.send_batch(small, keyed) == k.send_batch(small, keyed)
        assert [m.body for m in k.recv_many(small, 10, timeout=0)] == [0, 1]

    async def asynchronous() -> None:
        async with aio.Client(server.target) as k:
            port = await k.open_port()
            ids = await k.send_batch(port, [1, 2])
            got = await k.recv_many(port, 5, ack=True, timeout=5)
            assert [m.id for m in got] == ids
            assert await k.ack_many(port, got) == []

    asyncio.run(asynchronous())



@pytest.mark.parametrize("durable", [False, True])
def test_a_python_agent_receives_and_acks_a_batch(server: LlmosdServer, durable: bool) -> None:
    """Over the agent socket (the SDK's batch methods on the agent's own client); a durable agent's batch
    receive is journaled with every message it took."""
    program = """
from llmos.userland import sys
me = sys.self()
for i in range(3):
    sys.send(me, i)
k = sys._k
leased = k.recv_many(me, 2, ack=True, timeout=5)
not_leased = k.ack_many(me, leased + [leased[0]])
rest = k.recv_many(me, 10, timeout=0)
sys.exit({"leased": [m.body for m in leased], "not_leased": len(not_leased), "rest": [m.body for m in rest],
          "none": k.recv_many(me, 10, timeout=0)})
"""
    with llmos.Client(server.target) as k:
        info = k.wait(k.spawn(python=program, durable=durable), timeout=WAIT_MS / 1000)
    assert info is not None and info.state == "EXITED", info and info.error
    assert info.result == {"leased": [0, 1], "not_leased": 1, "rest": [2], "none": []}


@pytest.mark.parametrize("durable", [False, True])
def test_a_batch_to_a_lua_process(server: LlmosdServer, durable: bool) -> None:
    """In memory, or a durable mailbox's copies queued as one unit and written before SendBatch answers."""
    program = "local got = {} ; for i = 1, 3 do got[i] = sys.recv{tag = 'b'}.body end ; return got"
    with llmos.Client(server.target) as k:
        pid = k.spawn(lua=program, durable=durable)
        k.send_batch(pid, [llmos.Outgoing(i, tag="b") for i in range(3)])
        info = k.wait(pid, timeout=WAIT_MS / 1000)
    assert info is not None and info.state == "EXITED", info and info.error
    assert info.result == [0, 1, 2]

"""Reliable delivery's rest (issue 15 §1): the namespace's dead-letter queue, UNDELIVERED notices and
idempotent sends, against a real llmosd over real gRPC, from external clients, Lua and Python agents.
The SDK's retries are tested through a TCP proxy that really drops the connection (and across a real
server restart)."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import textwrap
import threading
import time
from typing import Any, Callable

import grpc
import pytest

import llmos
from llmos import cli
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmosd_process import LlmosdServer
from statuses import code_of

WAIT_S = 60.0  # generous bound for anything here to happen


@pytest.fixture
def k(llmosd: LlmosdServer) -> Any:
    with llmos.Client(llmosd.target) as client:
        yield client


def until(what: Callable[[], Any], why: str) -> Any:
    """`what()` once it is true (bounded: WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not (value := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        time.sleep(0.01)
    return value


def ended(k: llmos.Client, pid: int) -> llmos.ProcessInfo:
    info = k.wait(pid, timeout=WAIT_S)
    assert info is not None and info.ended
    return info


# -- the dead-letter queue -----------------------------------------------------------------------------
def test_a_receiver_that_crashes_with_a_message_waiting_leaves_it_in_the_queue_with_its_history(
        k: llmos.Client) -> None:
    sender = k.open_port()
    pid = k.spawn(lua='sys.recv{tag = "go"}; error("boom")')
    mid = k.send(pid, {"job": 1}, sender=sender, tag="work", data=b"\x00\xff", correlation_id="c1")
    before = int(time.time() * 1000)
    k.send(pid, None, tag="go")
    assert ended(k, pid).state == "CRASHED"
    dead, = k.dead_letters(pid)
    assert (dead.reason, dead.attempts, dead.receiver, dead.namespace) == ("receiver_ended", 0, pid, "default")
    assert dead.detail == "its receiver has no dead_letter target"
    msg = dead.message
    assert (msg.id, msg.sender, msg.to, msg.tag, msg.body, msg.data, msg.correlation_id) == \
        (mid, sender, pid, "work", {"job": 1}, b"\x00\xff", "c1")
    assert msg.sent_at_ms <= before <= dead.dead_at_ms
    assert k.dead_letter(dead.id) == dead
    assert k.get(pid).usage["mailbox_len"] == 0  # not left behind in a dead mailbox

    # Retried to its (ended) receiver: refused; to another, as its sender, then out of the queue.
    assert code_of(k.retry_dead_letter, dead.id) == grpc.StatusCode.FAILED_PRECONDITION
    again = k.retry_dead_letter(dead.id, to=sender)
    got = k.recv(sender, timeout=WAIT_S)
    assert (got.id, got.sender, got.tag, got.body, got.data, got.correlation_id) == \
        (again, sender, "work", {"job": 1}, b"\x00\xff", "c1")
    assert again != mid and k.dead_letters(pid) == []
    assert code_of(k.dead_letter, dead.id) == grpc.StatusCode.NOT_FOUND


def test_a_message_past_max_attempts_without_a_target_goes_to_the_queue(k: llmos.Client) -> None:
    port = k.open_port(max_attempts=2)
    mid = k.send(port, "poison")
    for attempt in (1, 2):
        got = k.recv(port, ack=True, lease=WAIT_S, timeout=WAIT_S)
        assert (got.id, got.attempt) == (mid, attempt)
        k.nack(port, mid)
    assert k.recv(port, timeout=0) is None
    dead, = k.dead_letters(port)
    assert (dead.message.id, dead.reason, dead.attempts, dead.message.body) == (mid, "max_attempts", 2, "poison")


def test_what_a_gone_or_full_target_cannot_take_goes_to_the_queue(k: llmos.Client) -> None:
    gone = k.open_port()
    receiver = k.spawn(lua='sys.recv{tag = "never"}', dead_letter=gone)
    k.kill(gone)
    k.send(receiver, "a")
    full = k.open_port(mailbox=1)
    k.send(full, "filler")
    other = k.spawn(lua='sys.recv{tag = "never"}', dead_letter=full)
    k.send(other, "b")
    k.kill(receiver)
    k.kill(other)
    a, = k.dead_letters(receiver)
    assert a.message.body == "a" and a.detail == f"its dead_letter target: pid {gone} has ended"
    b, = k.dead_letters(other)
    assert b.message.body == "b" and b.detail.startswith(f"its dead_letter target: pid {full} refused it: ")


def test_a_killed_ports_stored_messages_move_to_the_queue_and_stay_there_across_kill_9(
        fresh_llmosd: LlmosdServer) -> None:
    with llmos.Client(fresh_llmosd.target) as k:
        port = k.open_port()
        ids = [k.send(port, i) for i in range(3)]
        leased = k.recv(port, ack=True, lease=WAIT_S, timeout=WAIT_S)
        k.kill(port)
    fresh_llmosd.stop(signal.SIGKILL)
    fresh_llmosd.start()
    with llmos.Client(fresh_llmosd.target) as k:
        letters = k.dead_letters(port)
        assert [d.message.id for d in letters] == ids  # in id order, the leased one in its place
        assert [d.attempts for d in letters] == [1 if d.message.id == leased.id else 0 for d in letters]
        assert k.get(port).state == "KILLED"
        assert k.purge_dead_letters(all=True) == 3
        assert k.dead_letters() == []


def test_the_queue_pages_and_purges(k: llmos.Client, stub: Any) -> None:
    pid = k.spawn(lua='sys.recv{tag = "never"}')
    ids = [k.send(pid, i) for i in range(25)]
    k.kill(pid)
    pages, after = [], 0
    while True:
        reply = stub.ListDeadLetters(pb.ListDeadLettersRequest(after_id=after, page_size=10, receiver=pid))
        pages.append([d.message.id for d in reply.dead_letters])
        if not reply.next_after_id:
            break
        after = reply.next_after_id
    assert [len(p) for p in pages] == [10, 10, 5] and sum(pages, []) == ids
    assert reply.total >= 25
    letters = k.dead_letters(pid)
    assert [d.message.id for d in k.dead_letters(pid, limit=3)] == ids[:3]
    assert k.purge_dead_letters([d.id for d in letters[:5]] + [1 << 50]) == 5
    assert len(k.dead_letters(pid)) == 20
    assert k.purge_dead_letters(before_ms=letters[-1].dead_at_ms + 1) >= 20
    assert k.dead_letters(pid) == []


def test_bad_dead_letter_requests_are_refused_with_their_codes(k: llmos.Client, stub: Any) -> None:
    inv = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(k.purge_dead_letters) == inv
    assert code_of(k.purge_dead_letters, [1], all=True) == inv
    assert code_of(k.purge_dead_letters, before_ms=-5) == inv
    assert code_of(k.dead_letter, 0) == inv
    assert code_of(k.dead_letter, 1 << 60) == inv
    assert code_of(k.dead_letter, (1 << 50) + 7) == grpc.StatusCode.NOT_FOUND
    assert code_of(k.retry_dead_letter, (1 << 50) + 7) == grpc.StatusCode.NOT_FOUND
    assert not stub.ListDeadLetters(pb.ListDeadLettersRequest(after_id=(1 << 64) - 1)).dead_letters
    for request, code in ((pb.ListDeadLettersRequest(page_size=10_001), inv),
                          (pb.ListDeadLettersRequest(receiver=1 << 60), grpc.StatusCode.NOT_FOUND),
                          (pb.RetryDeadLetterRequest(id=1, to=0), inv),
                          (pb.RetryDeadLetterRequest(id=1, to_name=""), inv),
                          (pb.PurgeDeadLettersRequest(ids=[(1 << 64) - 1]), inv),
                          (pb.PurgeDeadLettersRequest(before_ms=-(1 << 63)), inv)):
        method = getattr(stub, type(request).__name__.removesuffix("Request"))
        with pytest.raises(grpc.RpcError) as err:
            method(request)
        assert err.value.code() == code, request


def test_the_dead_letter_queue_is_bounded(tmp_path: Any) -> None:
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "2", "--dead-letter-limit", "3")
    server.start()
    try:
        with llmos.Client(server.target) as k:
            pid = k.spawn(lua='sys.recv{tag = "never"}')
            ids = [k.send(pid, i) for i in range(5)]
            k.kill(pid)
            assert [d.message.id for d in k.dead_letters()] == ids[2:]  # the oldest dropped
            with server.channel() as channel:
                reply = kernel_pb2_grpc.KernelStub(channel).ListDeadLetters(pb.ListDeadLettersRequest())
            assert (reply.total, reply.dropped) == (3, 2)
    finally:
        server.stop()


# -- UNDELIVERED notices ---------------------------------------------------------------------------------
def test_a_sender_that_asked_gets_an_undelivered_notice_instead_of_the_dead_letter_path(k: llmos.Client) -> None:
    sender, target = k.open_port(), k.open_port()
    receiver = k.spawn(lua='sys.recv{tag = "never"}', dead_letter=target)
    mid = k.send(receiver, "lost", sender=sender, tag="t", correlation_id="c7", notify_undelivered=True)
    kept = k.send(receiver, "plain", sender=sender)
    anonymous = k.send(receiver, "nobody to tell", notify_undelivered=True)
    k.kill(receiver)
    notice = k.recv(sender, timeout=WAIT_S)
    assert (notice.tag, notice.sender, notice.correlation_id) == ("UNDELIVERED", receiver, "c7")
    assert notice.body == {"message_id": mid, "reason": "receiver_ended", "receiver": receiver, "attempts": 0,
                           "tag": "t"}
    assert k.recv(sender, timeout=0) is None
    letters = [k.recv(target, timeout=WAIT_S) for _ in range(2)]
    assert [m.body["message"]["id"] for m in letters] == [kept, anonymous]  # no notice: the target's
    assert k.dead_letters(receiver) == []


def test_lua_and_python_senders_ask_for_notices_and_send_idempotently(k: llmos.Client) -> None:
    port = k.open_port()
    out = k.wait(k.spawn(lua="""
        local port = args
        local a = sys.send(port, "x", {idempotency_key = "k1"})
        local b = sys.send(port, "y", {idempotency_key = "k1"})
        local child = sys.spawn{lua = "sys.recv{tag = 'never'}"}
        sys.send(child, "lost", {notify_undelivered = true, correlation_id = "c9"})
        sys.kill(child)
        local notice = sys.recv{tag = "UNDELIVERED", timeout_ms = 60000}
        local refused = {}
        refused.flag = select(2, pcall(sys.send, port, 1, {notify_undelivered = 1}))
        refused.key = select(2, pcall(sys.send, port, 1, {idempotency_key = 5}))
        refused.long = select(2, pcall(sys.send, port, 1, {idempotency_key = string.rep("k", 1025)}))
        return {a = a, b = b, body = notice.body, from = notice.from, cid = notice.correlation_id, child = child,
                refused = refused}
    """, args=port), timeout=WAIT_S)
    assert out.state == "EXITED", out.error
    r = out.result
    assert r["a"] == r["b"] and [m.body for m in iter(lambda: k.recv(port, timeout=0), None)] == ["x"]
    assert (r["from"], r["cid"], r["body"]["reason"], r["body"]["receiver"]) == \
        (r["child"], "c9", "receiver_ended", r["child"])
    assert "notify_undelivered must be a boolean" in r["refused"]["flag"]
    assert "idempotency_key must be a string" in r["refused"]["key"]
    assert "idempotency_key is at most 1024 bytes" in r["refused"]["long"]

    agent = k.spawn(python=textwrap.dedent("""
        from llmos.userland import sys
        a = sys.send(sys.args, "x", idempotency_key="k1")
        b = sys.send(sys.args, "y", idempotency_key="k1")
        child = sys.spawn(lua="sys.recv{tag = 'never'}")
        sys.send(child, "lost", notify_undelivered=True)
        sys.kill(child)
        notice = sys.recv(tag="UNDELIVERED", timeout_ms=60000)
        sys.exit({"same": a == b, "body": notice.body, "child": child})
    """), args=port)
    info = k.wait(agent, timeout=WAIT_S)
    assert info.state == "EXITED", info.error
    assert info.result["same"] and info.result["body"]["receiver"] == info.result["child"]
    assert [m.body for m in iter(lambda: k.recv(port, timeout=0), None)] == ["x"]  # the agent's key is its own


# -- idempotent sends ------------------------------------------------------------------------------------
def test_the_same_key_from_the_same_sender_stores_nothing_new(k: llmos.Client) -> None:
    port, other = k.open_port(), k.open_port()
    first = k.send(port, "once", idempotency_key="order-17")
    assert k.send(port, "twice", idempotency_key="order-17") == first
    assert k.send(other, "elsewhere", idempotency_key="order-17") == first  # the key, not the receiver
    by_port = k.send(port, "from a port", sender=other, idempotency_key="order-17")
    assert by_port != first  # another sender's key
    assert [m.body for m in iter(lambda: k.recv(port, timeout=0), None)] == ["once", "from a port"]
    assert k.recv(other, timeout=0) is None
    a, b = k.send(port, 1), k.send(port, 2)  # the SDK's own keys differ
    assert a != b
    assert code_of(k.send, port, 1, idempotency_key="k" * 1025) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(k.send, port, 1, idempotency_key="\ud800") == grpc.StatusCode.INVALID_ARGUMENT


def test_a_refused_send_leaves_no_first_id_behind(k: llmos.Client) -> None:
    port = k.open_port(mailbox=1)
    k.send(port, "filler")
    assert code_of(k.send, port, "late", idempotency_key="k-full") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert k.recv(port, timeout=0).body == "filler"
    mid = k.send(port, "late", idempotency_key="k-full")  # stored now, as a first send
    assert k.recv(port, timeout=0).id == mid


class DroppingProxy:
    """A TCP proxy in front of llmosd that can hold back the server's answers and then cut every
    connection, so that a client really loses its connection mid-call (no interceptor, no mock)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.connections = 0
        self._holding = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._holding = True

    def cut(self) -> None:
        """Drop every connection (and what was held back); new ones pass through."""
        with self._lock:
            self._holding = False
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets.clear()

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            host, port = self.upstream.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)), timeout=5)
            except OSError:  # the server is down: the client sees the connection fail
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers and self._holding:
                    continue  # held back: the client never sees it
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _send_in_background(client: llmos.Client, to: int, body: Any) -> tuple[threading.Thread, dict]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["id"] = client.send(to, body)
        except Exception as e:  # reported by the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_the_sdk_retries_a_send_whose_answer_was_lost_and_stores_it_once(k: llmos.Client,
                                                                          llmosd: LlmosdServer) -> None:
    proxy = DroppingProxy(llmosd.target)
    try:
        with llmos.Client(proxy.target, send_retry=llmos.Retry(attempts=20, max_backoff=0.5)) as through:
            port = through.open_port()
            proxy.hold()
            thread, out = _send_in_background(through, port, "exactly once")
            until(lambda: k.get(port).usage["mailbox_len"] == 1, "the send to be stored")
            proxy.cut()  # its answer is lost with the connection
            thread.join(WAIT_S)
        assert "error" not in out, out
        got = k.recv(port, timeout=0)
        assert (got.id, got.body) == (out["id"], "exactly once")
        assert k.recv(port, timeout=0) is None
        assert proxy.connections >= 2  # the answer came over a new connection: a retry
    finally:
        proxy.close()


def test_the_asyncio_client_retries_a_send_whose_answer_was_lost(k: llmos.Client, llmosd: LlmosdServer) -> None:
    from llmos import aio

    proxy = DroppingProxy(llmosd.target)
    port = k.open_port()

    async def scenario() -> int:
        async with aio.Client(proxy.target, send_retry=llmos.Retry(attempts=20, max_backoff=0.5)) as through:
            await through.wait_ready()
            proxy.hold()
            sending = asyncio.ensure_future(through.send(port, "exactly once"))
            await asyncio.to_thread(until, lambda: k.get(port).usage["mailbox_len"] == 1, "the send to be stored")
            proxy.cut()
            return await asyncio.wait_for(sending, WAIT_S)

    try:
        message_id = asyncio.run(scenario())
    finally:
        proxy.close()
    got = k.recv(port, timeout=0)
    assert (got.id, got.body) == (message_id, "exactly once")
    assert k.recv(port, timeout=0) is None and proxy.connections >= 2


def test_the_sdk_retries_a_send_across_a_server_kill_9_and_stores_it_once(fresh_llmosd: LlmosdServer) -> None:
    proxy = DroppingProxy(fresh_llmosd.target)
    try:
        with llmos.Client(proxy.target, send_retry=llmos.Retry(attempts=60, max_backoff=1.0)) as through:
            port = through.open_port()
            proxy.hold()
            thread, out = _send_in_background(through, port, "exactly once")
            with llmos.Client(fresh_llmosd.target) as k:
                until(lambda: k.get(port).usage["mailbox_len"] == 1, "the send to be stored")
            fresh_llmosd.stop(signal.SIGKILL)
            fresh_llmosd.start()
            proxy.upstream = fresh_llmosd.target
            proxy.cut()
            thread.join(WAIT_S)
        assert "error" not in out, out
        with llmos.Client(fresh_llmosd.target) as k:
            got = k.recv(port, timeout=0)
            assert (got.id, got.body) == (out["id"], "exactly once")
            assert k.recv(port, timeout=0) is None
        assert proxy.connections >= 2
    finally:
        proxy.close()


def test_a_send_without_a_key_is_not_retried(llmosd: LlmosdServer) -> None:
    proxy = DroppingProxy(llmosd.target)
    try:
        with llmos.Client(proxy.target) as through, llmos.Client(llmosd.target) as k:
            port = through.open_port()
            proxy.hold()
            out: dict[str, Any] = {}

            def run() -> None:
                try:
                    through.send(port, "maybe", idempotency_key="")
                except llmos.LlmosError as e:
                    out["code"] = e.code
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            until(lambda: k.get(port).usage["mailbox_len"] == 1, "the send to be stored")
            proxy.cut()
            thread.join(WAIT_S)
            assert out["code"] == grpc.StatusCode.UNAVAILABLE
    finally:
        proxy.close()


# -- the CLI ---------------------------------------------------------------------------------------------
def test_llmos_dlq_ls_show_retry_purge(k: llmos.Client, llmosd: LlmosdServer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pid = k.spawn(lua='sys.recv{tag = "never"}')
    mid = k.send(pid, {"n": 1}, tag="job")
    k.kill(pid)
    dead, = k.dead_letters(pid)
    server = ["--server", llmosd.target]
    assert cli.main(server + ["dlq", "ls", "--receiver", str(pid)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == list(cli.DLQ_COLUMNS)
    assert table[1].split()[:7] == [str(dead.id), str(mid), "0", str(pid), "job", "receiver_ended", "0"]
    assert cli.main(server + ["dlq", "show", str(dead.id)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["message"]["body"] == {"n": 1} and shown["reason"] == "receiver_ended"
    port = k.open_port()
    assert cli.main(server + ["dlq", "retry", str(dead.id), "--to", str(port)]) == 0
    assert int(capsys.readouterr().out) == k.recv(port, timeout=WAIT_S).id
    assert cli.main(server + ["dlq", "show", str(dead.id)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(server + ["dlq", "purge"]) == 2
    assert cli.main(server + ["dlq", "purge", "--all", "--before-ms", "5"]) == 2
    assert cli.main(server + ["dlq", "purge", "999999999"]) == 0
    assert capsys.readouterr().out.split()[-1] == "0"


# -- namespaces ------------------------------------------------------------------------------------------
def test_each_namespace_has_its_own_queue_and_each_client_its_own_keys(llmosd: LlmosdServer) -> None:
    with llmos.Client(llmosd.target, token=(llmosd.data_dir / "admin.token").read_text().strip()) as admin:
        tokens = {name: admin.create_token(ns, role, "test_delivery")[1]
                  for name, ns, role in (("a", "dlq-a", "owner"), ("reader", "dlq-a", "reader"),
                                         ("b", "dlq-b", "owner"))}
    a, reader, b = (llmos.Client(llmosd.target, token=tokens[n]) for n in ("a", "reader", "b"))
    try:
        pid = a.spawn(lua='sys.recv{tag = "never"}')
        a.send(pid, "lost in a")
        a.kill(pid)
        dead, = a.dead_letters(pid)
        assert dead.namespace == "dlq-a" and reader.dead_letter(dead.id) == dead
        assert b.dead_letters() == [] and code_of(b.dead_letter, dead.id) == grpc.StatusCode.NOT_FOUND
        assert b.purge_dead_letters([dead.id]) == 0  # not b's to purge
        for call in (lambda: reader.retry_dead_letter(dead.id), lambda: reader.purge_dead_letters(all=True)):
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED
        assert a.purge_dead_letters([dead.id]) == 1

        port_a, port_b = a.open_port(), b.open_port()
        assert a.send(port_a, 1, idempotency_key="same") != b.send(port_b, 2, idempotency_key="same")
        assert a.send(port_a, 3, idempotency_key="same") == a.recv(port_a, timeout=0).id
    finally:
        for client in (a, reader, b):
            client.close()

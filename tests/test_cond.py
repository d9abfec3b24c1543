"""Condition variables (sys.cond, CondWait/CondSignal/CondBroadcast) against a real llmosd over real
gRPC: the bounded buffer of userland/lua/, the order waiters are woken in, timeouts, killed waiters,
and the same calls from Lua, Python agents and external clients."""
from __future__ import annotations

import collections
import time
import textwrap
import uuid
from typing import Any

import grpc
import pytest

import llmos
from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer

WAIT_S = 60  # generous bound for anything here to happen


@pytest.fixture
def k(llmosd: LlmosdServer) -> Any:
    with llmos.Client(llmosd.target) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run(stub: Any, **spawn: Any) -> Any:
    args = spawn.pop("args", None)
    req = pb.SpawnRequest(**spawn)
    if args is not None:
        req.args.CopyFrom(to_value(args))
    pid = stub.Spawn(req).pid
    waited = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=WAIT_S * 1000))
    assert not waited.timed_out, f"pid {pid} did not end"
    info = waited.process
    assert info.state == pb.EXITED, (pb.ProcessState.Name(info.state), info.exit_reason, info.error)
    return from_value(info.result)


def code_of(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


def acquire(stub: Any, pid: int, name: str) -> None:
    assert stub.Acquire(pb.AcquireRequest(pid=pid, name=name), timeout=WAIT_S).acquired


def wait_req(pid: int, name: str, lock: str, **fields: Any) -> pb.CondWaitRequest:
    return pb.CondWaitRequest(pid=pid, name=name, lock=lock, **fields)


def queue_waiter(stub: Any, k: llmos.Client, lock: str, cond: str, **fields: Any) -> tuple[int, Any]:
    """A new port that takes `lock` and waits on `cond`; returns once it is queued. (The mutex is
    released only as the waiter queues, so taking it again proves the waiter is in the queue.)"""
    port = k.open_port()
    acquire(stub, port, lock)
    waiting = stub.CondWait.future(wait_req(port, cond, lock, **fields), timeout=WAIT_S)
    probe = k.open_port()
    acquire(stub, probe, lock)
    stub.Release(pb.ReleaseRequest(pid=probe, name=lock))
    return port, waiting


# -- the bounded buffer ------------------------------------------------------------------------------
@pytest.mark.parametrize("producers,consumers,items,capacity", [(5, 5, 12, 3), (3, 6, 10, 1), (6, 2, 8, 2)])
def test_bounded_buffer_loses_and_duplicates_nothing(stub: Any, producers: int, consumers: int, items: int,
                                                     capacity: int) -> None:
    out = run(stub, path="lua/bounded_buffer.lua", args={
        "producers": producers, "consumers": consumers, "items": items, "capacity": capacity,
        "dir": unique("bb")})
    expected = [f"p{p}-{i}" for p in range(1, producers + 1) for i in range(1, items + 1)]
    consumed = out["consumed"]
    duplicated = [item for item, n in collections.Counter(consumed).items() if n > 1]
    assert duplicated == [] and sorted(consumed) == sorted(expected) and out["produced"] == len(expected)


# -- gRPC --------------------------------------------------------------------------------------------
def test_waiters_are_woken_by_priority_then_in_arrival_order(stub: Any, k: llmos.Client) -> None:
    lock, cond = unique("m"), unique("c")
    queued = [queue_waiter(stub, k, lock, cond, priority=p) for p in (0, 5, -3, 5, 0)]
    order: list[int] = []
    for _ in queued:
        assert stub.CondSignal(pb.CondSignalRequest(name=cond)).woken == 1
        # The mutex is free, so the one signalled answers; no other was woken.
        i = _poll(lambda: next((i for i, (_, f) in enumerate(queued) if f.done() and i not in order), None))
        reply = queued[i][1].result()
        assert (reply.signalled, reply.timed_out) == (True, False)
        order.append(i)
        stub.Release(pb.ReleaseRequest(pid=queued[i][0], name=lock))  # it holds the mutex again
    assert order == [1, 3, 0, 4, 2]
    assert stub.CondSignal(pb.CondSignalRequest(name=cond)).woken == 0  # a signal nobody waits for is lost


def _poll(what: Any) -> Any:
    for _ in range(6000):
        got = what()
        if got is not None:
            return got
        time.sleep(0.01)
    raise AssertionError("nothing happened")


def test_broadcast_wakes_everyone_and_each_holds_the_mutex_in_turn(stub: Any, k: llmos.Client) -> None:
    lock, cond = unique("m"), unique("c")
    queued = [queue_waiter(stub, k, lock, cond) for _ in range(4)]
    holder = k.open_port()
    acquire(stub, holder, lock)
    assert stub.CondBroadcast(pb.CondSignalRequest(name=cond)).woken == 4
    assert not any(f.done() for _, f in queued)  # they are woken, but the mutex is still held
    stub.Release(pb.ReleaseRequest(pid=holder, name=lock))
    for port, waiting in queued:  # the mutex goes round in their order, one holder at a time
        reply = waiting.result(timeout=WAIT_S)
        assert reply.signalled and not reply.timed_out
        assert not any(f.done() for p, f in queued if p > port)
        stub.Release(pb.ReleaseRequest(pid=port, name=lock))


def test_a_timed_out_wait_holds_the_mutex_again(stub: Any, k: llmos.Client) -> None:
    lock, cond = unique("m"), unique("c")
    port = k.open_port()
    acquire(stub, port, lock)
    reply = stub.CondWait(wait_req(port, cond, lock, timeout_ms=30), timeout=WAIT_S)
    assert (reply.signalled, reply.timed_out) == (False, True)
    other = k.open_port()
    assert stub.Acquire(pb.AcquireRequest(pid=other, name=lock, timeout_ms=0)).timed_out  # still ours
    stub.Release(pb.ReleaseRequest(pid=port, name=lock))
    assert stub.CondSignal(pb.CondSignalRequest(name=cond)).woken == 0  # it left the queue


def test_bad_cond_calls_are_refused_with_their_status(stub: Any, k: llmos.Client) -> None:
    lock, cond, sem = unique("m"), unique("c"), unique("s")
    port, other = k.open_port(), k.open_port()
    fp, inv = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.CondWait, wait_req(port, cond, lock)) == fp  # does not hold the mutex
    acquire(stub, other, lock)
    assert code_of(stub.CondWait, wait_req(port, cond, lock)) == fp  # someone else holds it
    assert stub.Acquire(pb.AcquireRequest(pid=port, name=sem, semaphore=2)).acquired
    assert code_of(stub.CondWait, wait_req(port, cond, sem)) == fp  # a semaphore is no mutex
    for fields, code in (({"pid": 0}, inv), ({"pid": 1 << 40}, grpc.StatusCode.NOT_FOUND),
                         ({"name": ""}, inv), ({"name": "a\tb"}, inv), ({"lock": ""}, inv),
                         ({"timeout_ms": -1}, inv), ({"priority": 21}, inv)):
        req = {"pid": other, "name": cond, "lock": lock, **fields}
        assert code_of(stub.CondWait, pb.CondWaitRequest(**req)) == code, fields
    for bad in ("", "x" * 257, "nl\n"):
        assert code_of(stub.CondSignal, pb.CondSignalRequest(name=bad)) == inv
        assert code_of(stub.CondBroadcast, pb.CondSignalRequest(name=bad)) == inv
    assert code_of(stub.CondSignal, pb.CondSignalRequest(name=cond, pid=1 << 40)) == grpc.StatusCode.NOT_FOUND
    # A condition's waiters all wait with one mutex.
    lock2 = unique("m2")
    first, waiting = queue_waiter(stub, k, lock2, cond)
    stub.Release(pb.ReleaseRequest(pid=other, name=lock))
    third = k.open_port()
    acquire(stub, third, lock)
    assert code_of(stub.CondWait, wait_req(third, cond, lock)) == fp
    assert stub.CondSignal(pb.CondSignalRequest(name=cond)).woken == 1
    assert waiting.result(timeout=WAIT_S).signalled
    assert stub.CondBroadcast(pb.CondSignalRequest(name=cond)).woken == 0  # still serving, queue empty


def test_a_killed_waiter_leaves_the_queue(stub: Any, k: llmos.Client) -> None:
    lock, cond = unique("m"), unique("c")
    pid = k.spawn(lua=f"sys.lock.acquire({lock!r}); sys.cond.wait({cond!r}, {lock!r}); return 'woke'")
    _wait_blocked_on(k, pid, "cond_wait")
    port, waiting = queue_waiter(stub, k, lock, cond)
    k.kill(pid)
    assert stub.CondSignal(pb.CondSignalRequest(name=cond)).woken == 1  # only the port was left
    assert waiting.result(timeout=WAIT_S).signalled
    assert k.wait(pid, timeout=WAIT_S).state == "KILLED"


def _wait_blocked_on(k: llmos.Client, pid: int, on: str) -> None:
    _poll(lambda: True if k.get(pid).blocked_on == on else None)


# -- Lua and Python agents ---------------------------------------------------------------------------
LUA_WAITER = textwrap.dedent("""
    sys.lock.acquire(args.lock)
    sys.send(args.port, "queued")  -- sent with the mutex held: the waiter queues before anyone can signal
    local got = sys.cond.wait(args.cond, args.lock)
    sys.lock.release(args.lock)
    return {signalled = got.signalled, timed_out = got.timed_out}
""")


def test_lua_wait_signal_timeout_and_refusals(stub: Any, k: llmos.Client) -> None:
    lock, cond = unique("m"), unique("c")
    out = run(stub, lua=textwrap.dedent(f"""
        local L, C = {lock!r}, {cond!r}
        local refused = {{}}
        refused.not_held = select(2, pcall(sys.cond.wait, C, L))
        refused.no_lock = select(2, pcall(sys.cond.wait, C))
        refused.bad_timeout = select(2, pcall(sys.cond.wait, C, L, -1))
        refused.bad_name = select(2, pcall(sys.cond.signal, 5))
        sys.lock.acquire(L)
        local timed = sys.cond.wait(C, L, 20)
        local released = sys.lock.release(L)  -- it holds the mutex again
        return {{refused = refused, timed = timed, released = released, woken = sys.cond.broadcast(C)}}
    """))
    assert out["timed"] == {"signalled": False, "timed_out": True} and out["released"] is True and out["woken"] == 0
    assert "does not hold the lock" in out["refused"]["not_held"]
    assert "sys.cond.wait: lock must be a string" in out["refused"]["no_lock"]
    assert "timeout_ms" in out["refused"]["bad_timeout"]
    assert "sys.cond.signal: name must be a string" in out["refused"]["bad_name"]

    port = k.open_port()
    pid = k.spawn(lua=LUA_WAITER, args={"lock": lock, "cond": cond, "port": port})
    assert k.recv(port, timeout=WAIT_S).body == "queued"
    acquire(stub, port, lock)  # proves the waiter released it, so it is queued
    assert stub.CondSignal(pb.CondSignalRequest(name=cond)).woken == 1
    stub.Release(pb.ReleaseRequest(pid=port, name=lock))
    assert k.wait(pid, timeout=WAIT_S).result == {"signalled": True, "timed_out": False}


def test_python_agent_waits_and_signals(stub: Any, k: llmos.Client) -> None:
    lock, cond = unique("m"), unique("c")
    waiter = k.spawn(python=textwrap.dedent("""
        from llmos.userland import sys
        a = sys.args
        sys.lock.acquire(a["lock"])
        timed = sys.cond.wait(a["cond"], a["lock"], timeout_ms=10)
        sys.send(a["port"], "queued")
        got = sys.cond.wait(a["cond"], a["lock"])
        sys.lock.release(a["lock"])
        sys.exit({"timed": timed, "got": got})
    """), args={"lock": lock, "cond": cond, "port": (port := k.open_port())})
    assert k.recv(port, timeout=WAIT_S).body == "queued"
    signaller = k.spawn(python=textwrap.dedent("""
        from llmos.userland import sys
        a = sys.args
        sys.lock.acquire(a["lock"])   # held only once the waiter has queued and let it go
        n = sys.cond.signal(a["cond"])
        sys.lock.release(a["lock"])
        try:
            sys.cond.wait(a["cond"], a["lock"], timeout_ms=-1)
        except Exception as e:
            bad = type(e).__name__
        try:
            sys.cond.broadcast(a["cond"], when=1)
        except Exception as e:
            unknown = type(e).__name__ + ": " + str(e)
        sys.exit({"woken": n, "bad": bad, "unknown": unknown})
    """), args={"lock": lock, "cond": cond})
    signalled = k.wait(signaller, timeout=WAIT_S).result
    assert signalled["woken"] == 1 and signalled["bad"] == "InvalidArgument"
    assert signalled["unknown"].startswith("InvalidArgument") and "when" in signalled["unknown"]
    out = k.wait(waiter, timeout=WAIT_S).result
    assert out == {"timed": {"signalled": False, "timed_out": True}, "got": {"signalled": True, "timed_out": False}}

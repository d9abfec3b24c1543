"""A thread stuck in one C call never holds up the others (the scheduler's
sysmon), gets a CPU back before it runs on, and the health service says so
while a virtual CPU is wedged.

The stuck call is real Lua: using a 512 MiB string as a table key makes Lua
hash all of it inside one VM instruction (SETTABLE), where no hook can run:
about a second on this machine. Each test runs its own server with one
virtual CPU, so that the stuck thread holds the only one.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer

# Tells the port (args) when it starts the stuck call ("ready") and when it
# is back ("returned"), then runs Lua for ever.
STUCK_LUA = """
local s = string.rep("x", 1 << 20)
for i = 1, 9 do s = s .. s end  -- 512 MiB
sys.send(args, sys.now(), {tag = "ready"})
local t = {}
t[s] = true
sys.send(args, sys.now(), {tag = "returned"})
while true do end
"""
STUCK_LIMITS = pb.Limits(memory_bytes=1536 << 20)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def one_cpu(tmp_path: pathlib.Path) -> Iterator[grpc.Channel]:
    # Aging slow enough that a lower priority never gets a turn during a test.
    server = LlmosdServer(tmp_path / "data", "--model", "none", "--cpus", "1", "--wedged-ms", "100",
                          "--aging-ms", "60000")
    server.start()
    try:
        with server.channel() as channel:
            yield channel
    finally:
        server.stop()


def spawn(stub: Any, lua: str, port: int, **kw: Any) -> int:
    return stub.Spawn(pb.SpawnRequest(lua=lua, args=to_value(port), **kw)).pid


def recv(stub: Any, port: int, tag: str, timeout_ms: int = 60_000) -> float:
    """The body (a sys.now() time) of the next message tagged `tag` on `port`."""
    resp = stub.Recv(pb.RecvRequest(pid=port, tag=tag, timeout_ms=timeout_ms))
    assert not resp.timed_out, f"no {tag!r} message"
    return from_value(resp.message.body)


def nothing_tagged(stub: Any, port: int, tag: str) -> bool:
    return stub.Recv(pb.RecvRequest(pid=port, tag=tag, timeout_ms=0)).timed_out


def health(channel: grpc.Channel) -> tuple[int, int]:
    check = health_pb2_grpc.HealthStub(channel).Check
    return (check(health_pb2.HealthCheckRequest(service="")).status,
            check(health_pb2.HealthCheckRequest(service="llmos.v1.Kernel")).status)


def test_a_process_stuck_in_c_does_not_hold_up_the_others_and_a_kill_lands_when_it_returns(
    one_cpu: grpc.Channel,
) -> None:
    stub = kernel_pb2_grpc.KernelStub(one_cpu)
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    stuck = spawn(stub, STUCK_LUA, port, limits=STUCK_LIMITS)
    ready = recv(stub, port, "ready")
    # The only virtual CPU is held by a thread inside one C call: the newcomer
    # runs only if the sysmon hands the CPU to another worker.
    spawn(stub, "sys.send(args, sys.now(), {tag = 'started'})", port)
    started = recv(stub, port, "started")
    stub.Kill(pb.KillRequest(pid=stuck))
    ended = stub.Wait(pb.WaitRequest(pid=stuck, timeout_ms=60_000)).process
    assert (ended.state, ended.exit_reason) == (pb.KILLED, "killed")
    # It ran early in the stuck stretch, not once the call was over.
    assert started - ready < (ended.ended_at_ms - ready) / 2, (started - ready, ended.ended_at_ms - ready)
    # The kill took effect when the call returned, before any more of the program ran.
    assert nothing_tagged(stub, port, "returned")


def test_health_is_not_serving_while_a_cpu_is_wedged_and_back_from_c_a_thread_waits_for_a_cpu(
    one_cpu: grpc.Channel,
) -> None:
    stub = kernel_pb2_grpc.KernelStub(one_cpu)
    assert health(one_cpu) == (SERVING, SERVING)
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    stuck = spawn(stub, STUCK_LUA, port, limits=STUCK_LIMITS)
    recv(stub, port, "ready")
    # A hog that goes before the stuck process: it makes it due to give its
    # CPU back, and takes the CPU the sysmon retakes.
    hog = spawn(stub, "while true do end", port, priority=5)
    deadline = time.monotonic() + 60
    while health(one_cpu) != (NOT_SERVING, NOT_SERVING):  # wedged: over --wedged-ms past its due time
        assert nothing_tagged(stub, port, "returned"), "the call returned before health said a CPU was wedged"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while health(one_cpu) != (SERVING, SERVING):  # the call returned, and the thread checked in
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Back from C, the thread runs no more of its program while the hog holds
    # the only CPU, which it does until killed.
    time.sleep(0.5)
    assert nothing_tagged(stub, port, "returned"), "a thread that lost its CPU ran on without one"
    stub.Kill(pb.KillRequest(pid=hog))
    recv(stub, port, "returned")
    stub.Kill(pb.KillRequest(pid=stuck))
    assert stub.Wait(pb.WaitRequest(pid=stuck, timeout_ms=30_000)).process.state == pb.KILLED

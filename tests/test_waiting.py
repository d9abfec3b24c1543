"""Waiters and timers (kernel/waiting.py): what an answered call and a cancelled timer keep,
and that cancelled timers cannot pile up in the timer thread's heap."""
from __future__ import annotations

import gc
import pathlib
import time
import weakref
from typing import Any, Callable, Iterator

import pytest

from llmosd.engine import EngineConfig
from llmosd.kernel.config import KernelConfig, SpawnSpec
from llmosd.kernel.kernel import Kernel
from llmosd.kernel.mailbox import ANY
from llmosd.kernel.waiting import MIN_SWEEP, Timers, Waiter
from llmosd.lua.slices import LuaRuntime
from llmosd.services.inference import Inference

HOUR_S = 3600.0


@pytest.fixture
def timers() -> Iterator[Timers]:
    t = Timers()
    yield t
    t.stop()


class Callback:
    """A callback that counts its calls, and that a weakref can watch."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_a_cancelled_timer_lets_its_callback_go(timers: Timers) -> None:
    """A timeout's callback holds its waiter, and the waiter what it was answered with."""
    callback = Callback()
    gone = weakref.ref(callback)
    timer = timers.call_later(HOUR_S, callback)
    timer.cancel()
    del callback
    assert gone() is None


def test_cancelled_timers_are_swept_out_and_live_ones_all_fire(timers: Timers) -> None:
    """Calls answered long before their timeouts leave cancelled timers an hour from the heap's
    top: they are swept out once the heap doubles, while every live timer still fires once."""
    live = [Callback() for _ in range(MIN_SWEEP)]
    for i in range(40 * MIN_SWEEP):
        timers.call_later(HOUR_S, Callback()).cancel()
        if i % 40 == 0:
            timers.call_later(0.2, live[i // 40])
        assert len(timers) <= 2 * MIN_SWEEP + 1
    deadline = time.monotonic() + 30
    while sum(c.calls for c in live) < len(live) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c.calls for c in live] == [1] * len(live)
    assert len(timers) <= 2 * MIN_SWEEP + 1


class Answered(Waiter):
    """A waiter that keeps what it is answered with, as an RPC's does (AsyncWaiter.value), and
    that a weakref can watch."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []

    def _wake(self, value: Any) -> None:
        self.got.append(value)


def _recv_with_ack(kernel: Kernel, port: int, waiter: Waiter, timeout_s: float | None) -> None:
    with kernel.lock:
        assert kernel.acks.recv_locked(kernel.procs[port], ANY, waiter, timeout_s, 60.0) is None


def _answer_recv(kernel: Kernel, port: int) -> None:
    kernel.send(0, port, "t", "m" * 1000, b"", "")


# How a call blocks on a port, and what answers it.
CALLS: dict[str, tuple[Callable[[Kernel, int, Waiter, float | None], None], Callable[[Kernel, int], None]]] = {
    "wait": (lambda kernel, port, waiter, timeout_s: kernel.wait(port, waiter, timeout_s),
             lambda kernel, port: kernel.kill(port)),  # the port's end answers a Wait on it
    "recv": (lambda kernel, port, waiter, timeout_s: kernel.recv(port, ANY, waiter, timeout_s), _answer_recv),
    "recv with ack": (_recv_with_ack, _answer_recv),
}
# A Wait on the port has no "receiver gone": the port's end is its answer.
CASES = [(call, end) for call in CALLS for end in ("answered", "timed out", "receiver gone")
         if (call, end) != ("wait", "receiver gone")]


@pytest.mark.parametrize("call, end", CASES)
def test_a_waiter_is_freed_when_its_call_is_over(tmp_path: pathlib.Path, call: str, end: str) -> None:
    """A queue's entry is often the waiter itself, or a tuple holding it: a waiter that kept its entry
    once out of the queue was a cycle, and kept what it was answered with (a Wait's record, a Recv's
    message, megabytes each) until the cyclic collector ran, which can be minutes in a busy server.
    With the collector off, dropping the waiter must free it."""
    kernel = Kernel(KernelConfig(data_dir=str(tmp_path)))
    gc.disable()
    try:
        port, _ = kernel.open_port()
        waiter = Answered()
        block, answer = CALLS[call]
        block(kernel, port, waiter, 0.05 if end == "timed out" else None)
        if end == "answered":
            answer(kernel, port)
        elif end == "timed out":
            time.sleep(0.3)
        else:
            kernel.kill(port)
        assert waiter.done and (waiter.got or end == "receiver gone")
        gone = weakref.ref(waiter)
        del waiter
        assert gone() is None
    finally:
        gc.enable()
        kernel.shutdown()


# A Lua program for each way a process blocks, ended each way it can end.
BLOCKING = [
    "return sys.wait(sys.spawn{lua = 'return string.rep(\"r\", 1000)'})",
    "sys.spawn{lua = 'sys.send(args, 1)', args = sys.self()} return sys.recv{timeout_ms = 5000}",
    "local me = sys.self() local p = sys.spawn{lua = 'sys.sleep(20) sys.send(args, 1)', args = me} "
    "return sys.recv{from = p, timeout_ms = 5000}",
    "return sys.recv{timeout_ms = 10}",
    "sys.sleep(10) return true",
    "sys.lock.acquire('m') sys.sleep(30) sys.lock.release('m') return true",
    "sys.sleep(5) local got = sys.lock.acquire('m') sys.lock.release('m') return got",
    "sys.sleep(5) return sys.lock.acquire('m', {timeout_ms = 1})",
    "return sys.infer{prompt = 'hello', max_tokens = 4}",
]


def test_blocking_calls_leave_no_cyclic_garbage(tmp_path: pathlib.Path) -> None:
    """Every object of the kernel's that a blocked call made (its waiter, its process, an engine
    request's handle) is freed once the call and its process are over, without the cyclic
    collector: a cycle among them kept a process and what it waited for (its Lua state, a
    result, a message) until the collector ran."""
    kernel = Kernel(KernelConfig(data_dir=str(tmp_path), cpus=2))
    kernel.inference = Inference(kernel, EngineConfig(model="tiny", device="cpu", dtype="float32",
                                                      kv_memory_bytes=16 << 20, max_batch=4))
    kernel.add_runtime(LuaRuntime(kernel))
    kernel.start_recovered()
    gc.collect()
    gc.disable()
    try:
        pids = [kernel.spawn(SpawnSpec(lua=program)) for program in BLOCKING]
        deadline = time.monotonic() + 120
        while any(pid in kernel.procs for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the timer thread hands infer results over: let it finish its turn
        assert [(kernel.ended[pid].state, kernel.ended[pid].error) for pid in pids] == [("EXITED", None)] * len(pids)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                       if type(o).__module__.startswith("llmosd")})
        assert ours == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        kernel.shutdown()


def test_ended_records_are_out_of_the_cycle_collectors_sight(tmp_path: pathlib.Path) -> None:
    """The newest ended processes' records, which the kernel keeps for Wait and GetProcess, and
    their logs are not visited by the cycle collector (kernel/process.c says why that is safe),
    and read back whole, also after a full collection."""
    kernel = Kernel(KernelConfig(data_dir=str(tmp_path), cpus=1))
    kernel.add_runtime(LuaRuntime(kernel))
    kernel.start_recovered()
    try:
        program = 'sys.log("line " .. args) return {n = args, tags = {"a", "b"}}'
        pids = [kernel.spawn(SpawnSpec(lua=program, args=i)) for i in range(3)]
        deadline = time.monotonic() + 60
        while any(pid in kernel.procs for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        gc.collect()
        for i, pid in enumerate(pids):
            rec = kernel.ended[pid]
            assert not gc.is_tracked(rec) and not gc.is_tracked(rec.log)
            assert (rec.state, rec.result) == ("EXITED", {"n": i, "tags": ["a", "b"]})
            assert [line for _, line in rec.log] == [f"line {i}"]
            assert kernel.get(pid)[0].result == rec.result
    finally:
        kernel.shutdown()


def test_untrack_takes_any_objects() -> None:
    """_kernel.untrack leaves objects the collector does not track (an int, a str, one untracked
    already) as they are, and stops tracking the others."""
    from llmosd.native import _kernel

    tracked, untracked_already = [[]], {"a": 1}
    assert gc.is_tracked(tracked) and not gc.is_tracked(untracked_already)
    assert _kernel.untrack(tracked, untracked_already, 7, "text", None) is None
    assert _kernel.untrack() is None
    assert not gc.is_tracked(tracked) and tracked == [[]]

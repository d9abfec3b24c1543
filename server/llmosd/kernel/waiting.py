"""Blocking without threads: waiters and timers.

A syscall that cannot complete at once (recv, wait, sleep, infer) leaves a
Waiter behind. Whoever later makes it completable (a send, an exit, a timer)
calls `complete` under the kernel lock, exactly once. A Lua process's waiter
puts the process back on the run queue; an RPC's waiter resolves an asyncio
future. Neither holds an OS thread while waiting.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable, Protocol

from llmos.values import MAX_DURATION_MS

log = logging.getLogger(__name__)

TIMED_OUT = object()  # the value a waiter completes with when its timeout passes
MAX_DELAY_S = MAX_DURATION_MS / 1000  # the longest any timer waits ("for ever" to a caller)
MAX_WAIT_S = 60.0  # the longest the timer thread sleeps at once
MIN_SWEEP = 4096  # the heap's size below which cancelled timers are left to reach its top


class WaitQueue(Protocol):
    """Where a waiter waits: a plain list (a mailbox's receivers, a process's exit waiters), or a
    queue that keeps an order of its own or acts when a waiter leaves it (services/sync.py's lock
    queues, services/inference.py's engine requests)."""

    def append(self, entry: Any) -> None: ...

    def remove(self, entry: Any) -> None: ...


class Waiter:
    """One blocked syscall. Subclasses say how the blocked party is woken."""

    __slots__ = ("done", "timer", "queue", "entry")

    def __init__(self) -> None:
        self.done = False
        self.timer: Timer | None = None
        # Where the waiter is registered (a mailbox's receivers, a process's
        # exit waiters): it leaves when completed some other way. Whoever takes
        # it out sets `queue` to None. The entry often holds the waiter itself,
        # so it is dropped once out of the queue: a waiter in a cycle would keep
        # what it was woken with (a result, a message of megabytes) until the
        # cyclic collector ran.
        self.queue: WaitQueue | None = None
        self.entry: Any = None

    def register(self, queue: WaitQueue, entry: Any) -> None:
        self.queue, self.entry = queue, entry
        queue.append(entry)

    def leave(self) -> None:
        """Leave the queue the waiter is registered in, if it still is."""
        queue, entry, self.queue, self.entry = self.queue, self.entry, None, None
        if queue is not None:
            try:
                queue.remove(entry)
            except ValueError:
                pass

    def complete(self, value: Any) -> bool:
        """Wake the waiter with `value`; False if it was already completed.
        Callers hold the kernel lock."""
        if self.done:
            return False
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if self.queue is None:  # taken out by whoever completes it
            self.entry = None
        self._wake(value)
        return True

    def abandon(self) -> None:
        """Complete silently: the blocked party is gone (killed, cancelled)."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.leave()

    def _wake(self, value: Any) -> None:
        raise NotImplementedError


class AsyncWaiter(Waiter):
    """A waiter for an RPC handler running on an asyncio loop."""

    __slots__ = ("future", "loop", "value")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.value: Any = None  # kept so that a cancelled RPC can give a taken message back

    def _wake(self, value: Any) -> None:
        self.value = value
        self.loop.call_soon_threadsafe(_resolve, self.future, value)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


class Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback: Callable[[], None] | None = callback
        self.cancelled = False

    def cancel(self) -> None:
        # The callback goes at once: it holds its waiter, and the waiter what it was woken with (a
        # record, a message of megabytes), which would otherwise live on in the heap until the
        # deadline, an hour away for a Recv that asked for one and was answered at once.
        self.cancelled = True
        self.callback = None


class Timers:
    """One thread runs every timeout in the kernel, from a heap of deadlines.

    Nothing a caller passes can stop it: a delay is clamped to [0, MAX_DELAY_S]
    (callers have refused NaN and clamped what they were given already, see
    checks.py), the thread never sleeps longer than a minute at a time, and a
    callback that raises is logged and the others go on.
    """

    def time_out(self, lock: threading.Lock, waiter: Waiter, timeout_s: float | None) -> None:
        """Complete `waiter` with TIMED_OUT after `timeout_s` (None: never) unless
        it completes first. `lock` is the kernel lock, taken to complete it."""
        if timeout_s is None:
            return

        def expire() -> None:
            with lock:
                if not waiter.done:
                    waiter.leave()
                    waiter.complete(TIMED_OUT)

        waiter.timer = self.call_later(max(timeout_s, 0.0), expire)

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        # Cancelled timers stay in the heap until they reach its top, or until it has grown to
        # this size: then they are swept out (amortised O(1) a timer, like a growing array), so
        # calls answered long before their timeouts cannot pile up entries without bound.
        self._sweep_at = MIN_SWEEP
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
        self._thread.start()

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        if not seconds >= 0:  # NaN too
            seconds = 0.0
        timer = Timer(time.monotonic() + min(seconds, MAX_DELAY_S), callback)
        with self._cond:
            heap = self._heap
            if len(heap) >= self._sweep_at:
                heap[:] = [entry for entry in heap if not entry[2].cancelled]
                heapq.heapify(heap)
                self._sweep_at = max(MIN_SWEEP, 2 * len(heap))
            heapq.heappush(heap, (timer.deadline, next(self._seq), timer))
            if heap[0][2] is timer:
                self._cond.notify()
        return timer

    def __len__(self) -> int:
        """Entries in the heap, cancelled ones not yet swept out included."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                        continue
                    delay = self._heap[0][0] - time.monotonic() if self._heap else MAX_WAIT_S
                    if delay <= 0:
                        break
                    self._cond.wait(min(delay, MAX_WAIT_S))
                if self._stopped:
                    return
                callback = heapq.heappop(self._heap)[2].callback
            if callback is None:  # cancelled since the loop above looked
                continue
            try:
                callback()
            except Exception:  # one timeout's trouble must not end every other's
                log.exception("a timer's callback failed")
            # Not kept while the thread sleeps until the next deadline: it holds its waiter.
            callback = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

"""Named mutexes and counting semaphores, one set per namespace.

A lock is identified by (namespace, name) and exists only while someone holds
or waits for it: the first acquire creates it, and it disappears when the last
holder releases with nobody waiting. Processes in different namespaces never
share a lock, whatever the name.

Every method of SyncTable is called with the kernel lock held (the lock passed
to the constructor), so the table keeps no lock of its own; its timers take
that same lock before touching anything. A blocked acquire leaves a Waiter in
the lock's queue; whoever frees a permit completes the best waiter with
`waiter.complete(answer)`. A waiter that times out, or is abandoned (its
process killed, its RPC cancelled), leaves the queue through `Waiter.leave`,
which this module's queue type turns into an index update, so nothing is left
behind to be woken by mistake.

Semantics:
- Waiters are served by priority (higher int first), FIFO within a priority.
  The priority is the one given to `acquire`; a later change of the process's
  priority does not reorder a waiter already queued.
- A freed permit goes straight to the head waiter (handoff), never back to a
  pool that a newcomer could grab first: a holder that releases and at once
  acquires again queues behind those already waiting, so acquisitions are fair.
- A mutex is held by one pid; acquiring a mutex one already holds is an error
  (FailedPrecondition) rather than a self-deadlock. A semaphore has N permits
  fixed by the call that creates it; one pid may hold several, and each release
  gives back one. An acquire whose kind or N disagrees with the lock as it
  exists is an error (FailedPrecondition); once the lock is unused (no holder,
  no waiter) it is forgotten and the next acquire may create it anew.
- When a holder ends, `process_ended(pid)` frees what it held and the waiters
  granted those permits are told, as Erlang tells a monitor:
  {"acquired": True, "previous_holder_died": pid}. Only waiters queued at that
  moment learn it; a later acquirer finds a free lock.
"""
from __future__ import annotations

import bisect
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from ..api import checks as C
from ..api.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from ..kernel.waiting import Timers, Waiter

MUTEX = "mutex"
SEMAPHORE = "semaphore"
MAX_PERMITS = 1_000_000
MAX_HELD_PER_PROCESS = 10_000  # permits one pid may hold at once, all locks together

Key = tuple[str, str]  # (namespace, name)


class _Entry:
    """A queued acquire. Compared by identity, ordered by `order`."""

    __slots__ = ("waiter", "pid", "key", "order")

    def __init__(self, waiter: Waiter, pid: int, key: Key, order: tuple[int, int]) -> None:
        self.waiter = waiter
        self.pid = pid
        self.key = key
        self.order = order  # (-priority, arrival): the smallest is served first


def _order(entry: _Entry) -> tuple[int, int]:
    return entry.order


class _Queue(list):
    """A lock's waiters, best first. `Waiter.register` appends and `Waiter.leave`
    removes; both go through here, so order and the table's index stay right
    however a waiter leaves (granted, timed out, abandoned)."""

    __slots__ = ("table",)

    def __init__(self, table: SyncTable) -> None:
        super().__init__()
        self.table = table

    def append(self, entry: _Entry) -> None:
        bisect.insort(self, entry, key=_order)

    def remove(self, entry: _Entry) -> None:
        super().remove(entry)
        self.table._forget_waiting(entry)


@dataclass(eq=False, slots=True)
class _Lock:
    kind: str
    permits: int
    available: int
    queue: _Queue
    holders: dict[int, int] = field(default_factory=dict)  # pid -> permits held


class SyncTable:
    """All named locks of a kernel. Call every method with `lock` held."""

    def __init__(self, lock: threading.Lock, timers: Timers) -> None:
        self._lock = lock
        self._timers = timers
        self._locks: dict[Key, _Lock] = {}
        self._held: dict[int, dict[Key, int]] = {}  # pid -> lock -> permits held
        self._held_total: dict[int, int] = {}  # pid -> permits held, all locks
        self._waiting: dict[int, set[_Entry]] = {}  # pid -> its queued acquires
        self._arrivals = itertools.count()

    # -- the calls --------------------------------------------------------------------------
    def acquire(self, namespace: str, name: str, pid: int, priority: int, waiter: Waiter,
                timeout_s: float | None, kind: str = MUTEX, permits: int = 1) -> dict[str, Any] | None:
        """Acquire now and return the answer, or queue `waiter` and return None.

        The waiter is later completed with the answer dict, or with TIMED_OUT
        once `timeout_s` passes (None: wait without limit)."""
        if timeout_s is not None and not timeout_s >= 0:
            raise InvalidArgument("timeout must be a non-negative number of seconds")
        if type(priority) is not int:
            raise InvalidArgument("priority must be an integer")
        key, lock = self._lock_for(namespace, name, kind, permits)
        answer = self._take(key, lock, pid)
        if answer is not None:
            return answer
        entry = _Entry(waiter, pid, key, (-priority, next(self._arrivals)))
        self._waiting.setdefault(pid, set()).add(entry)
        waiter.register(lock.queue, entry)
        self._timers.time_out(self._lock, waiter, timeout_s)
        return None

    def try_acquire(self, namespace: str, name: str, pid: int, kind: str = MUTEX,
                    permits: int = 1) -> dict[str, Any] | None:
        """Acquire if a permit is free now: the answer dict, or None if busy."""
        key, lock = self._lock_for(namespace, name, kind, permits)
        return self._take(key, lock, pid)

    def release(self, namespace: str, name: str, pid: int) -> None:
        """Give back one permit `pid` holds; the best waiter gets it at once."""
        key = (namespace, name)
        lock = self._locks.get(key)
        if lock is None or pid not in lock.holders:
            raise FailedPrecondition(f"pid {pid} does not hold the lock {name!r}")
        self._drop(key, lock, pid, 1)
        self._hand_over(key, lock, 1, None)

    def process_ended(self, pid: int) -> None:
        """`pid` has ended: withdraw its queued acquires (abandoning their waiters)
        and free every permit it held, telling whoever gets them."""
        for entry in list(self._waiting.pop(pid, ())):
            entry.waiter.abandon()
        self._held_total.pop(pid, None)
        for key, count in self._held.pop(pid, {}).items():
            lock = self._locks[key]
            del lock.holders[pid]
            self._hand_over(key, lock, count, pid)

    def info(self, namespace: str, name: str) -> dict[str, Any]:
        """A lock's state. A name nobody holds or waits for has no kind yet:
        only name, holders (empty) and waiters (empty)."""
        lock = self._locks.get((namespace, name))
        if lock is None:
            return {"name": name, "holders": [], "waiters": []}
        return {
            "name": name, "kind": lock.kind, "permits": lock.permits, "available": lock.available,
            "holders": sorted(lock.holders), "waiters": [e.pid for e in lock.queue],
        }

    # -- inside -----------------------------------------------------------------------------
    def _lock_for(self, namespace: str, name: str, kind: str, permits: int) -> tuple[Key, _Lock]:
        C.name(name, "lock name")
        if kind not in (MUTEX, SEMAPHORE):
            raise InvalidArgument(f"a lock is a {MUTEX!r} or a {SEMAPHORE!r}, not {kind!r}")
        if type(permits) is not int or not 1 <= permits <= MAX_PERMITS:
            raise InvalidArgument(f"a semaphore has 1 to {MAX_PERMITS} permits")
        if kind == MUTEX and permits != 1:
            raise InvalidArgument("a mutex has exactly one permit; ask for a semaphore for more")
        key = (namespace, name)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = _Lock(kind, permits, permits, _Queue(self))
        elif lock.kind != kind:
            raise FailedPrecondition(f"{name!r} is in use as a {lock.kind}; it cannot be acquired as a {kind}")
        elif lock.permits != permits:
            raise FailedPrecondition(
                f"semaphore {name!r} has {lock.permits} permits, not {permits}; its size is fixed while "
                "anyone holds or waits for it")
        return key, lock

    def _take(self, key: Key, lock: _Lock, pid: int) -> dict[str, Any] | None:
        if lock.kind == MUTEX and pid in lock.holders:
            raise FailedPrecondition(f"pid {pid} already holds the mutex {key[1]!r}")
        if self._held_total.get(pid, 0) >= MAX_HELD_PER_PROCESS:
            self._forget_if_unused(key, lock)
            raise ResourceExhausted(f"pid {pid} holds {MAX_HELD_PER_PROCESS} permits already; release some first")
        if lock.available == 0:  # then, and only then, others may be waiting
            return None
        lock.available -= 1
        self._grant(key, lock, pid)
        return {"acquired": True}

    def _grant(self, key: Key, lock: _Lock, pid: int) -> None:
        lock.holders[pid] = lock.holders.get(pid, 0) + 1
        held = self._held.setdefault(pid, {})
        held[key] = held.get(key, 0) + 1
        self._held_total[pid] = self._held_total.get(pid, 0) + 1

    def _drop(self, key: Key, lock: _Lock, pid: int, count: int) -> None:
        left = lock.holders[pid] - count
        held = self._held[pid]
        if left:
            lock.holders[pid] = held[key] = left
        else:
            del lock.holders[pid], held[key]
            if not held:
                del self._held[pid]
        total = self._held_total[pid] - count
        if total:
            self._held_total[pid] = total
        else:
            del self._held_total[pid]

    def _hand_over(self, key: Key, lock: _Lock, count: int, died: int | None) -> None:
        """Give `count` freed permits to the best waiters; keep the rest free."""
        answer: dict[str, Any] = {"acquired": True}
        if died is not None:
            answer["previous_holder_died"] = died
        queue = lock.queue
        while count and queue:
            entry = queue[0]
            waiter = entry.waiter
            if waiter.done:  # completed by someone else without leaving: just drop it
                waiter.leave()
                continue
            # Grant before leaving, so that the lock never looks unused and is forgotten.
            self._grant(key, lock, entry.pid)
            waiter.leave()
            waiter.complete(dict(answer))
            count -= 1
        lock.available += count
        self._forget_if_unused(key, lock)

    def _forget_waiting(self, entry: _Entry) -> None:
        """An entry left its queue (called by _Queue.remove)."""
        mine = self._waiting.get(entry.pid)
        if mine is not None:
            mine.discard(entry)
            if not mine:
                del self._waiting[entry.pid]
        lock = self._locks.get(entry.key)
        if lock is not None:
            self._forget_if_unused(entry.key, lock)

    def _forget_if_unused(self, key: Key, lock: _Lock) -> None:
        # Identity check: a handover whose queue held only stale waiters has had
        # its lock forgotten already, when the last of them left.
        if not lock.holders and not lock.queue and self._locks.get(key) is lock:
            del self._locks[key]

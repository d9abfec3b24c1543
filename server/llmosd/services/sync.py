"""Named mutexes, counting semaphores and condition variables, one set per namespace.

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

Condition variables (`cond_wait`, `cond_signal`, `cond_broadcast`), named like
locks and, like them, existing only while someone waits:
- `cond_wait(cond, lock)` needs the caller to hold the mutex `lock`
  (FailedPrecondition otherwise, and for a semaphore). Under the kernel lock it
  releases the mutex (handing it to the best waiter) and queues the caller on
  the condition: nothing can signal in between, so no signal is lost.
- A signal takes the best waiter (priority, then FIFO, as for locks) off the
  condition and queues it for the mutex; a broadcast does so for all of them,
  in their order. The timeout covers only the wait for a signal; a waiter that
  times out queues for the mutex the same way. Either way the waiter returns
  holding the mutex again, with {"signalled": bool, "timed_out": bool} (and
  "previous_holder_died" as for acquire).
- Wake-ups are never spurious: a waiter returns signalled only when a signal
  or broadcast chose it, and otherwise only because its timeout passed (or it
  ends: a killed waiter leaves both queues). What was signalled may still have
  changed by the time the mutex is back (another holder may run first), so a
  program re-checks its predicate in a loop, as with any condition variable.
- While a condition has waiters, they all wait with the same mutex: waiting on
  it with another is FailedPrecondition.
- A durable process's wait is journaled (kernel/journal.py's on_woken): `on_woken` tells it,
  under the kernel lock, the moment a signal or its timeout chooses it, so that
  its journal has the wake before anything that follows from it; a signaller
  passes `effects` to take the wake's journal ops into its own entry's unit.
"""
from __future__ import annotations

import bisect
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..api import checks as C
from ..api.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from ..kernel.waiting import Timers, Waiter

MUTEX = "mutex"
SEMAPHORE = "semaphore"
MAX_PERMITS = 1_000_000
MAX_HELD_PER_PROCESS = 10_000  # permits one pid may hold at once, all locks together

Key = tuple[str, str]  # (namespace, name)
# A durable waiter's wake (a condition's): called with {"signalled", "timed_out"} and the list a
# signaller gathers the journal ops of the wakes it made into (None: the waiter's own unit).
OnWoken = Callable[[dict[str, bool], "list | None"], None]


class _Entry:
    """A queued acquire, or a condition's waiter. Compared by identity, ordered by `order`."""

    __slots__ = ("waiter", "pid", "key", "order", "answer", "on_woken", "takes_mutex")

    def __init__(self, waiter: Waiter, pid: int, key: Key, order: tuple[int, int],
                 answer: dict[str, Any] | None = None, on_woken: OnWoken | None = None,
                 takes_mutex: bool = True) -> None:
        self.waiter = waiter
        self.pid = pid
        self.key = key  # the lock's (for a condition's waiter: the condition's)
        self.order = order  # (-priority, arrival): the smallest is served first
        self.answer = answer  # what the waiter is told once it holds the lock (None: {"acquired": True})
        self.on_woken = on_woken  # a condition's durable waiter's: its wake, journaled
        self.takes_mutex = takes_mutex  # False: a durable process's place held from a restart (cond_wait)


def _order(entry: _Entry) -> tuple[int, int]:
    return entry.order


class _Queue:
    """A lock's waiters, best first: the WaitQueue (waiting.py) its waiters register in.
    Waiter.register appends and Waiter.leave removes, so order and the table's index stay
    right however a waiter leaves (granted, timed out, abandoned)."""

    __slots__ = ("entries", "table")

    def __init__(self, table: SyncTable) -> None:
        self.entries: list[_Entry] = []
        self.table = table

    def append(self, entry: _Entry) -> None:
        bisect.insort(self.entries, entry, key=_order)

    def remove(self, entry: _Entry) -> None:
        self.entries.remove(entry)
        self.table._forget_waiting(entry)


class _CondQueue(_Queue):
    """A condition's waiters, best first."""

    __slots__ = ("cond",)

    def remove(self, entry: _Entry) -> None:
        self.entries.remove(entry)
        self.table._forget_cond_waiter(self.cond, entry)


@dataclass(eq=False, slots=True)
class _Cond:
    lock: str  # the mutex its waiters hold when not waiting
    queue: _CondQueue
    timers: dict[_Entry, Any] = field(default_factory=dict)  # waiter -> its timeout (waits with one)


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
        self._conds: dict[Key, _Cond] = {}
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
            "holders": sorted(lock.holders), "waiters": [e.pid for e in lock.queue.entries],
        }

    # -- condition variables ----------------------------------------------------------------
    def cond_wait(self, namespace: str, name: str, lock_name: str, pid: int, priority: int, waiter: Waiter,
                  timeout_s: float | None, on_woken: OnWoken | None = None, holding: bool = True,
                  takes_mutex: bool = True) -> None:
        """Release the mutex `lock_name` that `pid` holds and queue `waiter` on the condition
        `name`, atomically. The waiter is completed once it holds the mutex again, with
        {"signalled": bool, "timed_out": bool} (see the module's docstring). `holding` False: a
        durable process replayed to a wait that had released the mutex before a restart, which
        waits again holding nothing. `takes_mutex` False: the place of such a wait, held from the
        restart until its replay reaches it (kernel/journal.py, rule 5), completed at the wake."""
        if timeout_s is not None and not timeout_s >= 0:
            raise InvalidArgument("timeout must be a non-negative number of seconds")
        if type(priority) is not int:
            raise InvalidArgument("priority must be an integer")
        C.name(name, "condition name")
        C.name(lock_name, "lock name")
        lock_key, key = (namespace, lock_name), (namespace, name)
        lock = self._locks.get(lock_key)
        if holding and (lock is None or pid not in lock.holders):
            raise FailedPrecondition(f"pid {pid} does not hold the lock {lock_name!r} it would wait with")
        if lock is not None and lock.kind != MUTEX:
            raise FailedPrecondition(f"{lock_name!r} is a {lock.kind}; a condition waits with a mutex")
        cond = self._conds.get(key)
        if cond is None:
            cond = self._conds[key] = _Cond(lock_name, _CondQueue(self))
            cond.queue.cond = cond
        elif cond.lock != lock_name:
            raise FailedPrecondition(
                f"the waiters of condition {name!r} wait with the lock {cond.lock!r}, not {lock_name!r}")
        entry = _Entry(waiter, pid, key, (-priority, next(self._arrivals)), on_woken=on_woken, takes_mutex=takes_mutex)
        self._waiting.setdefault(pid, set()).add(entry)
        waiter.register(cond.queue, entry)
        if holding:
            self.release(namespace, lock_name, pid)
        if timeout_s is not None:
            waiter.timer = cond.timers[entry] = self._timers.call_later(
                timeout_s, lambda: self._cond_timed_out(cond, entry))

    def cond_signal(self, namespace: str, name: str, effects: list | None = None) -> int:
        """Wake the best waiter of the condition `name`: how many were woken (0 or 1). `effects`:
        where durable waiters' wakes put their journal ops (a durable signaller's unit)."""
        return self._wake_cond(namespace, name, 1, effects)

    def cond_broadcast(self, namespace: str, name: str, effects: list | None = None) -> int:
        """Wake every waiter of the condition `name`, best first: how many were woken."""
        return self._wake_cond(namespace, name, None, effects)

    def cond_reacquire(self, namespace: str, lock_name: str, pid: int, priority: int, waiter: Waiter,
                       answer: dict[str, bool]) -> dict[str, Any] | None:
        """A durable process replayed to a wait that was woken before a restart: queue `waiter` for
        the mutex; `answer` (and previous_holder_died) once it holds it, now or later (None)."""
        return self._queue_for_mutex(namespace, lock_name, pid, -priority, waiter, answer)

    def _wake_cond(self, namespace: str, name: str, count: int | None, effects: list | None) -> int:
        C.name(name, "condition name")
        cond = self._conds.get((namespace, name))
        woken = 0
        while cond is not None and cond.queue.entries and (count is None or woken < count):
            entry = cond.queue.entries[0]
            if entry.waiter.done:  # completed by someone else without leaving: just drop it
                entry.waiter.leave()
                continue
            timer = cond.timers.pop(entry, None)
            if timer is not None:
                timer.cancel()
            self._reacquire(cond, entry, True, effects)
            woken += 1
        return woken

    def _cond_timed_out(self, cond: _Cond, entry: _Entry) -> None:
        with self._lock:
            if cond.timers.pop(entry, None) is not None and entry.waiter.queue is cond.queue:
                self._reacquire(cond, entry, False, None)

    def _reacquire(self, cond: _Cond, entry: _Entry, signalled: bool, effects: list | None) -> None:
        """Move a condition's waiter to its mutex: it is completed once it holds it."""
        waiter = entry.waiter
        waiter.leave()
        waiter.timer = None  # it waits for the mutex without limit, as pthread_cond_timedwait does
        answer = {"signalled": signalled, "timed_out": not signalled}
        if entry.on_woken is not None:
            entry.on_woken(answer, effects)
        if not entry.takes_mutex:
            waiter.complete(answer)
            return
        answer = self._queue_for_mutex(entry.key[0], cond.lock, entry.pid, entry.order[0], waiter, answer)
        if answer is not None:
            waiter.complete(answer)

    def _queue_for_mutex(self, namespace: str, lock_name: str, pid: int, rank: int, waiter: Waiter,
                         answer: dict[str, Any]) -> Any:
        """Grant the mutex to a woken waiter now (its answer, or the error that it cannot be had), or
        queue `waiter` for it with `answer` (None)."""
        try:
            key, lock = self._lock_for(namespace, lock_name, MUTEX, 1)
        except FailedPrecondition as e:  # the name became a semaphore's meanwhile
            return e
        if lock.available:
            lock.available -= 1
            self._grant(key, lock, pid)
            return answer
        queued = _Entry(waiter, pid, key, (rank, next(self._arrivals)), answer)
        self._waiting.setdefault(pid, set()).add(queued)
        waiter.register(lock.queue, queued)
        return None

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
        queue = lock.queue.entries
        while count and queue:
            entry = queue[0]
            waiter = entry.waiter
            if waiter.done:  # completed by someone else without leaving: just drop it
                waiter.leave()
                continue
            # Grant before leaving, so that the lock never looks unused and is forgotten.
            self._grant(key, lock, entry.pid)
            waiter.leave()
            answer = dict(entry.answer) if entry.answer is not None else {"acquired": True}
            if died is not None:
                answer["previous_holder_died"] = died
            waiter.complete(answer)
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

    def _forget_cond_waiter(self, cond: _Cond, entry: _Entry) -> None:
        """A waiter left a condition's queue (called by _CondQueue.remove)."""
        mine = self._waiting.get(entry.pid)
        if mine is not None:
            mine.discard(entry)
            if not mine:
                del self._waiting[entry.pid]
        timer = cond.timers.pop(entry, None)
        if timer is not None:
            timer.cancel()
        if not cond.queue.entries and self._conds.get(entry.key) is cond:
            del self._conds[entry.key]

    def _forget_if_unused(self, key: Key, lock: _Lock) -> None:
        # Identity check: a handover whose queue held only stale waiters has had
        # its lock forgotten already, when the last of them left.
        if not lock.holders and not lock.queue.entries and self._locks.get(key) is lock:
            del self._locks[key]

"""Unit tests of llmosd.services.sync: named mutexes and semaphores, with real threads
as the blocked parties and the kernel's own Timers for timeouts."""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pytest

from llmosd.api import checks as CHECKS
from llmosd.services import sync as S
from llmosd.api.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from llmosd.services.sync import SEMAPHORE, SyncTable
from llmosd.kernel.waiting import TIMED_OUT, Timers, Waiter

NS = "default"


class EventWaiter(Waiter):
    """A blocked party that is a thread waiting on an Event."""

    __slots__ = ("event", "value", "wakes")

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()
        self.value: Any = None
        self.wakes = 0

    def _wake(self, value: Any) -> None:
        self.wakes += 1
        self.value = value
        self.event.set()

    def result(self, timeout: float = 5.0) -> Any:
        assert self.event.wait(timeout), "waiter was never woken"
        return self.value


class Harness:
    """A SyncTable with the lock and timers a kernel would give it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.timers = Timers()
        self.table = SyncTable(self.lock, self.timers)

    def acquire(self, name: str, pid: int, priority: int = 0, timeout_s: float | None = None,
                ns: str = NS, **kw: Any) -> tuple[dict | None, EventWaiter]:
        waiter = EventWaiter()
        with self.lock:
            answer = self.table.acquire(ns, name, pid, priority, waiter, timeout_s, **kw)
        return answer, waiter

    def call(self, method: str, *args: Any, **kw: Any) -> Any:
        with self.lock:
            return getattr(self.table, method)(*args, **kw)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.timers.stop()


def test_uncontended_acquire_release_and_forgetting(h: Harness) -> None:
    answer, _ = h.acquire("a", 1)
    assert answer == {"acquired": True}
    info = h.call("info", NS, "a")
    assert info == {"name": "a", "kind": "mutex", "permits": 1, "available": 0, "holders": [1], "waiters": []}
    h.call("release", NS, "a", 1)
    assert h.call("info", NS, "a") == {"name": "a", "holders": [], "waiters": []}
    assert h.table._locks == {} and h.table._held == {} and h.table._waiting == {}


def test_release_without_holding_is_refused(h: Harness) -> None:
    with pytest.raises(FailedPrecondition, match="does not hold"):
        h.call("release", NS, "nobody", 1)
    h.acquire("a", 1)
    with pytest.raises(FailedPrecondition, match="pid 2 does not hold"):
        h.call("release", NS, "a", 2)
    with pytest.raises(FailedPrecondition):
        h.call("release", "other-namespace", "a", 1)
    h.call("release", NS, "a", 1)
    with pytest.raises(FailedPrecondition):
        h.call("release", NS, "a", 1)


def test_mutex_is_not_reentrant(h: Harness) -> None:
    h.acquire("a", 1)
    with pytest.raises(FailedPrecondition, match="already holds"):
        h.acquire("a", 1)
    assert h.call("info", NS, "a")["waiters"] == []


def test_try_acquire_never_queues(h: Harness) -> None:
    assert h.call("try_acquire", NS, "a", 1) == {"acquired": True}
    assert h.call("try_acquire", NS, "a", 2) is None
    assert h.call("info", NS, "a")["waiters"] == []
    h.call("release", NS, "a", 1)
    assert h.call("try_acquire", NS, "a", 2) == {"acquired": True}


def test_namespaces_do_not_share_locks(h: Harness) -> None:
    assert h.acquire("a", 1, ns="one")[0] == {"acquired": True}
    assert h.acquire("a", 2, ns="two")[0] == {"acquired": True}
    assert h.call("info", "one", "a")["holders"] == [1]
    assert h.call("info", "two", "a")["holders"] == [2]


@pytest.mark.parametrize("kwargs, error", [
    (dict(name=""), InvalidArgument),
    (dict(name="x" * (CHECKS.MAX_NAME_LEN + 1)), InvalidArgument),
    (dict(name="bad\nname"), InvalidArgument),
    (dict(kind="rwlock"), InvalidArgument),
    (dict(kind=SEMAPHORE, permits=0), InvalidArgument),
    (dict(kind=SEMAPHORE, permits=S.MAX_PERMITS + 1), InvalidArgument),
    (dict(kind=SEMAPHORE, permits=True), InvalidArgument),
    (dict(permits=2), InvalidArgument),
    (dict(timeout_s=-1.0), InvalidArgument),
    (dict(timeout_s=float("nan")), InvalidArgument),
    (dict(priority=1.5), InvalidArgument),
])
def test_bad_arguments(h: Harness, kwargs: dict, error: type) -> None:
    name = kwargs.pop("name", "a")
    with pytest.raises(error):
        h.acquire(name, 1, **kwargs)
    assert h.table._locks == {}


def test_waiters_are_served_by_priority_then_fifo(h: Harness) -> None:
    """Real threads block on their waiters; each, once granted, records itself
    and releases, which hands the lock to the next in line."""
    assert h.acquire("a", 1)[0] is not None
    order: list[int] = []
    queued = [(2, 0), (3, 5), (4, 0), (5, 5), (6, -1), (7, 10), (8, 0)]  # (pid, priority), in arrival order
    threads = []
    for pid, prio in queued:
        answer, waiter = h.acquire("a", pid, prio)
        assert answer is None

        def run(pid: int = pid, waiter: EventWaiter = waiter) -> None:
            assert waiter.result() == {"acquired": True}
            order.append(pid)
            h.call("release", NS, "a", pid)

        threads.append(threading.Thread(target=run))
    for t in threads:
        t.start()
    assert h.call("info", NS, "a")["waiters"] == [7, 3, 5, 2, 4, 8, 6]
    h.call("release", NS, "a", 1)
    for t in threads:
        t.join(5)
    assert order == [7, 3, 5, 2, 4, 8, 6]
    assert h.table._locks == {}


def test_release_hands_over_instead_of_letting_the_releaser_barge(h: Harness) -> None:
    h.acquire("a", 1)
    _, waiter2 = h.acquire("a", 2)
    h.call("release", NS, "a", 1)
    # Pid 1 comes straight back, but pid 2 was waiting: pid 2 has the lock.
    answer, waiter1 = h.acquire("a", 1)
    assert answer is None
    assert waiter2.result() == {"acquired": True}
    assert h.call("info", NS, "a")["holders"] == [2]
    assert h.call("info", NS, "a")["waiters"] == [1]


def test_timeout_leaves_the_queue_and_loses_no_wakeup(h: Harness) -> None:
    h.acquire("a", 1)
    _, short = h.acquire("a", 2, timeout_s=0.05)
    _, patient = h.acquire("a", 3, timeout_s=10.0)
    assert short.result() is TIMED_OUT
    assert h.call("info", NS, "a")["waiters"] == [3]
    h.call("release", NS, "a", 1)
    assert patient.result() == {"acquired": True}
    assert patient.timer is not None and patient.timer.cancelled
    h.call("release", NS, "a", 3)
    assert h.table._locks == {} and h.table._waiting == {}
    assert short.wakes == 1 and patient.wakes == 1


def test_timeout_of_the_only_waiter_after_the_holder_left_forgets_nothing_wrongly(h: Harness) -> None:
    h.acquire("a", 1)
    _, w = h.acquire("a", 2, timeout_s=0.02)
    assert w.result() is TIMED_OUT
    h.call("release", NS, "a", 1)
    assert h.table._locks == {}


def test_timeouts_racing_releases_complete_each_waiter_exactly_once(h: Harness) -> None:
    """Whether the timer or the release wins, the waiter is woken once and the lock ends up held by it
    exactly when it was told it acquired."""
    waiters = []
    for i in range(40):
        name = f"race-{i}"
        h.acquire(name, 1)
        _, w = h.acquire(name, 2, timeout_s=0.002)
        time.sleep(0.002)
        h.call("release", NS, name, 1)
        value = w.result()
        waiters.append(w)
        if value is TIMED_OUT:  # nobody holds it, and it is forgotten
            assert name not in {k[1] for k in h.table._locks}
        else:
            assert value == {"acquired": True}
            assert h.call("info", NS, name)["holders"] == [2]
            h.call("release", NS, name, 2)
    # by now every timer is past due: the loser of each race (timer or release) woke no one again
    assert [w.wakes for w in waiters] == [1] * 40
    assert h.table._locks == {} and h.table._waiting == {} and h.table._held == {}


def test_abandoned_waiter_leaves_the_queue(h: Harness) -> None:
    h.acquire("a", 1)
    _, gone = h.acquire("a", 2, timeout_s=5.0)
    _, next_one = h.acquire("a", 3)
    with h.lock:
        gone.abandon()  # what the kernel does when a blocked process is killed
    assert h.call("info", NS, "a")["waiters"] == [3]
    h.call("release", NS, "a", 1)
    assert next_one.result() == {"acquired": True}
    assert gone.wakes == 0 and gone.timer.cancelled


def test_holder_death_hands_the_lock_over_with_a_notice(h: Harness) -> None:
    h.acquire("a", 1)
    h.acquire("b", 1)
    _, w2 = h.acquire("a", 2, priority=1)
    _, w3 = h.acquire("a", 3)
    h.call("process_ended", 1)
    assert w2.result() == {"acquired": True, "previous_holder_died": 1}
    assert not w3.event.is_set()
    assert h.call("info", NS, "b") == {"name": "b", "holders": [], "waiters": []}
    h.call("release", NS, "a", 2)
    assert w3.result() == {"acquired": True}  # pid 2 released normally: no notice
    assert h.call("info", NS, "a")["holders"] == [3]


def test_a_dead_waiter_is_withdrawn_from_every_queue(h: Harness) -> None:
    h.acquire("a", 1)
    h.acquire("b", 2)
    _, w2 = h.acquire("a", 2, timeout_s=5.0)
    _, w3 = h.acquire("b", 3)
    h.call("process_ended", 2)
    assert w2.done and w2.wakes == 0 and w2.timer.cancelled
    assert w3.result() == {"acquired": True, "previous_holder_died": 2}
    assert h.call("info", NS, "a")["waiters"] == []
    h.call("release", NS, "a", 1)
    assert h.call("info", NS, "a")["holders"] == []


def test_semaphore_counts_permits(h: Harness) -> None:
    sem = dict(kind=SEMAPHORE, permits=3)
    assert [h.acquire("s", pid, **sem)[0] for pid in (1, 2, 2)] == [{"acquired": True}] * 3
    info = h.call("info", NS, "s")
    assert (info["kind"], info["permits"], info["available"], info["holders"]) == ("semaphore", 3, 0, [1, 2])
    answer, w4 = h.acquire("s", 4, **sem)
    assert answer is None
    h.call("release", NS, "s", 2)
    assert w4.result() == {"acquired": True}
    assert h.call("info", NS, "s")["holders"] == [1, 2, 4]
    for pid in (1, 2, 4):
        h.call("release", NS, "s", pid)
    with pytest.raises(FailedPrecondition):
        h.call("release", NS, "s", 2)
    assert h.table._locks == {}


def test_semaphore_size_and_kind_must_agree_while_in_use(h: Harness) -> None:
    h.acquire("s", 1, kind=SEMAPHORE, permits=2)
    with pytest.raises(FailedPrecondition, match="has 2 permits, not 5"):
        h.acquire("s", 2, kind=SEMAPHORE, permits=5)
    with pytest.raises(FailedPrecondition, match="in use as a semaphore"):
        h.acquire("s", 2)
    h.acquire("m", 1)
    with pytest.raises(FailedPrecondition, match="in use as a mutex"):
        h.call("try_acquire", NS, "m", 2, SEMAPHORE, 1)
    h.call("release", NS, "s", 1)
    # Unused, it is forgotten: a new size is fine now.
    assert h.acquire("s", 2, kind=SEMAPHORE, permits=5)[0] == {"acquired": True}
    assert h.call("info", NS, "s")["permits"] == 5


def test_semaphore_holder_death_frees_every_permit_it_held(h: Harness) -> None:
    sem = dict(kind=SEMAPHORE, permits=3)
    for pid in (1, 1, 2):
        h.acquire("s", pid, **sem)
    waiters = [h.acquire("s", pid, **sem)[1] for pid in (3, 4, 5)]
    h.call("process_ended", 1)
    assert waiters[0].result() == {"acquired": True, "previous_holder_died": 1}
    assert waiters[1].result() == {"acquired": True, "previous_holder_died": 1}
    assert not waiters[2].event.is_set()
    assert h.call("info", NS, "s")["holders"] == [2, 3, 4]
    h.call("process_ended", 2)
    assert waiters[2].result() == {"acquired": True, "previous_holder_died": 2}
    h.call("process_ended", 3)
    info = h.call("info", NS, "s")
    assert info["holders"] == [4, 5] and info["available"] == 1


def test_permits_held_per_process_are_bounded(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "MAX_HELD_PER_PROCESS", 2)
    h.acquire("a", 1)
    h.acquire("b", 1)
    with pytest.raises(ResourceExhausted, match="release some first"):
        h.acquire("c", 1)
    assert ("default", "c") not in h.table._locks
    h.call("release", NS, "a", 1)
    assert h.acquire("c", 1)[0] == {"acquired": True}


class Occupancy:
    """What holders report as they enter and leave a critical section outside the table's lock: how many
    were inside at once, at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside: set[int] = set()
        self.most = 0

    def enter(self, pid: int) -> None:
        with self._lock:
            self.inside.add(pid)
            self.most = max(self.most, len(self.inside))

    def leave(self, pid: int) -> None:
        with self._lock:
            self.inside.remove(pid)


def hammer(h: Harness, name: str, threads_n: int, rounds: int, occupancy: Occupancy, **options: Any) -> list[int]:
    """`threads_n` threads (pids 100...) each acquire `name`, stay inside a while (yielding to the others,
    which are free to barge in if the table lets them), leave and release, `rounds` times. Returns how
    many rounds each completed; fails the test if a thread raised or never finished."""
    counts = [0] * threads_n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        pid = 100 + i
        try:
            for _ in range(rounds):
                answer, waiter = h.acquire(name, pid, **options)
                if answer is None:
                    assert waiter.result(10) == {"acquired": True}
                occupancy.enter(pid)
                time.sleep(0)  # hand the interpreter to the others while inside
                occupancy.leave(pid)
                counts[i] += 1
                h.call("release", NS, name, pid)
        except BaseException as e:  # surfaced below: a thread's assert must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads), "a thread never got through its rounds"
    return counts


def test_a_mutex_has_one_holder_at_a_time_and_every_acquirer_gets_it(h: Harness) -> None:
    occupancy = Occupancy()
    counts = hammer(h, "m", threads_n=8, rounds=100, occupancy=occupancy)
    assert occupancy.most == 1
    assert counts == [100] * 8
    assert h.table._locks == {} and h.table._waiting == {} and h.table._held == {}


def test_a_semaphore_never_has_more_holders_than_permits(h: Harness) -> None:
    occupancy = Occupancy()
    counts = hammer(h, "s", threads_n=8, rounds=100, occupancy=occupancy, kind=SEMAPHORE, permits=3)
    assert 1 <= occupancy.most <= 3
    assert counts == [100] * 8
    assert h.table._locks == {} and h.table._waiting == {} and h.table._held == {}


def test_contended_acquisitions_are_fair(h: Harness) -> None:
    """8 threads loop acquire/release on one mutex until 1,600 acquisitions in all;
    handoff in arrival order gives each about the same share (a lock that let the
    releaser take it straight back would give it nearly all)."""
    threads_n, total = 8, 1600
    counts = [0] * threads_n
    done = threading.Event()
    taken = 0
    errors: list[BaseException] = []
    occupancy = Occupancy()

    def worker(i: int) -> None:
        nonlocal taken
        pid = 100 + i
        try:
            while not done.is_set():
                answer, waiter = h.acquire("hot", pid)
                if answer is None:
                    assert waiter.result(10) == {"acquired": True}
                occupancy.enter(pid)
                occupancy.leave(pid)
                with h.lock:
                    taken += 1
                    counts[i] += 1
                    if taken >= total:
                        done.set()
                    h.table.release(NS, "hot", pid)
        except BaseException as e:  # surfaced below: a thread's assert must fail the test
            errors.append(e)
            done.set()

    # Start from a full queue: held until every thread waits, as under real contention.
    h.acquire("hot", 1)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(h.call("info", NS, "hot")["waiters"]) < threads_n and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(h.call("info", NS, "hot")["waiters"]) == threads_n, "not every thread queued"
    h.call("release", NS, "hot", 1)
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)
    assert occupancy.most == 1
    assert total <= sum(counts) < total + threads_n  # each thread stops after at most one more turn
    jain = sum(counts) ** 2 / (threads_n * sum(c * c for c in counts))
    assert jain >= 0.95, counts
    assert h.table._locks == {} and h.table._waiting == {}


# -- condition variables --------------------------------------------------------------------------
def cond_wait(h: Harness, cond: str, lock: str, pid: int, priority: int = 0,
              timeout_s: float | None = None) -> EventWaiter:
    waiter = EventWaiter()
    with h.lock:
        h.table.cond_wait(NS, cond, lock, pid, priority, waiter, timeout_s)
    return waiter


def test_cond_wait_releases_atomically_and_returns_holding_the_mutex(h: Harness) -> None:
    h.acquire("m", 1)
    queued_for_mutex = h.acquire("m", 2)[1]
    w = cond_wait(h, "c", "m", 1)
    assert queued_for_mutex.result() == {"acquired": True}  # the wait handed the mutex on
    assert h.call("cond_signal", NS, "c") == 1
    assert not w.event.is_set()  # signalled, but pid 2 holds the mutex
    assert h.call("info", NS, "m")["waiters"] == [1]
    h.call("release", NS, "m", 2)
    assert w.result() == {"signalled": True, "timed_out": False} and w.wakes == 1
    assert h.call("info", NS, "m")["holders"] == [1]
    h.call("release", NS, "m", 1)
    assert h.table._locks == {} and h.table._conds == {} and h.table._waiting == {}


def test_cond_timeout_queues_for_the_mutex_and_a_dead_holder_is_reported(h: Harness) -> None:
    h.acquire("m", 1)
    w = cond_wait(h, "c", "m", 1, timeout_s=0.0)
    h.acquire("m", 2)  # free since the wait: pid 2 takes it before the timer fires
    for _ in range(500):
        with h.lock:
            if h.table._conds == {}:
                break
        time.sleep(0.01)
    assert h.call("info", NS, "m")["waiters"] == [1]  # timed out, now waiting for the mutex
    h.call("process_ended", 2)
    assert w.result() == {"signalled": False, "timed_out": True, "previous_holder_died": 2}


def test_an_ended_cond_waiter_leaves_no_trace(h: Harness) -> None:
    h.acquire("m", 1)
    w = cond_wait(h, "c", "m", 1, timeout_s=60)
    h.call("process_ended", 1)
    assert h.call("cond_broadcast", NS, "c") == 0 and not w.event.is_set()
    assert h.table._locks == {} and h.table._conds == {} and h.table._waiting == {}


def test_cond_refusals(h: Harness) -> None:
    with pytest.raises(FailedPrecondition, match="does not hold"):
        cond_wait(h, "c", "m", 1)
    h.acquire("s", 1, kind=SEMAPHORE, permits=2)
    with pytest.raises(FailedPrecondition, match="waits with a mutex"):
        cond_wait(h, "c", "s", 1)
    h.acquire("m", 1)
    h.acquire("m2", 2)
    cond_wait(h, "c", "m", 1)
    with pytest.raises(FailedPrecondition, match="wait with the lock 'm'"):
        cond_wait(h, "c", "m2", 2)
    with pytest.raises(InvalidArgument):
        h.call("cond_signal", NS, "")
    assert h.table._waiting.keys() == {1}

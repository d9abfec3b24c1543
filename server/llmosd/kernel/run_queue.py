"""The run queue: runnable processes in the order of the scheduling policy (kernel/scheduler.py
runs them on the virtual CPUs; its docstring has the bound on waits this order gives).

Policy (RunQueue): priority, then aging, then namespace, then weight.

- A queued process's effective priority is its priority plus one level per
  `aging_ns` it has waited since it was queued.
- The level whose longest-waiting process has the highest effective priority
  runs next; a tie goes to the higher priority.
- Within the level, as cgroup v2's hierarchical cpu.weight, each namespace
  gets its weight's share of the CPU first, then shares it among its
  processes: the namespace with the least weighted CPU time goes (its
  vruntime: its processes' time on a CPU x DEFAULT_WEIGHT / its weight), so
  a namespace with 16 busy processes gets no more than one with 1. Its
  vruntime is charged when one of its processes is queued again (what that
  process used since it was last queued), so a namespace lags by at most the
  slices its processes are running. A namespace back from idle gets the same
  bounded credit as a process back from a sleep. The bound on waits: a
  namespace whose oldest entry has waited NAMESPACE_AGING x `aging_ns` goes
  first whatever its weight, so the bound on waits (kernel/scheduler.py) holds per namespace,
  stretched by the other namespaces of the level each taking at most that.
  Namespaces share CPU within a priority level: priorities still go first
  (an owner who raises its processes' priority takes precedence over other
  namespaces' lower ones, as within one namespace).
- Within the namespace, a process that has waited `aging_ns` or more goes first,
  longest wait first; otherwise the one with the least weighted CPU time
  (vruntime: time on a CPU x DEFAULT_WEIGHT / weight), which shares CPU time
  in proportion to weight as Linux's CFS does. Weights therefore shape shares
  while a level's waits stay under `aging_ns`; past that, the bounded wait
  wins (a weight-1 process among weight-10000 ones still runs every
  `aging_ns`).
- A running process yields when its quantum is spent and a queued one would
  be picked before it were it queued now (`precedes`: a tie within its level
  yields, for round robin), unless a free CPU takes that one anyway.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import time
from typing import Callable

from .process import DEFAULT_WEIGHT, Process

MAX_CREDIT_NS = 20_000_000  # how far behind its level a woken process may start (2 quanta)
# How many `aging_ns` a namespace's oldest queued process may wait before its namespace goes
# first whatever its weight: larger than a level's process waits under a fair split (16 busy
# processes sharing half of one CPU wait 32 quanta, 0.32 s), so that it rarely overrides weights.
NAMESPACE_AGING = 8

# A queued entry: [vruntime, seq, proc, queued_at, live]. A list, so that it can
# leave one of its level's two orders and be skipped (dead) in the other; the
# heap compares (vruntime, seq), and seq is unique.
_VRUNTIME, _SEQ, _PROC, _QUEUED_AT, _LIVE = range(5)


class _Level:
    """The processes of one namespace queued at one priority, in both orders the policy needs."""

    __slots__ = ("by_vruntime", "by_arrival", "count")

    def __init__(self) -> None:
        self.by_vruntime: list[list] = []  # heap
        self.by_arrival: collections.deque[list] = collections.deque()
        self.count = 0  # live entries

    def oldest(self) -> list:
        arrival = self.by_arrival
        while not arrival[0][_LIVE]:
            arrival.popleft()
        return arrival[0]

    def least_vruntime(self) -> list:
        heap = self.by_vruntime
        while not heap[0][_LIVE]:
            heapq.heappop(heap)
        return heap[0]

    def remove(self, entry: list) -> None:
        entry[_LIVE] = False
        self.count -= 1
        # Dead entries left in the other order are dropped when they reach its
        # front, or here, once they outnumber the live ones.
        if len(self.by_vruntime) > 2 * self.count + 16:
            self.by_vruntime = [e for e in self.by_vruntime if e[_LIVE]]
            heapq.heapify(self.by_vruntime)
        if len(self.by_arrival) > 2 * self.count + 16:
            self.by_arrival = collections.deque(e for e in self.by_arrival if e[_LIVE])


class _Namespace:
    """A namespace's share of CPU, as a cgroup's cpu.weight."""

    __slots__ = ("weight", "vruntime", "floors")

    def __init__(self) -> None:
        self.weight = DEFAULT_WEIGHT
        self.vruntime = 0.0  # its processes' CPU ns x DEFAULT_WEIGHT / weight
        self.floors: dict[int, float] = {}  # priority -> vruntime of the last of its processes picked there


class RunQueue:
    """Runnable processes, in the order of the scheduling policy (see the
    module docstring). Not thread-safe: the scheduler holds its lock. Any
    int is a valid priority; `clock` gives nanoseconds (tests pass their own)."""

    def __init__(self, aging_ns: int, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        if aging_ns < 1:
            raise ValueError("aging must be positive: it is what bounds every wait")
        self.aging_ns = aging_ns
        self._clock = clock
        self._levels: dict[int, dict[str, _Level]] = {}  # priority -> namespace -> its queued processes
        self._namespaces: dict[str, _Namespace] = {}
        self._namespace_floor = 0.0  # vruntime of the last namespace picked
        self._seq = itertools.count()
        self._len = 0
        # The highest priority queued, readable without the lock (an int or None).
        self.highest: int | None = None

    def __len__(self) -> int:
        return self._len

    def set_weight(self, namespace: str, weight: int) -> None:
        """A namespace's share of CPU relative to the others' (DEFAULT_WEIGHT until set)."""
        self._namespace(namespace).weight = weight

    def _namespace(self, name: str) -> _Namespace:
        ns = self._namespaces.get(name)
        if ns is None:
            ns = self._namespaces[name] = _Namespace()
            ns.vruntime = self._namespace_floor  # a new namespace starts level with the others
        return ns

    def push(self, proc: Process, new: bool = False) -> None:
        prio = proc.priority
        name = proc.namespace
        ns = self._namespaces.get(name) or self._namespace(name)
        # Charge the namespace what the process used since it was last queued, at the
        # namespace's weight (its vruntime counts ns x DEFAULT_WEIGHT / its own weight).
        vruntime = proc.vruntime
        used = vruntime - proc.queued_vruntime
        if used:
            ns.vruntime += used * proc.weight / ns.weight
        credit_floor = self._namespace_floor - MAX_CREDIT_NS
        if ns.vruntime < credit_floor:
            ns.vruntime = credit_floor  # back from idle: a bounded credit
        groups = self._levels.get(prio)
        if groups is None:
            groups = self._levels[prio] = {}
            if self.highest is None or prio > self.highest:
                self.highest = prio
        level = groups.get(name)
        if level is None:
            level = groups[name] = _Level()
        floor = ns.floors.get(prio, 0.0)
        if new:
            # A new process starts level with the others (as CFS places a new
            # task at min_vruntime), so that a burst of spawns cannot crowd
            # out the processes already there.
            if vruntime < floor:
                vruntime = proc.vruntime = floor
        elif vruntime < floor - MAX_CREDIT_NS:
            # A process back from a long sleep gets a bounded credit, not one
            # that would let it monopolise the CPU.
            vruntime = proc.vruntime = floor - MAX_CREDIT_NS
        proc.queued_vruntime = vruntime
        now = self._clock()
        proc.queued_at = now
        entry = [vruntime, next(self._seq), proc, now, True]
        heapq.heappush(level.by_vruntime, entry)
        level.by_arrival.append(entry)
        level.count += 1
        self._len += 1

    def _best(self, now: int) -> tuple[int, int] | None:
        """(effective priority, priority) of the level to run next."""
        best = None
        for prio, groups in self._levels.items():
            if len(groups) == 1:
                oldest = next(iter(groups.values())).oldest()[_QUEUED_AT]
            else:
                oldest = min(level.oldest()[_QUEUED_AT] for level in groups.values())
            effective = prio + (now - oldest) // self.aging_ns
            if best is None or (effective, prio) > best:
                best = (effective, prio)
        return best

    def pop(self) -> Process:
        now = self._clock()
        levels = self._levels
        if len(levels) == 1:  # one priority queued: it runs next, whatever its effective priority
            prio = next(iter(levels))
        else:
            best = self._best(now)
            if best is None:
                raise IndexError("pop from an empty run queue")
            prio = best[1]
        groups = levels[prio]
        if len(groups) == 1:
            name, level = next(iter(groups.items()))
        else:
            name, level = self._pick_namespace(groups, now)
        oldest = level.oldest()
        entry = oldest if now - oldest[_QUEUED_AT] >= self.aging_ns else level.least_vruntime()
        level.remove(entry)
        if not level.count:
            del groups[name]
            if not groups:
                del levels[prio]
                if prio == self.highest:
                    self.highest = max(levels, default=None)
        ns = self._namespaces[name]
        floors = ns.floors
        if entry[_VRUNTIME] > floors.get(prio, 0.0):
            floors[prio] = entry[_VRUNTIME]
        if ns.vruntime > self._namespace_floor:
            self._namespace_floor = ns.vruntime
        self._len -= 1
        return entry[_PROC]

    def _pick_namespace(self, groups: dict[str, _Level], now: int) -> tuple[str, _Level]:
        """The namespace of a level to run next: the least vruntime, unless one's oldest entry
        has waited NAMESPACE_AGING x aging_ns (the bound on waits)."""
        waited = min(groups.items(), key=lambda item: item[1].oldest()[_QUEUED_AT])
        if now - waited[1].oldest()[_QUEUED_AT] >= NAMESPACE_AGING * self.aging_ns:
            return waited
        namespaces = self._namespaces
        return min(groups.items(), key=lambda item: namespaces[item[0]].vruntime)

    def top(self) -> tuple[int, int] | None:
        """(effective priority, priority) of the process that would run next."""
        return self._best(self._clock())


def precedes(top: tuple[int, int] | None, priority: int) -> bool:
    """Whether the queued process `top` (effective, base priority) would be
    picked before a running process of `priority` requeued now (a tie within
    its level counts: round robin)."""
    return top is not None and top >= (priority, priority)

"""M:N scheduling of processes onto a fixed number of virtual CPUs.

A virtual CPU is a slot: a worker thread runs process code only while it
holds one. Workers take processes from the run queue and run one slice each
(until the process blocks in a syscall, ends, or is preempted).

Preemption happens inside the Lua count hook, which cannot yield: the hook
calls `preempt`, which parks the *thread* with the process on it, gives its
slot back, and makes sure a worker is there to use the slot. When the parked
process is picked again, the picking worker hands its slot to the parked
thread and goes back to the pool. Threads therefore number the CPUs plus the
processes preempted mid-computation, never one per process.

Like Go's runnext, a process woken by the running one (a reply to a message
it just sent) is run next on the same thread, without a trip through the
shared queue; a preemption or a long slice gives it back to the queue. The
runnext slot is the C side's (_core.c), whose Core switches from a Lua process
blocking in a receive straight to the one in the slot.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import signal
import threading
import time
from typing import Callable

from .native import _lua
from .process import Process

log = logging.getLogger(__name__)

DEFAULT_WEIGHT = 100  # as cgroup v2's cpu.weight
MAX_CREDIT_NS = 20_000_000  # how far behind its level a woken process may start (2 quanta)
WAKEUP_GRANULARITY_NS = 4_000_000  # how far behind a woken process must be to preempt at once


class RunQueue:
    """Runnable processes, in the order the scheduling policy wants them.

    - Priority first: a higher level always runs before a lower one...
    - ...except that a process waiting longer than `aging_ns` counts one level
      higher per period waited, so that no level starves.
    - Within a level, the process with the least weighted CPU time (vruntime:
      time on a CPU x DEFAULT_WEIGHT / weight) runs next, so CPU time is shared
      in proportion to weight, as in Linux's CFS.
    """

    def __init__(self, aging_ns: int) -> None:
        self.aging_ns = aging_ns
        self._levels: dict[int, list[tuple[float, int, Process]]] = {}  # priority -> heap
        self._floor: dict[int, float] = {}  # priority -> vruntime of the last process picked
        self._seq = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, proc: Process, new: bool = False) -> None:
        prio = proc.priority
        level = self._levels.get(prio)
        if level is None:
            level = self._levels[prio] = []
            self._floor.setdefault(prio, 0.0)
        floor = self._floor[prio]
        if new:
            # A new process starts level with the others (as CFS places a new
            # task at min_vruntime), so that a burst of spawns cannot crowd
            # out the processes already there.
            proc.vruntime = max(proc.vruntime, floor)
        elif proc.vruntime < floor - MAX_CREDIT_NS:
            # A process back from a long sleep gets a bounded credit, not one
            # that would let it monopolise the CPU.
            proc.vruntime = floor - MAX_CREDIT_NS
        proc.queued_at = time.perf_counter_ns()
        heapq.heappush(level, (proc.vruntime, next(self._seq), proc))
        self._len += 1

    def _best(self) -> tuple[int, int] | None:
        """(effective priority, level) of the process to run next."""
        now = time.perf_counter_ns()
        best = None
        for prio, level in self._levels.items():
            if level:
                head = level[0][2]
                effective = prio + (now - head.queued_at) // self.aging_ns
                if best is None or (effective, prio) > best:
                    best = (effective, prio)
        return best

    def pop(self) -> Process:
        best = self._best()
        if best is None:
            raise IndexError("pop from an empty run queue")
        prio = best[1]
        level = self._levels[prio]
        vruntime, _, proc = heapq.heappop(level)
        if not level:
            del self._levels[prio]
        self._floor[prio] = max(self._floor[prio], vruntime)
        self._len -= 1
        return proc

    def top_priority(self) -> int | None:
        """The effective priority of the process that would run next."""
        best = self._best()
        return None if best is None else best[0]


class Scheduler:
    """Runs processes on `cpus` virtual CPUs.

    `run_slice(proc)` runs a process until it blocks, ends or is preempted.
    `wants_cpu_back(proc, now_ns, others_waiting)` is asked every half quantum
    about each running process; when it says yes, the running thread gets
    `interrupt_signal`, whose handler makes the process check in at once.
    """

    def __init__(
        self, cpus: int, quantum_ns: int, run_slice: Callable[[Process], None],
        wants_cpu_back: Callable[[Process, int, bool], bool] | None = None, interrupt_signal: int = signal.SIGURG,
        aging_ns: int = 200_000_000,
    ) -> None:
        if cpus < 1:
            raise ValueError("cpus must be at least 1")
        self.cpus = cpus
        self.quantum_ns = quantum_ns
        self._run_slice = run_slice
        self._wants_cpu_back = wants_cpu_back
        self._signal = interrupt_signal
        # Thread ident -> the process it runs (the kernel's Core updates it when it switches).
        self.running: dict[int, Process] = {}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue = RunQueue(aging_ns)
        self._free = cpus  # slots no thread holds
        self._idle = 0  # workers waiting for work
        self._threads = 0
        self._stopping = False
        if wants_cpu_back is not None:
            threading.Thread(target=self._watch, name="preempt-watch", daemon=True).start()

    # -- called by the kernel ----------------------------------------------------------
    def make_runnable(self, proc: Process, new: bool = False) -> None:
        """Queue `proc` to run. Safe from any thread, with or without the kernel lock.
        A `new` (just spawned) process never preempts a running one: as with
        CFS's default, the spawner keeps its CPU until its quantum is spent."""
        if not _lua.offer_next(proc):  # else it runs next on this worker (see module docstring)
            self._enqueue(proc, new)

    def requeue(self, proc: Process) -> None:
        """Queue a process that used up its quantum: behind the others, never as runnext."""
        self._enqueue(proc)

    def _enqueue(self, proc: Process, new: bool = False) -> None:
        with self._lock:
            self._queue.push(proc, new)
            self._offer_locked()
            if self._free > 0 or self._wants_cpu_back is None or new:
                return
        # Every CPU is busy. A process of higher priority, or one far behind in
        # its share (typically woken from a wait), takes a CPU now rather than
        # at the end of the running one's quantum.
        running = list(self.running.items())
        if running:
            ident, victim = min(running, key=lambda item: (item[1].priority, -item[1].vruntime))
            if victim.priority < proc.priority or (
                victim.priority == proc.priority and victim.vruntime - proc.vruntime > WAKEUP_GRANULARITY_NS
            ):
                victim.yield_requested = True
                signal.pthread_kill(ident, self._signal)

    def _offer_locked(self) -> None:
        """Make sure a free slot with queued work gets a worker."""
        if self._free > 0 and len(self._queue) > 0:
            if self._idle > 0:
                self._work.notify()
            else:
                self._start_worker_locked()

    def _start_worker_locked(self) -> None:
        self._threads += 1
        threading.Thread(target=self._worker, name=f"vcpu-{self._threads}", daemon=True).start()

    def should_yield(self, proc: Process) -> bool:
        """True when someone of at least `proc`'s priority waits for a CPU."""
        if _lua.has_next():
            return True
        top = self._queue.top_priority()
        return top is not None and top >= proc.priority

    def preempt(self, proc: Process) -> None:
        """Called on the running thread from the count hook when the quantum
        is spent: park here until the scheduler picks `proc` again."""
        self._flush_next()
        with self._lock:
            top = self._queue.top_priority()
            if top is None or top < proc.priority:
                return  # nobody else wants the CPU
            parked = proc.parked = threading.Event()
            self._queue.push(proc)
            self._free += 1
            self._offer_locked()
        parked.wait()  # the GIL is released while parked

    def _flush_next(self) -> None:
        nxt = _lua.take_next()
        if nxt is not None:
            self._enqueue(nxt)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._work.notify_all()

    def interrupt(self, proc: Process) -> None:
        """Make a running process check in now (for a kill)."""
        for ident, running in list(self.running.items()):
            if running is proc:
                signal.pthread_kill(ident, self._signal)

    def _watch(self) -> None:
        """Every half quantum, interrupt running processes that should give the CPU back."""
        assert self._wants_cpu_back is not None
        period = self.quantum_ns / 2e9
        while not self._stopping:
            time.sleep(period)
            if not self.running:
                continue
            now = time.perf_counter_ns()
            top = self._queue.top_priority()
            for ident, proc in list(self.running.items()):
                waiting = top is not None and top >= proc.priority
                try:
                    if self._wants_cpu_back(proc, now, waiting):
                        signal.pthread_kill(ident, self._signal)
                except Exception:  # one process's trouble must not end preemption for all
                    log.exception("preemption check of pid %d failed", proc.pid)

    # -- workers ---------------------------------------------------------------------
    def _worker(self) -> None:
        ident = threading.get_ident()
        _lua.become_worker()
        holding = False
        while True:
            proc = _lua.take_next()
            if proc is None:
                with self._lock:
                    while True:
                        if self._stopping:
                            if holding:
                                self._free += 1
                            self._threads -= 1
                            return
                        if len(self._queue) > 0 and (holding or self._free > 0):
                            break
                        if holding:
                            holding = False
                            self._free += 1
                        if self._idle >= self.cpus:
                            self._threads -= 1  # enough idle threads already
                            return
                        self._idle += 1
                        self._work.wait()
                        self._idle -= 1
                    if not holding:
                        self._free -= 1
                        holding = True
                    proc = self._queue.pop()
                    if proc.parked is not None:
                        # Hand this slot to the thread parked with the process.
                        parked, proc.parked = proc.parked, None
                        holding = False
                        parked.set()
                        continue
            self.running[ident] = proc
            try:
                self._run_slice(proc)
            except Exception:  # a kernel bug must not take a virtual CPU down
                log.exception("slice of pid %d failed", proc.pid)
            finally:
                self.running.pop(ident, None)

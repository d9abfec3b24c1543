"""M:N scheduling of processes onto a fixed number of virtual CPUs.

A virtual CPU is a slot: a worker thread runs process code only while it
holds one. Workers take processes from the run queue and run one slice each
(until the process blocks in a syscall, ends, or is preempted).

Preemption happens inside the Lua count hook, which cannot yield: the hook
calls `preempt`, which parks the *thread* with the process on it, gives its
slot back, and makes sure a worker is there to use the slot. When the parked
process is picked again, the picking worker hands its slot to the parked
thread and goes back to the pool. Threads therefore number the CPUs plus the
processes preempted mid-computation (plus threads stuck in C, below), never
one per process.

Like Go's runnext, a process woken by the running one (a reply to a message
it just sent) is run next on the same thread, without a trip through the
shared queue. As in Go, it inherits the time slice: once the slice that began
when the worker last took from the queue has lasted a quantum, or when a
process of higher priority is queued, it goes to the queue like any other.
The runnext slot is the C side's (lua/fast_paths.c), whose Core switches from a Lua
process blocking in a receive straight to the one in the slot.

Spawn locality. A process spawned by the one running on a worker, when runnext
is taken, is held for that worker while its spawner runs there: it joins the
run queue (and an idle virtual CPU is woken for it) when the spawner stops
running: it blocks or ends (the worker's next turn), or its quantum is spent
(`preempt`; the watcher counts held processes as waiting, so a spawner that
never blocks is interrupted at its quantum's end as if they were queued).
Why: most of a Lua process's kernel work holds the GIL, so a short child run
at once on an idle virtual CPU mostly waits for the GIL its spawner holds, and
each hand-off of the GIL between the two threads costs more than the child's
own work (a trivial child per spawn, tools/bench_kernel.py's spawn figure, ran
about 10% faster held than sent to the other CPU). A fan-out still spreads over
every CPU as soon as its spawner blocks, which a spawner waiting for its
children's results does. The bound: a held process waits for at most its
spawner's quantum (1.5 quanta, the watcher looking every half), and the
watcher releases it anyway once the Core has switched its worker to another
process (a receive's hand-off) or it has waited STEAL_AFTER_QUANTA (its
spawner's thread stuck in C), after which it is queued like any other. Held
processes are of one priority (a spawn of another releases them and is queued
at once), so the run queue orders priorities as before; they are counted in
`queued()`. Python agents' spawns arrive on the server's thread: never held.

Spreading. An idle virtual CPU is woken for queued work only while no worker
serves the queue, and a worker whose turn comes while another serves steps
back (gives its CPU up and waits to be woken) rather than take from the queue.
A worker serves the queue when its last run was mostly kernel work (less than
half of it in Lua, which runs without the GIL) and it began its current
process (or its turn at the queue) less than SERVING_NS ago; or when it was
woken for the queue that recently. Why: kernel work holds the GIL, so a second
worker running such processes beside the first mostly waits for the GIL, and
each hand-off costs more than the work (20,000 trivial children over gRPC took
86-90 us of CPU each with two workers trading the GIL, 58-61 us on one). Work
that computes in Lua, in runs however short, or that began short and runs
long, spreads over the CPUs: the next offer, or the watcher every half
quantum, wakes an idle one.

The sysmon (as Go's sysmon retakes a P from an M stuck in a syscall). The
hook runs between two instructions, so a thread inside one long C call (a
library function, or one VM instruction such as hashing a long string used
as a table key) cannot check in. The watcher thread signals a thread when the
kernel wants its CPU back (its quantum spent, a kill, a CPU limit) and notes
when it first did so for that slice. A thread still in that slice GRACE_NS
later, at the watcher's next look (every half quantum), loses
its virtual CPU: the slot counts as free and goes to another worker (a fresh
one if none is idle), so the run queue keeps moving. At most `cpus` threads
are without a slot at once; beyond that, stuck threads keep theirs, so that a
flood of long C calls cannot use more than twice the CPUs. The stuck thread
finishes its call without a slot and checks in at the hook (the signal armed
it, so it runs before the process's next instruction) or at the end of its
slice; from then on it runs no process code until it holds a slot again: at
the hook it parks with its process, as a preempted thread does (or takes a
free slot back at once if nobody who goes first waits); at the end of a slice
it becomes a worker without a slot. So threads running process code exceed
`cpus` only by threads inside a C call past their due time, and only until
that call returns. While no thread is due, this costs a test of an empty
dict per slice. `stuck_ns` tells how long the longest-stuck thread has been
past its due time (the health service reports NOT_SERVING past a threshold).

The run queue's order (priority, aging, namespaces, weights): kernel/run_queue.py.

The bound. A runnable process of priority p is picked within
(top - p + 1) x aging_ns, where top is the highest priority runnable
meanwhile (priorities are in [-20, 20]: at most 41 x aging_ns), plus the time
the CPUs take to run one slice of each process queued ahead of it by then.
A slice lasts at most 1.5 quanta (the watcher looks every half quantum), or
for a thread stuck in C, until the sysmon retakes its CPU (GRACE_NS and a
half quantum later) or, past the cap on retaken CPUs, until its call returns.
Alone behind a CPU-bound hog: (top - p + 1) x aging_ns + 1.5 quanta. Why:
from then on its effective priority is above that of anything queued later,
and its level takes the longest-waiting first, so only processes queued
before then can go first, each once (requeued, it is behind); and a CPU
running a process it precedes gives it up at the end of that slice.
Spreading may add up to half a quantum (the watcher's period) while a free
CPU waits for a worker serving the queue whose process began short, and runs long.
A process held for its spawner's CPU (spawn locality) is queued at most 1.5
quanta after its spawn; its bound counts from then.
tests/test_run_queue.py checks the bound on random mixes.
"""
from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..native import _kernel
from .process import Process
from .run_queue import RunQueue, precedes

log = logging.getLogger(__name__)

WAKEUP_GRANULARITY_NS = 4_000_000  # how far behind a woken process must be to preempt at once
# How many quanta a spawned process may wait for its spawner's virtual CPU before any idle one
# takes it, whatever runs there (a thread stuck in C does not check in; see "Spawn locality").
STEAL_AFTER_QUANTA = 2
# How long a signalled thread may take to check in before the sysmon retakes its
# CPU: checking in takes the GIL, which a waiting thread gets within Python's
# switch interval (5 ms), so a thread waiting for it is not mistaken for a stuck one.
GRACE_NS = 10_000_000
# A worker whose last run was mostly kernel work and that began its current process (or its turn at
# the queue) less than this ago serves the run queue: no idle virtual CPU is woken for queued work
# while one does (see "Spreading").
SERVING_NS = 1_000_000
@dataclass(slots=True)
class _Due:
    """A worker thread the scheduler wants a CPU back from, until it checks in."""

    proc: Process
    slice_start: int  # tells the slice signalled from a later one
    since_ns: int  # when the scheduler first wanted it back
    retaken: bool = False  # the sysmon gave its slot to another worker


class Scheduler:
    """Runs processes on `cpus` virtual CPUs.

    `run_slice(proc)` runs a process until it blocks, ends or is preempted.
    `wants_cpu_back(proc, now_ns, others_waiting)` is asked every half quantum
    about each running process; when it answers the start of the running
    slice (None: no), the running thread gets `interrupt_signal`, whose
    handler makes the process check in at once, and the sysmon watches that
    slice (see the module docstring).
    """

    def __init__(
        self, cpus: int, quantum_ns: int, run_slice: Callable[[Process], None],
        wants_cpu_back: Callable[[Process, int, bool], int | None] | None = None,
        interrupt_signal: int = signal.SIGURG, aging_ns: int = 200_000_000,
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
        # Thread ident -> ns it has spent running slices (each thread writes only its own entry).
        self.busy_ns: dict[int, int] = {}
        self._lock = threading.Lock()
        self._queue = RunQueue(aging_ns)
        self._free = cpus  # slots no thread holds
        # Workers waiting for work that no offer has woken yet, each on a lock of its own that the
        # offer releases (a threading.Condition's notify, Python code, took 21 µs of a Send's wake-up
        # in the server; a release is one C call). An offer wakes one and counts it out at once:
        # counted out only once it ran, several offers in a row (a preempted process's runnext, its
        # spawns, itself) all went to the one worker, and a free CPU was left with queued work and
        # no worker, for good if the one running never yields (a busy loop).
        self._idle: collections.deque[threading.Lock] = collections.deque()
        self._loop_thread = 0  # see wake_after_turn
        self._call_soon: Callable[[Callable[[], Any]], Any] | None = None
        self._threads = 0
        self._stopping = False
        # Worker ident -> the processes spawned by the one it runs that did not fit in runnext,
        # held until it stops running: (process, when, its spawner), oldest first (spawn
        # locality). Written under the lock.
        self._spawned: dict[int, collections.deque[tuple[Process, int, Process | None]]] = {}
        self._held_count = 0  # processes in all of them
        self._steal_after_ns = STEAL_AFTER_QUANTA * quantum_ns
        # Thread ident -> why it is due to check in. Written under the lock;
        # read without it only to skip the lock when empty.
        self._due: dict[int, _Due] = {}
        # Thread ident -> when its worker began running its current process, or its turn at the
        # queue (see "Spreading"). Each thread writes only its own entry; absent while idle or parked,
        # and while its last run was mostly Lua.
        self._serving_since: dict[int, int] = {}
        self._woken_at = 0  # when an offer last woke or started a worker, which serves the queue once it runs
        # Spreading defers a wake-up only where the watcher wakes a CPU once no worker serves.
        self._spreading = wants_cpu_back is not None
        if wants_cpu_back is not None:
            threading.Thread(target=self._watch, name="preempt-watch", daemon=True).start()

    # -- called by the kernel ----------------------------------------------------------
    def make_runnable(self, proc: Process, new: bool = False) -> None:
        """Queue `proc` to run. Safe from any thread, with or without the kernel lock.
        A `new` (just spawned) process never preempts a running one: as with
        CFS's default, the spawner keeps its CPU until its quantum is spent.
        Spawned by a process running on a worker, it waits for that worker first
        (spawn locality, see the module docstring)."""
        if _kernel.offer_next(proc):
            return  # it runs next on this worker (see module docstring)
        if new:
            spawned = self._spawned.get(threading.get_ident())
            if spawned is not None and self._held(spawned, proc):
                return
        self._enqueue(proc, new)

    def _held(self, spawned: collections.deque, proc: Process) -> bool:
        """Whether `proc`, spawned by the process running on this worker, waits for it to stop
        running (spawn locality). Those held are of one priority, so that the queue's order
        is theirs; one of another goes to the queue at once, with them."""
        ident = threading.get_ident()
        now = time.perf_counter_ns()
        with self._lock:
            if spawned and spawned[0][0].priority != proc.priority:
                self._release_locked(spawned)
                return False
            spawned.append((proc, now, self.running.get(ident)))
            self._held_count += 1
            if now - spawned[0][1] >= self._steal_after_ns:
                self._release_locked(spawned)
        return True

    def _release_locked(self, spawned: collections.deque) -> None:
        """A worker's held processes to the run queue (oldest first), and a worker to each free CPU."""
        self._held_count -= len(spawned)
        while spawned:
            self._queue.push(spawned.popleft()[0], new=True)
        for _ in range(min(self._free, len(self._queue))):
            self._offer_locked()

    def set_namespace_weight(self, namespace: str, weight: int) -> None:
        """A namespace's share of CPU within each priority level (see RunQueue)."""
        with self._lock:
            self._queue.set_weight(namespace, weight)

    def requeue(self, proc: Process) -> None:
        """Queue a process that used up its quantum: behind the others, never as runnext.
        The calling worker picks the next process itself: nobody running is preempted for it."""
        self._enqueue(proc, wakeup=False)

    def _enqueue(self, proc: Process, new: bool = False, wakeup: bool = True) -> None:
        """`wakeup`: `proc` was woken, and may preempt a running process (see below)."""
        with self._lock:
            self._queue.push(proc, new)
            self._offer_locked()
            if self._free > 0 or self._wants_cpu_back is None or new or not wakeup:
                return
        # Every CPU is busy. A process of higher priority, or one far behind in
        # its share (typically woken from a wait), takes a CPU now rather than
        # at the end of the running one's quantum.
        # (A thread due to check in is giving its CPU up already, or stuck in C.)
        running = [item for item in list(self.running.items()) if item[0] not in self._due]
        if running:
            ident, victim = min(running, key=lambda item: (item[1].priority, -item[1].vruntime))
            if victim.priority < proc.priority or (
                victim.priority == proc.priority and victim.vruntime - proc.vruntime > WAKEUP_GRANULARITY_NS
            ):
                victim.yield_requested = True
                signal.pthread_kill(ident, self._signal)

    def _offer_locked(self) -> None:
        """Make sure a free slot with queued work gets a worker, unless a worker serving the
        queue will take it (see "Spreading"; the watcher looks again every half quantum)."""
        if self._free > 0 and len(self._queue) > 0:
            now = time.perf_counter_ns()
            if self._spreading and (now - self._woken_at < SERVING_NS or self._serving(now)):
                return  # a worker serves the queue, or one just woken for it will
            self._woken_at = now
            if self._idle:
                wake = self._idle.popleft().release
                if self._call_soon is not None and threading.get_ident() == self._loop_thread:
                    self._call_soon(wake)  # see wake_after_turn
                else:
                    wake()
            else:
                self._start_worker_locked()

    def _start_worker_locked(self) -> None:
        self._threads += 1
        threading.Thread(target=self._worker, name=f"vcpu-{self._threads}", daemon=True).start()

    def _serving(self, now: int, other_than: int | None = None) -> bool:
        """Whether a worker, other than the thread `other_than`, serves the queue (see "Spreading")."""
        return any(now - since < SERVING_NS for ident, since in list(self._serving_since.items()) if ident != other_than)

    def should_yield(self, proc: Process) -> bool:
        """True when `proc`, running on this thread, should give its CPU up now:
        a queued process would be picked before it and no free CPU takes it, a
        process it woke or spawned waits for this CPU, or this thread is due to check
        in with the sysmon (`preempt` or the end of the slice does)."""
        if _kernel.has_next() or self._spawned.get(threading.get_ident()):
            return True
        if self._due and threading.get_ident() in self._due:
            return True
        with self._lock:
            return self._spare_cpus_locked(proc.priority) < 0

    def _spare_cpus_locked(self, priority: int) -> int:
        """Free CPUs left once those queued that would go before a running process of
        `priority` have one each (negative: that many need a running one's). A process
        queued while a CPU is free, such as a runnext just flushed, takes the free one:
        giving up a second would only cost a trip through the queue."""
        ahead = len(self._queue) if precedes(self._queue.top(), priority) else 0
        return self._free - ahead

    def preempt(self, proc: Process) -> None:
        """Called on the running thread from the count hook when the quantum
        is spent (or the thread was due to check in): park here until the
        scheduler picks `proc` again, if anyone goes first or if the sysmon
        took this thread's CPU."""
        self._flush_next()
        ident = threading.get_ident()
        with self._lock:
            spawned = self._spawned.get(ident)
            if spawned:  # its quantum is spent: they wait in the queue like everyone else
                self._release_locked(spawned)
            due = self._due.pop(ident, None)
            holding = due is None or not due.retaken
            spare = self._spare_cpus_locked(proc.priority)
            if holding and spare >= 0:
                return  # nobody else needs this CPU
            if not holding and spare > 0:
                self._free -= 1  # take a free CPU back
                return
            parked = proc.parked = threading.Event()
            self._queue.push(proc)
            if holding:
                self._free += 1
            self._offer_locked()
        # Parked, the thread runs nothing: neither the watcher nor a wake-up should pick it to interrupt.
        self.running.pop(ident, None)
        self._serving_since.pop(ident, None)
        parked.wait()  # the GIL is released while parked; a worker hands over its slot
        self.running[ident] = proc

    def wake_after_turn(self, call_soon: Callable[[Callable[[], Any]], Any]) -> None:
        """From now on, a worker that this thread (the server's event loop) wakes is woken by
        `call_soon` (the loop's), once the loop's current callback is done: a syscall that makes a
        process runnable answers its client first. Waking a sleeping thread took 20-25 µs of a Send
        on a 2-vCPU VM (a futex wake that interrupts the other CPU), and the woken process's slice
        then ran while the loop still answered, the two taking turns at the GIL. Deferred, the
        syscall floor's Send+Recv took 3% less, and the Lua echo still replied long before the
        client's Recv came. Nothing on the loop waits for a worker, so the wake always comes."""
        self._loop_thread = threading.get_ident()
        self._call_soon = call_soon

    def _flush_next(self) -> None:
        nxt = _kernel.take_next()
        if nxt is not None:
            self._enqueue(nxt)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            while self._idle:
                self._idle.popleft().release()

    def interrupt(self, proc: Process) -> None:
        """Make a running process check in now (for a kill)."""
        for ident, running in list(self.running.items()):
            if running is proc:
                signal.pthread_kill(ident, self._signal)

    def queued(self) -> int:
        """Processes waiting for a virtual CPU (in the run queue or for their spawner's)."""
        return len(self._queue) + self._held_count

    def stuck_ns(self) -> int:
        """How long the longest-stuck worker thread has been past its due time
        without checking in (0: none is). Whether the sysmon retook its CPU
        or not (past the cap): either way, a virtual CPU is wedged."""
        if not self._due:
            return 0
        now = time.perf_counter_ns()
        with self._lock:
            return max((now - due.since_ns for due in self._due.values()), default=0)

    # -- the watcher and the sysmon -------------------------------------------------------
    def _watch(self) -> None:
        """Every half quantum, interrupt running processes that should give the
        CPU back, and retake the CPUs of threads that do not check in."""
        assert self._wants_cpu_back is not None
        period = self.quantum_ns / 2e9
        while not self._stopping:
            time.sleep(period)
            if len(self._queue) > 0 and self._free > 0:
                with self._lock:
                    self._offer_locked()  # no worker serves the queue any more (see "Spreading")
            if not self.running and not self._due:
                continue
            now = time.perf_counter_ns()
            with self._lock:
                if self._held_count:
                    self._release_held_locked(now)
                top = self._queue.top()
            wanted: dict[int, tuple[Process, int]] = {}
            for ident, proc in list(self.running.items()):
                try:
                    waiting = precedes(top, proc.priority) or bool(self._spawned.get(ident))
                    slice_start = self._wants_cpu_back(proc, now, waiting)
                    if slice_start is not None:
                        wanted[ident] = (proc, slice_start)
                        signal.pthread_kill(ident, self._signal)
                except Exception:  # one process's trouble must not end preemption for all
                    log.exception("preemption check of pid %d failed", proc.pid)
            if wanted or self._due:
                with self._lock:
                    self._sysmon_locked(now, wanted)

    def _release_held_locked(self, now: int) -> None:
        """Release what waits for a spawner that no longer runs on its worker (the Core switched
        to the process a receive handed the CPU to) or that has held it STEAL_AFTER_QUANTA (a
        thread stuck in C)."""
        for ident, spawned in self._spawned.items():
            if spawned and (spawned[0][2] is not self.running.get(ident) or now - spawned[0][1] >= self._steal_after_ns):
                self._release_locked(spawned)

    def _sysmon_locked(self, now: int, wanted: dict[int, tuple[Process, int]]) -> None:
        """Retake the CPU of each thread still in the slice it was signalled in
        GRACE_NS ago, up to `cpus` such threads at once; note the newly
        signalled ones. A thread that checks in takes this lock when it finds
        itself here, so it sees a retake whole."""
        retaken = sum(due.retaken for due in self._due.values())
        for ident, due in list(self._due.items()):
            if due.retaken:
                continue  # its thread removes it when it checks in
            if wanted.get(ident) != (due.proc, due.slice_start):
                del self._due[ident]  # it checked in, or moved on to another slice
            elif now - due.since_ns >= GRACE_NS and retaken < self.cpus:
                due.retaken = True
                retaken += 1
                self._free += 1
                self._offer_locked()
                log.debug("pid %d has not checked in %.0f ms after it was due: its CPU goes to another worker",
                          due.proc.pid, (now - due.since_ns) / 1e6)
        for ident, (proc, slice_start) in wanted.items():
            if ident not in self._due:
                self._due[ident] = _Due(proc, slice_start, now)

    def _checked_in(self, ident: int) -> bool:
        """This thread checks in at the end of a slice: False if its CPU was retaken."""
        with self._lock:
            due = self._due.pop(ident, None)
        return due is None or not due.retaken

    # -- workers ---------------------------------------------------------------------
    def _worker(self) -> None:
        ident = threading.get_ident()
        _kernel.become_worker()
        with self._lock:  # the watcher walks them
            spawned = self._spawned[ident] = collections.deque()
        wake = threading.Lock()  # this worker sleeps acquiring it; an offer releases it (see _idle)
        wake.acquire()
        holding = False
        slice_began = 0  # when this worker last took a process from the queue
        held_gil = True  # whether its last run was mostly kernel work, which holds the GIL (see "Spreading")
        while True:
            if held_gil:
                self._serving_since[ident] = time.perf_counter_ns()  # its turn at the queue
            else:
                self._serving_since.pop(ident, None)
            if spawned:  # their spawner's slice is over: idle CPUs may take them now
                with self._lock:
                    self._release_locked(spawned)
            proc = _kernel.take_next()
            highest = self._queue.highest  # None: nobody queued
            if proc is not None and highest is not None and (
                highest > proc.priority or time.perf_counter_ns() - slice_began >= self.quantum_ns
            ):
                # runnext's time slice is over, or someone of higher priority waits: this
                # worker picks from the queue next, so nobody running is preempted for it
                self._enqueue(proc, wakeup=False)
                proc = None
            if proc is None:
                with self._lock:
                    while True:
                        if self._stopping:
                            if holding:
                                self._free += 1
                            self._serving_since.pop(ident, None)
                            self._threads -= 1
                            del self._spawned[ident]
                            return
                        if len(self._queue) > 0 and (holding or self._free > 0) and not (
                                self._spreading and self._serving(time.perf_counter_ns(), ident)):
                            break  # (while another worker serves the queue, this one steps back)
                        if holding:
                            holding = False
                            self._free += 1
                        self._serving_since.pop(ident, None)
                        if len(self._idle) >= self.cpus:
                            self._threads -= 1  # enough idle threads already
                            del self._spawned[ident]
                            return
                        self._idle.append(wake)
                        self._lock.release()  # asleep without the scheduler's lock, as in a Condition's wait
                        wake.acquire()  # released by an offer, which counted this worker out of _idle
                        self._lock.acquire()
                    if not holding:
                        self._free -= 1
                        holding = True
                    proc = self._queue.pop()
                    slice_began = time.perf_counter_ns()
                    if proc.parked is not None:
                        # Hand this slot to the thread parked with the process.
                        parked, proc.parked = proc.parked, None
                        holding = False
                        parked.set()
                        continue
            self.running[ident] = proc
            began = time.perf_counter_ns()
            if held_gil:
                self._serving_since[ident] = began
            lua_ns = _kernel.thread_lua_ns()
            try:
                self._run_slice(proc)
            except Exception:  # a kernel bug must not take a virtual CPU down
                log.exception("slice of pid %d failed", proc.pid)
            finally:
                self.running.pop(ident, None)
                ran = time.perf_counter_ns() - began
                self.busy_ns[ident] = self.busy_ns.get(ident, 0) + ran
                held_gil = 2 * (_kernel.thread_lua_ns() - lua_ns) < ran
            if self._due and ident in self._due and not self._checked_in(ident):
                holding = False  # the sysmon gave this thread's slot away
                self._flush_next()

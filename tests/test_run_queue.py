"""The run queue's policy on its own, on a simulated clock: priority order,
weights, and the bound that aging puts on every wait (scheduler.py states it).

A simulated CPU runs what the queue picks for one quantum at a time, charging
vruntime as the kernel does (time x DEFAULT_WEIGHT / weight); seeded, so every
run is the same.
"""
from __future__ import annotations

import random

import pytest

from llmosd.kernel.process import DEFAULT_WEIGHT
from llmosd.kernel.run_queue import RunQueue, precedes

QUANTUM = 10_000_000
AGING = 50_000_000
LOWEST, HIGHEST = -20, 20  # the documented range (DECISIONS.md)


class Proc:
    """What the run queue reads and writes of a process."""

    __slots__ = ("name", "priority", "weight", "vruntime", "queued_at", "namespace", "queued_vruntime")

    def __init__(self, name: str, priority: int, weight: int = DEFAULT_WEIGHT, namespace: str = "default") -> None:
        self.name, self.priority, self.weight, self.namespace = name, priority, weight, namespace
        self.vruntime, self.queued_at, self.queued_vruntime = 0.0, 0, 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def simulate(procs: list[Proc], aging: int, slices: int, seed: int = 1, sleepy: float = 0.05) -> dict[str, list[int]]:
    """Run CPU-bound `procs` on one simulated CPU for `slices` picks; after a
    slice, one sleeps a while with probability `sleepy`. Returns each
    process's waits (queued to picked)."""
    rng = random.Random(seed)
    clock = Clock()
    queue = RunQueue(aging, clock)
    for p in procs:
        queue.push(p, new=True)
    waits: dict[str, list[int]] = {p.name: [] for p in procs}
    asleep: list[tuple[int, Proc]] = []
    for _ in range(slices):
        for wake_at, p in [s for s in asleep if s[0] <= clock.now]:
            asleep.remove((wake_at, p))
            queue.push(p)
        if not len(queue):
            clock.now = min(t for t, _ in asleep)
            continue
        proc = queue.pop()
        waits[proc.name].append(clock.now - proc.queued_at)
        ran = rng.randint(QUANTUM // 10, QUANTUM)
        clock.now += ran
        proc.vruntime += ran * DEFAULT_WEIGHT / proc.weight
        if rng.random() < sleepy:
            asleep.append((clock.now + rng.randint(0, 5 * QUANTUM), proc))
        else:
            queue.push(proc)
    return waits


def bound(priority: int, top: int, others: int, aging: int) -> int:
    """scheduler.py's bound: (top - p + 1) x aging, plus one slice of each process ahead."""
    return (top - priority + 1) * aging + others * QUANTUM


@pytest.mark.parametrize("seed", range(5))
def test_aging_bounds_every_wait_whatever_the_priorities_and_weights(seed: int) -> None:
    rng = random.Random(seed)
    procs = [Proc(f"p{i}", rng.randint(LOWEST, HIGHEST), rng.choice([1, 50, 100, 300, 10_000]))
             for i in range(rng.randint(2, 12))]
    procs.append(Proc("bottom", LOWEST, 1))  # the worst case: lowest priority, least weight
    procs.append(Proc("top", HIGHEST, 10_000))
    waits = simulate(procs, AGING, 5_000, seed)
    for p in procs:
        assert waits[p.name], f"{p.name} never ran"
        limit = bound(p.priority, HIGHEST, len(procs) - 1, AGING)
        assert max(waits[p.name]) <= limit, (p.name, p.priority, p.weight, max(waits[p.name]), limit)


def test_without_aging_the_bottom_priority_starves() -> None:
    """The bound above is aging's doing: with aging too slow to matter, a hog
    at the top priority keeps the bottom one out."""
    procs = [Proc("hog", HIGHEST), Proc("victim", LOWEST)]
    waits = simulate(procs, 10**18, 2_000, sleepy=0)
    assert waits["victim"] == [] and len(waits["hog"]) == 2_000


def test_higher_priority_goes_first_and_weights_share_a_level() -> None:
    clock = Clock()
    queue = RunQueue(AGING, clock)
    low, mid, high = Proc("low", -3), Proc("mid", 0), Proc("high", 7)
    for p in (low, mid, high):
        queue.push(p, new=True)
    assert [queue.pop().name for _ in range(3)] == ["high", "mid", "low"]
    # Within a level, CPU time in proportion to weight (waits stay under aging).
    light, heavy = Proc("light", 2, 100), Proc("heavy", 2, 300)
    given = {"light": 0, "heavy": 0}
    for p in (light, heavy):
        queue.push(p, new=True)
    for _ in range(400):
        p = queue.pop()
        given[p.name] += QUANTUM
        p.vruntime += QUANTUM * DEFAULT_WEIGHT / p.weight
        clock.now += QUANTUM
        queue.push(p)
    assert 2.8 < given["heavy"] / given["light"] < 3.2, given


def test_precedence_is_the_pick_order_with_ties_in_a_level_yielding() -> None:
    clock = Clock()
    queue = RunQueue(AGING, clock)
    assert not precedes(queue.top(), 0)
    queue.push(Proc("waiter", -5))
    assert precedes(queue.top(), -5) and not precedes(queue.top(), -4)
    clock.now += 5 * AGING  # aged up to -4 .. 0
    assert precedes(queue.top(), -1) and not precedes(queue.top(), 0)  # a tie goes to the higher priority
    clock.now += AGING
    assert precedes(queue.top(), 0)


@pytest.mark.parametrize("priorities", [[LOWEST, HIGHEST], [-(2**63), 2**63 - 1, 0], [10**30, -(10**30), 10**30 + 1]])
def test_any_integer_priority_keeps_the_queue_consistent(priorities: list[int]) -> None:
    clock = Clock()
    queue = RunQueue(AGING, clock)
    procs = [Proc(str(i), prio) for i, prio in enumerate(priorities * 3)]
    for p in procs:
        queue.push(p, new=True)
        clock.now += 1
    assert len(queue) == len(procs) and queue.highest == max(priorities)
    popped = [queue.pop() for _ in procs]
    assert sorted(p.priority for p in popped) == sorted(p.priority for p in procs)
    assert [p.priority for p in popped] == sorted((p.priority for p in popped), reverse=True)
    assert len(queue) == 0 and queue.highest is None and queue.top() is None
    with pytest.raises(IndexError):
        queue.pop()


def test_aging_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RunQueue(0)

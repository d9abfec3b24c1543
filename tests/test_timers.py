"""The kernel's timer thread (kernel/waiting.py Timers): what a cancelled timer keeps, and
that cancelled timers cannot pile up in its heap."""
from __future__ import annotations

import time
import weakref
from typing import Iterator

import pytest

from llmosd.kernel.waiting import MIN_SWEEP, Timers

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

"""Namespaces' settings an admin may change (SetNamespace): for now each one's CPU weight.

A namespace exists once something names it (a token, a process, SetNamespace); one that was
never set has the defaults. Weights are kept in memory: a restarted server starts every
namespace at DEFAULT_WEIGHT again.
"""
from __future__ import annotations

import threading

from ..api import checks as C
from .process import DEFAULT_WEIGHT
from .scheduler import Scheduler


class Namespaces:
    """Each namespace's weight: its share of CPU against the other namespaces' within a
    priority level, as cgroup v2's cpu.weight (the scheduler applies it, kernel/scheduler.py)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._weights: dict[str, int] = {}

    def weight(self, name: str) -> int:
        return self._weights.get(name, DEFAULT_WEIGHT)

    def set(self, name: str, weight: int) -> None:
        """Change a namespace's settings; 0 leaves the weight unchanged (DECISIONS.md)."""
        C.name(name, "namespace")
        if weight:
            C.weight(weight)
            with self._lock:
                self._weights[name] = weight
                self._scheduler.set_namespace_weight(name, weight)

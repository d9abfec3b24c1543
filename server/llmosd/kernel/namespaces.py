"""Namespaces' settings an admin may change (SetNamespace): each one's CPU weight and quotas.

A namespace exists once something names it (a token, a process, SetNamespace); one that was
never set has the server's defaults (--namespace-* flags). Settings are kept in memory: a
restarted server starts every namespace at the defaults again.

Quotas (0: none), docs/authority.md:
- memory_bytes and mailbox_bytes bound the sum of the namespace's live processes' (and ports')
  limits of the same name (a reservation, so that no running process is ever killed for its
  namespace's quota): a new process's limit is at most what its namespace has left (a default
  above it is lowered to it; asking for more is RESOURCE_EXHAUSTED, as is nothing left);
- kv_bytes: a new conversation context (or fork) is RESOURCE_EXHAUSTED while the namespace's
  contexts hold the quota or more (services/inference.py; a context's own growth is bounded by
  its process's limits.kv_bytes);
- tokens (inference tokens, prompt and completion, since the server started) and
  tokens_per_minute (over the last 60 s): a request is refused with RESOURCE_EXHAUSTED once the
  namespace has none left, and its max_tokens is cut to what is left (Request.token_budget).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass, fields

from ..api import checks as C
from ..api.errors import ResourceExhausted
from .process import DEFAULT_WEIGHT, Limits
from .scheduler import Scheduler


class _Reservation:
    """The sums of a namespace's live processes' limits that its RESERVED quotas bound."""

    __slots__ = ("memory_bytes", "mailbox_bytes")

    def __init__(self) -> None:
        self.memory_bytes = 0
        self.mailbox_bytes = 0


# The quotas that bound the sum of live processes' limits of the same name.
RESERVED = _Reservation.__slots__
MINUTE_S = 60.0


@dataclass
class Quotas:
    memory_bytes: int = 0
    mailbox_bytes: int = 0
    kv_bytes: int = 0
    tokens: int = 0
    tokens_per_minute: int = 0


QUOTAS = tuple(f.name for f in fields(Quotas))


class _TokenUse:
    __slots__ = ("total", "window", "in_window")

    def __init__(self) -> None:
        self.total = 0
        self.window: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, tokens)
        self.in_window = 0

    def last_minute(self, now: float) -> int:
        while self.window and now - self.window[0][0] >= MINUTE_S:
            self.in_window -= self.window.popleft()[1]
        return self.in_window


class Namespaces:
    """Each namespace's weight (its share of CPU against the other namespaces' within a priority
    level, as cgroup v2's cpu.weight: the scheduler applies it, and the engine by tokens) and
    quotas. Reservations are changed under the kernel lock (reserve_locked, release_locked)."""

    def __init__(self, scheduler: Scheduler, defaults: Quotas) -> None:
        self._scheduler = scheduler
        self._defaults = defaults
        self._lock = threading.Lock()
        self._weights: dict[str, int] = {}
        self._quotas: dict[str, Quotas] = {}
        self._reserved: dict[str, _Reservation] = {}
        self._tokens: dict[str, _TokenUse] = {}

    def weight(self, name: str) -> int:
        return self._weights.get(name, DEFAULT_WEIGHT)

    def quotas(self, name: str) -> Quotas:
        return self._quotas.get(name, self._defaults)

    def set(self, name: str, weight: int, quotas: dict[str, int]) -> None:
        """Change a namespace's settings: 0 leaves the weight unchanged (DECISIONS.md); each quota
        named in `quotas` is set (0: none). Lowering a quota below its use ends nothing: new
        processes and requests are refused until the use is under it again."""
        C.name(name, "namespace")
        if weight:
            C.weight(weight)
        for key, value in quotas.items():
            if key not in QUOTAS:
                raise ValueError(f"no quota {key!r}")  # the RPC handler names only known ones
            C.integer(value, key)
        with self._lock:
            if weight:
                self._weights[name] = weight
                self._scheduler.set_namespace_weight(name, weight)
            if quotas:
                self._quotas[name] = Quotas(**{**asdict(self.quotas(name)), **quotas})

    # -- reservations: memory and mailbox bytes ------------------------------------------------
    def reserve_locked(self, name: str, asked: Limits, limits: Limits) -> Limits:
        """A new process's `limits` within what its namespace has left of each reserved quota
        (`asked`: what the caller asked for explicitly), reserved for it. Kernel lock held."""
        quotas = self.quotas(name)
        if quotas.memory_bytes or quotas.mailbox_bytes:  # (most namespaces have neither)
            limits = self._within_quotas(name, quotas, asked, limits)
        self.add_locked(name, limits)
        return limits

    def _within_quotas(self, name: str, quotas: Quotas, asked: Limits, limits: Limits) -> Limits:
        reserved = self._reserved.get(name) or _Reservation()
        lowered = {}
        for key in RESERVED:
            quota = getattr(quotas, key)
            if not quota:
                continue
            left, wanted = quota - getattr(reserved, key), getattr(asked, key)
            if left <= 0 or wanted > left:
                raise ResourceExhausted(
                    f"namespace {name!r} has {max(left, 0)} of its {key} quota of {quota} left "
                    f"(its live processes' limits hold the rest){f', not {wanted}' if wanted else ''}")
            current = getattr(limits, key)
            if not current or current > left:
                lowered[key] = left
        return Limits(**{**limits.as_dict(), **lowered}) if lowered else limits

    def add_locked(self, name: str, limits: Limits) -> None:
        """Count a process's limits against its namespace (a new one's, or a port's restored at
        start). Kernel lock held."""
        reserved = self._reserved.get(name)
        if reserved is None:
            reserved = self._reserved[name] = _Reservation()
        reserved.memory_bytes += limits.memory_bytes
        reserved.mailbox_bytes += limits.mailbox_bytes

    def release_locked(self, name: str, limits: Limits) -> None:
        reserved = self._reserved[name]
        reserved.memory_bytes -= limits.memory_bytes
        reserved.mailbox_bytes -= limits.mailbox_bytes

    def reserved(self, name: str) -> dict[str, int]:
        reserved = self._reserved.get(name) or _Reservation()
        return {key: getattr(reserved, key) for key in RESERVED}

    # -- inference tokens -----------------------------------------------------------------------
    def token_budget(self, name: str) -> int | None:
        """Tokens the namespace may still use now (None: no token quota); RESOURCE_EXHAUSTED at 0."""
        quotas = self.quotas(name)
        if not quotas.tokens and not quotas.tokens_per_minute:
            return None
        with self._lock:
            use = self._tokens.setdefault(name, _TokenUse())
            lefts = []
            if quotas.tokens:
                lefts.append(("tokens", quotas.tokens, quotas.tokens - use.total))
            if quotas.tokens_per_minute:
                lefts.append(("tokens_per_minute", quotas.tokens_per_minute,
                              quotas.tokens_per_minute - use.last_minute(time.monotonic())))
        for key, quota, left in lefts:
            if left <= 0:
                raise ResourceExhausted(f"namespace {name!r} has used its {key} quota of {quota}")
        return min(left for _, _, left in lefts)

    def charge_tokens(self, name: str, tokens: int) -> None:
        with self._lock:
            use = self._tokens.setdefault(name, _TokenUse())
            now = time.monotonic()
            use.total += tokens
            use.window.append((now, tokens))
            use.in_window += tokens
            use.last_minute(now)

    def token_totals(self) -> dict[str, int]:
        """Each namespace's tokens since the server started (for /metrics)."""
        with self._lock:
            return {name: use.total for name, use in self._tokens.items()}

    def token_use(self, name: str) -> tuple[int, int]:
        """(tokens since the server started, tokens in the last minute)."""
        with self._lock:
            use = self._tokens.get(name)
            return (0, 0) if use is None else (use.total, use.last_minute(time.monotonic()))

"""Acknowledged, at-least-once delivery: leases on received messages.

A receive with `ack` leases the message it takes instead of consuming it: the
message leaves the mailbox (no other receive sees it) but is kept, with a
timer, until its receiver calls `ack(message_id)`. If the lease runs out, or
the receiver calls `nack`, the message goes back into the mailbox in its
original place (messages are kept in id order, and ids are handed out in
arrival order) or straight to a receiver waiting for it, and the next receive
with `ack` reports it with `attempt` one higher and `redelivered` set. A port's
leased message stays in the store until acknowledged, so a server restart
delivers it again too.

Dead letters: a mailbox may have `max_attempts` and a `dead_letter` target (a
live process or port), set at spawn or OpenPort. A message handed out
`max_attempts` times under a lease that runs out (or is nacked) once more dies
instead of going back; and when a receiver ends, every message still waiting in
its mailbox or leased dies, in id order. kernel/deadletters.py takes the dead:
to the sender if it asked for a notice, else to the target as a DEAD_LETTER
message with its history, else to the namespace's dead-letter queue.

Receives without `ack` never come here: the mailbox (kernel/mailbox.c) and the
Lua fast path (lua/fast_paths.c) are unchanged, and a message they take is
consumed whatever its history. `attempt` is reported by receives with `ack`.

Every method is called with the kernel lock held; the lease timers take it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..api import checks as C
from ..api.authority import process_caller
from ..api.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from . import process as P
from .deadletters import DeadLetters
from .mailbox import ANY, Match, Message
from .process import Process
from .store import Store
from .waiting import Timer, Timers, Waiter

DEFAULT_LEASE_S = 30.0  # a lease when the receive names none (as SQS's default visibility timeout)
# A batch receive's reply holds at most this many bytes per message beyond its size (Message.size:
# body, data, tag, correlation id): ids, pids, times, attempt and the fields' tags and lengths.
BATCH_OVERHEAD = 96
MAX_ATTEMPTS = 1_000_000


@dataclass(frozen=True, slots=True)
class DeadLetterPolicy:
    target: int  # the pid that gets the dead letters; 0: none (the namespace's queue)
    max_attempts: int  # 0: no limit


@dataclass(frozen=True, slots=True)
class Leased:
    """A message handed out under a lease: what a receive with `ack` answers."""

    msg: Message
    attempt: int  # 1 the first time it is handed out

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1


class _Lease:
    __slots__ = ("msg", "attempt", "group")

    def __init__(self, msg: Message, attempt: int, group: _LeaseGroup) -> None:
        self.msg = msg
        self.attempt = attempt
        self.group = group

    def end(self) -> None:
        """Settled (or given back): its group's timer is cancelled once none of the group is leased."""
        group = self.group
        group.left -= 1
        if not group.left and group.timer is not None:
            group.timer.cancel()
            group.leases = []  # the cancelled timer waits in the heap until its time: not with the messages


class _LeaseGroup:
    """The leases handed out by one receive (one, or a batch's): one timer runs them all out."""

    __slots__ = ("leases", "left", "timer")

    def __init__(self) -> None:
        self.leases: list[_Lease] = []
        self.left = 0  # how many of them are still leased
        self.timer: Timer | None = None


class _LeasingReceiver:
    """What a receive with `ack` that found nothing leaves in the mailbox's receivers: the mailbox
    hands it the next matching message, which it leases before waking the real waiter. It is
    registered by the real waiter (Waiter.register), so the waiter's leaving (a timeout, its
    process killed, its RPC cancelled) takes it out of the mailbox too."""

    __slots__ = ("acks", "proc", "waiter", "lease_s", "queue")

    def __init__(self, acks: Acks, proc: Process, waiter: Waiter, lease_s: float) -> None:
        self.acks, self.proc, self.waiter, self.lease_s = acks, proc, waiter, lease_s
        self.queue: Any = None  # set to None by the mailbox as it hands a message over

    def complete(self, msg: Message) -> bool:
        if self.waiter.done:  # cannot happen while registered; never lose the message for it
            self.acks.redeliver_locked(self.proc, msg)
            return False
        self.waiter.queue = None  # the mailbox took the entry out already
        return self.waiter.complete(self.acks.lease_locked(self.proc, msg, self.lease_s, stored=False))

    def abandon(self) -> None:  # the mailbox is closing
        self.waiter.queue = None
        self.waiter.abandon()


class Acks:
    """The leases of every mailbox. Call every method with the kernel lock held."""

    def __init__(self, lock: threading.Lock, timers: Timers, procs: dict[int, Process], store: Store,
                 store_port_message: Callable[[Message], None], dead_letters: DeadLetters,
                 live: Callable[[int, str], Process]) -> None:
        """The kernel's lock, timers, live processes (its own dict), store and dead letters, and its calls
        that store a port's message and find a live process."""
        self._lock = lock
        self._timers = timers
        self._procs = procs
        self._store = store
        self._store_port_message = store_port_message
        self._dead_letters = dead_letters
        self._live = live
        self._policies: dict[int, DeadLetterPolicy] = {}  # receiver pid -> its dead-letter policy
        self._leases: dict[int, dict[int, _Lease]] = {}  # owner pid -> message id -> lease
        self._attempts: dict[int, dict[int, int]] = {}  # owner pid -> message id -> times handed out, while back

    def recv_locked(self, proc: Process, match: Match, waiter: Waiter, timeout_s: float | None,
                    lease_s: float | None) -> Leased | None:
        """Take and lease a matching message now, or register `waiter` to get one (None)."""
        lease_s = DEFAULT_LEASE_S if lease_s is None else lease_s
        self._lease_room(proc)
        msg = proc.mailbox.take(match)
        if msg is not None:
            return self.lease_locked(proc, msg, lease_s, stored=True)
        receiver = _LeasingReceiver(self, proc, waiter, lease_s)
        waiter.register(proc.mailbox.receivers, (receiver, match))
        self._timers.time_out(self._lock, waiter, timeout_s)
        return None

    def recv_many_locked(self, proc: Process, match: Match, waiter: Waiter, timeout_s: float | None,
                         lease_s: float | None, most: int, budget: int) -> list[Leased] | None:
        """A batch receive with ack: lease up to `most` matching messages waiting now (as many as fit
        `budget` bytes, at least one), or register `waiter` to get the first (None; then more_locked)."""
        self._lease_room(proc)
        leased = self.more_locked(proc, match, lease_s, most, budget)
        return leased or self.recv_locked(proc, match, waiter, timeout_s, lease_s)

    def more_locked(self, proc: Process, match: Match, lease_s: float | None, most: int,
                    budget: int) -> list[Leased]:
        """Lease the matching messages waiting now, oldest first: at most `most`, and no more than the
        mailbox's limit of leases leaves room for (none: []); they stop before their sizes pass `budget`
        (taking one at least)."""
        lease_s = DEFAULT_LEASE_S if lease_s is None else lease_s
        room = proc.mailbox.limit - self.leased(proc.pid)
        taken = take_batch(proc.mailbox, match, min(most, room), budget)
        return self._lease_all(proc, taken, lease_s) if taken else []

    def _lease_room(self, proc: Process) -> None:
        """ResourceExhausted if `proc` holds as many leases as its mailbox's limit allows."""
        held = self.leased(proc.pid)
        if held >= proc.mailbox.limit:
            raise ResourceExhausted(f"pid {proc.pid} holds {held} leased messages, its mailbox's limit: "
                                    "ack or nack some first")

    def lease_locked(self, proc: Process, msg: Message, lease_s: float, stored: bool) -> Leased:
        """Lease `msg`, just taken from `proc`'s mailbox (`stored`: a port's, from the store's copy)."""
        if proc.kind == P.PORT and not stored:  # handed straight to a waiting receiver: never stored
            self._store_port_message(msg)
        return self._lease_all(proc, [msg], lease_s)[0]

    def _lease_all(self, proc: Process, msgs: list[Message], lease_s: float) -> list[Leased]:
        """Lease `msgs`, just taken from `proc`'s mailbox, under one timer."""
        pid = proc.pid
        attempts = self._attempts.get(pid)
        leases = self._leases.setdefault(pid, {})
        group = _LeaseGroup()
        out = []
        for msg in msgs:
            attempt = (attempts.pop(msg.id, 0) if attempts else 0) + 1
            lease = _Lease(msg, attempt, group)
            group.leases.append(lease)
            leases[msg.id] = lease
            out.append(Leased(msg, attempt))
        if attempts is not None and not attempts:
            del self._attempts[pid]
        group.left = len(msgs)
        group.timer = self._timers.call_later(lease_s, lambda: self._expire(pid, group))
        return out

    def ack(self, pid: int, message_id: int) -> None:
        """The message is done with: forget it (a port's leaves the store)."""
        lease = self._take_lease(pid, message_id, "ack")
        if self._procs[pid].kind == P.PORT:
            self._store.delete_message(lease.msg.id)

    def nack(self, pid: int, message_id: int) -> None:
        """The receiver gives the message back: deliver it again now."""
        self._back(pid, self._take_lease(pid, message_id, "nack"))

    def ack_many(self, pid: int, message_ids: list[int]) -> list[int]:
        """Ack each of `message_ids` that `pid` holds leased (a port's leave the store in one
        transaction); the others, on which it holds no lease, are answered (nothing is done for them)."""
        settled, not_leased = self._take_leases(pid, message_ids)
        if settled and self._procs[pid].kind == P.PORT:
            self._store.delete_messages([lease.msg.id for lease in settled])
        return not_leased

    def nack_many(self, pid: int, message_ids: list[int]) -> list[int]:
        """Nack each of `message_ids` that `pid` holds leased; the others are answered, as ack_many's."""
        settled, not_leased = self._take_leases(pid, message_ids)
        for lease in settled:
            self._back(pid, lease)
        return not_leased

    def give_back(self, pid: int, leased: Leased) -> None:
        """A receive took and leased `leased` but could not hand it over (its RPC was cancelled):
        back where it was, as if never handed out."""
        leases = self._leases.get(pid)
        lease = leases.get(leased.msg.id) if leases is not None else None
        if lease is None:
            return
        self._take_lease(pid, leased.msg.id, "give back")
        lease.attempt -= 1
        self._back(pid, lease)

    def policy(self, dead_letter: Any, max_attempts: Any, namespace: str, what: str = "") -> DeadLetterPolicy | None:
        """A spawn's or OpenPort's dead-letter options, checked (None: neither given): the target
        is a live process or port of `namespace` (another namespace's does not exist for it)."""
        if not dead_letter and not max_attempts:
            return None  # the common case, before the f-strings below are made
        attempts = C.integer(max_attempts or 0, f"{what}max_attempts")
        if not 0 <= attempts <= MAX_ATTEMPTS:
            raise InvalidArgument(f"{what}max_attempts must be between 0 (no limit) and {MAX_ATTEMPTS}, not {attempts}")
        if not dead_letter:
            return DeadLetterPolicy(0, attempts) if attempts else None
        target = C.pid(dead_letter, f"{what}dead_letter")
        self._live(target, "dead_letter", process_caller(0, namespace))  # another namespace's, ended too: NotFound
        return DeadLetterPolicy(target, attempts)

    def set_policy(self, pid: int, policy: DeadLetterPolicy | None) -> None:
        if policy is not None:
            self._policies[pid] = policy

    def process_ended(self, proc: Process) -> None:
        """`proc` has ended (its mailbox closed): its leases end, and what was leased or waiting dies
        (kernel/deadletters.py), in id order."""
        pid = proc.pid
        attempts = self._attempts.pop(pid, {})
        policy = self._policies.pop(pid, None)
        left = []
        for lease in self._leases.pop(pid, {}).values():
            lease.end()
            left.append((lease.msg, lease.attempt))
        while (msg := proc.mailbox.take(ANY)) is not None:
            left.append((msg, attempts.get(msg.id, 0)))
        if left or proc.mailbox.durable:
            left.sort(key=lambda entry: entry[0].id)
            self._dead_letters.undeliverable(proc, left, "receiver_ended", policy.target if policy else 0,
                                             port_ended=True)

    def leased(self, pid: int) -> int:
        """How many messages `pid` holds leased."""
        return len(self._leases.get(pid, ()))

    @staticmethod
    def kept_in_store(proc: Process, msgs: list[Message]) -> list[Message]:
        """Of `msgs`, delivered to `proc` in this order, those that stay stored: all but those that
        receives without ack waiting now take at once (each waiting receiver takes one, as the mailbox
        hands them out: to the first receiver that accepts it)."""
        receivers = list(proc.mailbox.receivers)
        if not receivers:
            return msgs
        kept = []
        for msg in msgs:
            at = next((i for i, (_, match) in enumerate(receivers) if match.accepts(msg)), None)
            if at is None or isinstance(receivers.pop(at)[0], _LeasingReceiver):
                kept.append(msg)
        return kept

    # -- inside -----------------------------------------------------------------------------
    def _take_lease(self, pid: int, message_id: int, what: str) -> _Lease:
        settled, _ = self._take_leases(pid, [message_id])
        if not settled:
            raise FailedPrecondition(
                f"cannot {what} message {message_id}: pid {pid} holds no lease on it (it was never received with "
                "ack, was acknowledged already, or its lease ran out and it was delivered again)")
        return settled[0]

    def _take_leases(self, pid: int, message_ids: list[int]) -> tuple[list[_Lease], list[int]]:
        """End `pid`'s leases on `message_ids`: (the leases ended, the ids it held no lease on)."""
        leases = self._leases.get(pid)
        if leases is None:
            return [], list(message_ids)
        settled, not_leased = [], []
        for message_id in message_ids:
            lease = leases.pop(message_id, None)
            if lease is None:
                not_leased.append(message_id)
                continue
            lease.end()
            settled.append(lease)
        if not leases:
            del self._leases[pid]
        return settled, not_leased

    def _expire(self, pid: int, group: _LeaseGroup) -> None:
        """The group's leases ran out: those still leased go back (in id order, as they were taken)."""
        with self._lock:
            leases = self._leases.get(pid)
            if leases is None:
                return  # settled, given back or ended meanwhile
            for lease in group.leases:
                if leases.get(lease.msg.id) is lease:
                    del leases[lease.msg.id]
                    self._back(pid, lease)
            if not leases and self._leases.get(pid) is leases:
                del self._leases[pid]

    def _back(self, pid: int, lease: _Lease) -> None:
        proc = self._procs.get(pid)
        if proc is None:
            return
        policy = self._policies.get(pid)
        if policy is not None and policy.max_attempts and lease.attempt >= policy.max_attempts:
            self._dead_letters.undeliverable(proc, [(lease.msg, lease.attempt)], "max_attempts", policy.target)
            return
        if lease.attempt:
            self._attempts.setdefault(pid, {})[lease.msg.id] = lease.attempt
        self.redeliver_locked(proc, lease.msg)

    def redeliver_locked(self, proc: Process, msg: Message) -> None:
        """Put `msg` back: to a receiver waiting for it, else in its place among the waiting."""
        mailbox = proc.mailbox
        receiver = next((who for who, match in mailbox.receivers if match.accepts(msg)), False)
        if receiver is False:
            mailbox.put_back(msg)
            return
        if proc.kind == P.PORT and not isinstance(receiver, _LeasingReceiver):
            self._store.delete_message(msg.id)  # a receive without ack consumes it
            self._attempts.get(proc.pid, {}).pop(msg.id, None)
        mailbox.deliver(msg, False)


def take_batch(mailbox: Any, match: Match, most: int, budget: int) -> list[Message]:
    """Take up to `most` matching messages from `mailbox`, oldest first, while their sizes (each with
    BATCH_OVERHEAD) stay within `budget` bytes; the first is taken whatever its size."""
    taken: list[Message] = []
    used = 0
    while len(taken) < most:
        msg = mailbox.take(match)
        if msg is None:
            break
        used += msg.size + BATCH_OVERHEAD
        if taken and used > budget:
            mailbox.put_back(msg)
            break
        taken.append(msg)
    return taken

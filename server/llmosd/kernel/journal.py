"""Durable processes: the journal of every syscall a durable process makes, and its replay.

A process spawned with `durable` has its spec (program, args, limits, ...), its
mailbox (the store's port_messages, keyed by its pid) and a journal: per
syscall, the call's name, a hash of its arguments and its result. When the
server starts again, kernel.py recreates each durable process that had not
ended (same pid) and its userland runs the program from the start; each
syscall is answered from the journal (`ProcessJournal.replay`) until the
journal runs out, and the process goes on live. A call whose name or argument
hash differs from the journal's ends the process CRASHED with reason
`replay_divergence`; a program loaded by path whose file changed ends it
CRASHED with reason `program_changed` (docs/durable-agents.md).

The durability rule (why nothing is done twice):
  1. Durable state is one ordered log: journal entries, durable processes' specs
     and their mailboxes' messages go through the store's ordered queue
     (`Store.enqueue`), written in order by the store's write-behind thread in
     batches (group commit, one transaction each). A kill -9 keeps a prefix of
     it. A syscall's entry and its effect on durable state (the message a send
     stores, the message a receive deletes, the spec of a durable child a spawn
     creates) are one unit of the queue, never split.
  2. So whatever a durable process did that another one saw is kept with
     everything it depended on, or neither is: a lost entry is a call made
     again, live, after the replay, with its effect lost with it.
  3. Effects outside that log (file changes, messages to ports, which external
     clients read) wait for the commit of everything queued before them
     (output commit: `ProcessJournal.commit`) and are made idempotent: an
     append first journals the file's size (an intent entry) and a replay that
     ends on such an intent cuts the file back to it before writing again.
  4. An effect on another process that happens after its call is answered
     is durable when the call is answered: a kill of a durable process that
     is running (its userland ends it at its next check) writes a kill
     intent (`Journal.kill_intent_op`, committed before Kill answers, so
     before the killer's entry); a restart ends a process that has one with
     its reason before anything runs (Kernel.start_recovered), rather than
     bring it back. A durable process's end (its exit, its EXIT notices to
     its watchers, its journal dropped) is one unit (Kernel.end_locked).
  5. A wait that was waiting when the server stopped waits again before
     anything runs: a process whose journal ends in a condition wait that gave
     its mutex back and was not woken holds its place on the condition from
     the restart (`WaitPlace`, Kernel._hold_wait_place), so that a signal made
     before its replay reaches the wait wakes it (journaled then, as any wake,
     read by the replay) rather than finding nobody waiting.
What is not durable: non-durable processes (children included) and what they
did, leases of acknowledged
receives, infer calls whose result was not journaled yet (they run again).
"""
from __future__ import annotations

import hashlib
import marshal
from typing import Any, Callable, Iterable

from .mailbox import Message
from .store import DELETE_MESSAGE, STORE_MESSAGE, Store
from .waiting import Waiter

REPLAY_DIVERGENCE = "replay_divergence"
PROGRAM_CHANGED = "program_changed"

_INSERT_ENTRY = "INSERT OR REPLACE INTO journal VALUES(?,?,?,?,?)"
_INSERT_SPEC = "INSERT OR REPLACE INTO durable_processes VALUES(?,?)"
# A kill intent is a row of its target's journal before its first entry (seq -1, never replayed): it
# goes with the journal when the process ends.
_KILL_INTENT_SEQ = -1
_KILL_INTENT = "killed"
_MASK = (1 << 64) - 1


# Calls that take or give back a lock: their entries also name the lock (kind, permits), so that a
# restart can give each durable process the locks it held before anything runs (held_locks).
# A condition wait is three entries (ProcessJournal.replay_cond_wait): cond_wait (the mutex released,
# journaled before anyone else can take it), cond_wait.woken (the signal or timeout that chose it,
# journaled at that moment: ProcessJournal.on_woken) and cond_reacquire (its answer, holding the mutex again).
LOCK_CALLS = frozenset(("lock_acquire_now", "lock_try", "lock_acquire", "lock_release", "cond_wait",
                        "cond_reacquire"))
_RELEASES = frozenset(("lock_release", "cond_wait"))  # their answer True: one permit given back
_BLOCKING_TAKES = frozenset(("lock_acquire", "cond_reacquire"))  # their answer: the program's resume values
# Where a condition wait whose journal ends with its release goes on live: it waits again holding nothing.
RELEASED = "released"


class Divergence(Exception):
    """The program made a different call than its journal has (its text says which)."""


_PLAIN = frozenset((int, float, bytes, str, bool, type(None)))


def args_hash(args: tuple) -> int:
    """A hash of a call's arguments that does not depend on a table's iteration order."""
    plain = _PLAIN
    if not all(type(v) in plain for v in args):
        args = _canonical(args)
    # Version 2: the later ones mark objects with more than one reference, so equal values could differ.
    return int.from_bytes(hashlib.blake2b(marshal.dumps(args, 2), digest_size=8).digest(), "little", signed=True)


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return ("d", tuple(sorted(((str(k), _canonical(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if kind is list or kind is tuple:
        return tuple(_canonical(v) for v in value)
    if kind is Message:
        return ("m", value.id)
    return value


# Results are marshalled (plain values, bytes and tuples, fast); a received message, which is no
# plain value and comes first in a receive's answer, is kept as a tuple there (Lua values never are).
def encode_result(result: Any) -> bytes:
    if type(result) is tuple and result and type(result[0]) is Message:
        result = (_message_fields(result[0]),) + result[1:]
    return marshal.dumps(result)


def decode_result(blob: bytes) -> Any:
    result = marshal.loads(blob)
    if type(result) is tuple and result and type(result[0]) is tuple:
        result = (Message(*result[0]),) + result[1:]
    return result


def _message_fields(m: Message) -> tuple:
    return (m.id, m.sender, m.to, m.tag, m.body, m.data, m.correlation_id, m.sent_at_ms)


def message_row(m: Message) -> tuple[str, Message]:
    """The op that stores `m` in its durable receiver's mailbox (its row is made by the store's writer)."""
    return STORE_MESSAGE, m


class WaitPlace(Waiter):
    """A recovered process's place on the condition its journal ends waiting on (rule 5): woken, it
    keeps the wake's answer (journaled by its on_woken) and takes no mutex; the replayed wait does."""

    __slots__ = ("value",)

    def _wake(self, value: Any) -> None:
        self.value = value


class ProcessJournal:
    """One durable process's journal: the entries a replay answers from, then the live ones."""

    __slots__ = ("pid", "store", "seed", "entries", "cursor", "divergence", "place")

    def __init__(self, pid: int, store: Store, seed: int, entries: list[tuple[str, int, bytes]] | None = None) -> None:
        self.pid = pid
        self.store = store
        self.seed = seed  # math.random's seed, the same in every run
        self.entries = entries or []  # (call, args hash, encoded result), journaled before this start
        self.cursor = 0  # the next entry a replayed call is answered from; == len(entries): live
        self.divergence: str | None = None  # why the replay failed, once it has
        self.place: WaitPlace | None = None  # its place on a condition, held from the restart (rule 5)

    @property
    def replaying(self) -> bool:
        return self.cursor < len(self.entries)

    def replay(self, call: str, args: Any) -> Any:
        """The journaled result of the next call, which must be `call` with these arguments."""
        seq = self.cursor
        name, digest, blob = self.entries[seq]
        if name != call or digest != args_hash(args):
            what = "the same call with other arguments" if name == call else "another call"
            self.divergence = (f"replay diverged at syscall #{seq + 1}: the journal has {name} "
                               f"(arguments hash {digest & _MASK:016x}), the program made {call} "
                               f"(arguments hash {args_hash(args) & _MASK:016x}): {what}")
            raise Divergence(self.divergence)
        self.cursor = seq + 1
        result = decode_result(blob)
        return result["answer"] if name in LOCK_CALLS else result

    def peek(self) -> str | None:
        """The name of the next journaled call, or None when live."""
        return self.entries[self.cursor][0] if self.replaying else None

    def entry_ops(self, call: str, digest: int, result: Any) -> list[tuple[str, tuple]]:
        """The op journaling a live call's result (queued by the caller, with its effects). Made while
        the process still replays (the wake of its held wait place, rule 5), the entry is replayed."""
        seq, blob = len(self.entries), encode_result(result)
        if self.cursor < seq:
            self.entries.append((call, digest, blob))
        else:
            self.entries.append((call, digest, b""))  # its result is never read again in this run
            self.cursor = seq + 1
        return [(_INSERT_ENTRY, (self.pid, seq, call, digest, blob))]

    def record(self, call: str, args: Any, result: Any, effects: Iterable[tuple[str, tuple]] = (),
               lock: tuple | None = None, cond: str | None = None) -> None:
        """Journal a live call's result, with the ops of its effects on durable state, as one unit.
        A call of LOCK_CALLS names its lock: (name, kind, permits); a condition wait's release, its
        condition (`cond`: where a restart puts it back, rule 5)."""
        if call in LOCK_CALLS:  # a dict: no tuple of it is taken for a message (decode_result)
            result = {"answer": result, "lock": lock}
            if cond is not None:
                result["cond"] = cond
        ops = self.entry_ops(call, args_hash(args), result)
        ops.extend(effects)
        self.store.enqueue(ops)

    def replay_cond_wait(self, replayed: Callable[[str], Any]) -> tuple[Any, Any]:
        """A condition wait's entries (LOCK_CALLS), each answered by `replayed(call)`: a runtime's
        replay of one entry, which gives its live marker once the journal has run out (and its
        refusal, or raises, on a divergence). Returns (answer, resume): `answer` is the journal's,
        or the live marker with `resume` saying where the live wait goes on: None (from the start),
        RELEASED (it waits again holding nothing) or the wake's {"signalled", "timed_out"} (it takes
        the mutex again)."""
        answer = replayed("cond_wait")
        if answer is not True:  # live from the start, refused at once, or diverged
            return answer, None
        resume: Any = RELEASED
        if self.peek() == "cond_wait.woken":
            resume = replayed("cond_wait.woken")
            if type(resume) is not dict:  # diverged
                return resume, None
        return replayed("cond_reacquire"), resume

    def waiting_at_end(self) -> tuple[str, str, int] | None:
        """(condition, mutex, arguments hash) of the condition wait this journal ends in, if it gave
        its mutex back and was not woken (rule 5)."""
        if not self.entries or self.entries[-1][0] != "cond_wait":
            return None
        _, digest, blob = self.entries[-1]
        result = decode_result(blob)
        if result["answer"] is not True or "cond" not in result:
            return None
        return result["cond"], result["lock"][0], digest

    def resume_at_wait(self, resume: Any) -> Any:
        """Where a condition wait replayed to the end of its journal goes on live (kernel lock held),
        its held place (rule 5) let go: a wake that came to the place once the replay had read the
        journal's end (its entry journaled already) is the wait's; otherwise `resume`."""
        place, self.place = self.place, None
        if place is None:
            return resume
        if place.done:
            return place.value if resume is RELEASED else resume
        place.abandon()
        return resume

    def on_woken(self, digest: int) -> Callable[[dict[str, bool], list | None], None]:
        """A condition wait's wake as services/sync.py calls it (its on_woken, kernel lock held):
        the cond_wait.woken entry of the wait whose arguments hash is `digest`, in the unit of a
        durable signaller's entry (`effects`) or in its own (None)."""
        def woken(answer: dict[str, bool], effects: list | None) -> None:
            ops = self.entry_ops("cond_wait.woken", digest, answer)
            if effects is None:
                self.store.enqueue(ops)
            else:
                effects.extend(ops)

        return woken

    def commit(self) -> None:
        """Output commit: everything queued so far is written before an effect outside the journal."""
        self.store.flush()

    def received(self, msg: Any) -> list[tuple[str, tuple]]:
        """The effects of a receive that took `msg` (anything else: none): it leaves the durable mailbox."""
        return self.received_id(msg.id) if type(msg) is Message else []

    @staticmethod
    def received_id(message_id: int) -> list[tuple[str, tuple]]:
        """The effects of a receive that took the message `message_id` (a Python agent's Recv)."""
        return [(DELETE_MESSAGE, (message_id,))]


class Journal:
    """The kernel's durable processes: their specs and journals in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def spec_op(self, pid: int, spec: dict[str, Any]) -> tuple[str, tuple]:
        return _INSERT_SPEC, (pid, marshal.dumps(spec))

    def specs(self) -> dict[int, dict[str, Any]]:
        """pid -> spec of every durable process the store has (ended ones are deleted)."""
        return {pid: marshal.loads(blob) for pid, blob in self.store.query("SELECT pid, spec FROM durable_processes")}

    def entries(self) -> dict[int, list[tuple[str, int, bytes]]]:
        out: dict[int, list[tuple[str, int, bytes]]] = {}
        for pid, call, digest, blob in self.store.query(
                "SELECT pid, call, args_hash, result FROM journal WHERE seq>=0 ORDER BY pid, seq"):
            out.setdefault(pid, []).append((call, digest, blob))
        return out

    @staticmethod
    def kill_intent_op(pid: int, reason: str) -> tuple[str, tuple]:
        """The op recording that `pid` (durable) was killed with `reason` but has not ended yet."""
        return _INSERT_ENTRY, (pid, _KILL_INTENT_SEQ, _KILL_INTENT, 0, marshal.dumps(reason))

    def kill_intents(self) -> dict[int, str]:
        """pid -> reason of every durable process killed before a crash that had not ended then."""
        return {pid: marshal.loads(blob) for pid, blob in self.store.query(
            "SELECT pid, result FROM journal WHERE seq=? AND call=?", (_KILL_INTENT_SEQ, _KILL_INTENT))}

    @staticmethod
    def held_locks(entries: list[tuple[str, int, bytes]]) -> dict[str, tuple[str, int, int]]:
        """The locks a journal's process holds at its end: name -> (kind, permits, times held)."""
        held: dict[str, tuple[str, int, int]] = {}
        for call, _, blob in entries:
            if call not in LOCK_CALLS:
                continue
            entry = decode_result(blob)
            answer, lock = entry["answer"], entry["lock"]
            if lock is None:
                continue
            name, kind, permits = lock
            count = held.get(name, (kind, permits, 0))[2]
            if call in _RELEASES:
                if answer is True:
                    count -= 1
            elif type(answer[0] if call in _BLOCKING_TAKES and type(answer) is tuple and answer else answer) is dict:
                count += 1
            if count > 0:
                held[name] = (kind, permits, count)
            else:
                held.pop(name, None)
        return held

    def ended_ops(self, pid: int) -> list[tuple[str, tuple]]:
        """An ended process's spec, journal and stored messages go."""
        return [
            ("DELETE FROM journal WHERE pid=?", (pid,)),
            ("DELETE FROM durable_processes WHERE pid=?", (pid,)),
            ("DELETE FROM port_messages WHERE port=?", (pid,)),
        ]


def program_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()

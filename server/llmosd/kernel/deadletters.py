"""Undeliverable messages: where each one goes, and the namespace's dead-letter queue.

A message dies when it is handed out under a lease more than its receiver's
`max_attempts` allows, or when its receiver ends with it still waiting or
leased (kernel/acks.py finds both). It is never silently dropped; it goes, in
this order of preference:
  1. to its sender, as a message tagged UNDELIVERED, if the sender asked
     (Send's notify_undelivered) and can take it;
  2. to its receiver's dead_letter target (a process or port, set at spawn or
     OpenPort), as a message tagged DEAD_LETTER, if there is one that can take it;
  3. to the dead-letter queue of its receiver's namespace, in the store, with
     its history (reason, attempts, receiver, when, and why not 1 or 2).
A notice or dead letter that its target refuses (its mailbox is full) or that
finds its target ended goes on down the list, so only a full queue drops
anything: the queue keeps at most `dead_letter_limit` messages a namespace,
dropping the oldest (counted, and logged).

The queue is read, retried and purged through ListDeadLetters, GetDeadLetter,
RetryDeadLetter and PurgeDeadLetters (api/syscalls.py; `llmos dlq` in the CLI).
A stored mailbox's (a port's) messages move into the queue in one transaction
with their removal from the port, so a crash keeps each in one place or the
other; messages from memory reach the queue through the store's write-behind
(they were in memory only until then).

Every method but the readers is called with the kernel lock held.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable

from ..api import checks as C
from ..api.errors import InvalidArgument, KernelError, NotFound
from .mailbox import Message
from .process import Process
from .store import Store, now_ms

log = logging.getLogger(__name__)

DEAD_LETTER = "DEAD_LETTER"  # the tag of a message that died, sent to a dead_letter target
UNDELIVERED = "UNDELIVERED"  # the tag of the notice a sender asked for
NOTICE_HEADROOM = 4096  # what a notice's or dead letter's envelope may add beyond the message size limit

SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    receiver INTEGER NOT NULL,
    tag TEXT NOT NULL,
    body TEXT NOT NULL,
    data BLOB NOT NULL,
    correlation_id TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    dead_at_ms INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_namespace ON dead_letters (namespace, id);
"""
_COLUMNS = ("namespace", "message_id", "sender", "receiver", "tag", "body", "data", "correlation_id", "sent_at_ms",
            "reason", "attempts", "dead_at_ms", "detail")
_INSERT = f"INSERT INTO dead_letters ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"
_SELECT = f"SELECT id, {','.join(_COLUMNS)} FROM dead_letters"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    namespace: str
    message: Message
    receiver: int
    reason: str
    attempts: int
    dead_at_ms: int
    detail: str


class DeadLetters:
    """Routing of undeliverable messages, and the namespaces' dead-letter queues in the store."""

    def __init__(self, store: Store, procs: dict[int, Process], new_message: Callable[..., Message],
                 deliver: Callable[[Process, Message, bool], None], limit: int) -> None:
        """The kernel's store, live processes (its own dict), its calls that make a message and deliver one,
        and the most messages a namespace's queue keeps."""
        self._store = store
        self._procs = procs
        self._new_message = new_message
        self._deliver = deliver
        self.limit = limit
        store.transaction(lambda db: [db.execute(s) for s in SCHEMA.split(";") if s.strip()])
        self._counts: dict[str, int] = dict(store.query(
            "SELECT namespace, count(*) FROM dead_letters GROUP BY namespace"))
        self.dropped: dict[str, int] = {}  # namespace -> dropped since start (the queue was full)

    # -- routing (kernel lock held) --------------------------------------------------------------
    def undeliverable(self, receiver: Process, dead: list[tuple[Message, int]], reason: str, target: int,
                      port_ended: bool = False) -> None:
        """`dead` (message, times handed out), taken out of `receiver`'s mailbox or leases for `reason`:
        each to its sender, `target` (0: none) or the queue. A stored mailbox's copies leave the store in
        the queue's transaction (`port_ended`: all of the port's)."""
        rows = []
        for msg, attempts in dead:
            detail = self._route(receiver.pid, msg, reason, attempts, target)
            if detail is not None:
                rows.append((receiver.namespace, msg, receiver.pid, reason, attempts, now_ms(), detail))
        if receiver.mailbox.durable:
            ids = [(msg.id,) for msg, _ in dead]
            self._store.transaction(lambda db: self._write(db, rows, ids, receiver.pid if port_ended else 0))
        elif rows:
            self._store.write_later(lambda db: self._write(db, rows, (), 0))
        if rows:
            self._count(receiver.namespace, len(rows))

    def _route(self, receiver: int, msg: Message, reason: str, attempts: int, target: int) -> str | None:
        """Hand `msg` to its sender or `target`; None if one took it, else why neither did."""
        why = []
        if msg.notify_undelivered:
            notice = {"message_id": msg.id, "reason": reason, "receiver": receiver, "attempts": attempts,
                      "tag": msg.tag}
            refused = self._send(receiver, msg.sender, UNDELIVERED, notice, b"", msg.correlation_id)
            if refused is None:
                return None
            why.append(f"its sender asked for a notice, but {refused}")
        if target:
            body = {"reason": reason, "receiver": receiver, "attempts": attempts, "message": {
                "id": msg.id, "from": msg.sender, "to": msg.to, "tag": msg.tag, "body": msg.body,
                "sent_at_ms": msg.sent_at_ms}}
            refused = self._send(receiver, target, DEAD_LETTER, body, msg.data, msg.correlation_id)
            if refused is None:
                return None
            why.append(f"its dead_letter target: {refused}")
        return "; ".join(why) or "its receiver has no dead_letter target"

    def _send(self, sender: int, to: int, tag: str, body: Any, data: bytes, correlation_id: str) -> str | None:
        """Deliver a notice; None if delivered, else why not."""
        dst = self._procs.get(to)
        if dst is None:
            return f"pid {to} has ended" if to else "it has no pid (an anonymous client)"
        try:
            self._deliver(dst, self._new_message(sender, to, tag, body, data, correlation_id, NOTICE_HEADROOM), True)
        except KernelError as e:
            return f"pid {to} refused it: {e}"
        return None

    def _count(self, namespace: str, added: int) -> None:
        """Count `added` new ones; past the limit the oldest are dropped (in the next write)."""
        count = self._counts.get(namespace, 0) + added
        excess = count - self.limit
        if excess > 0:
            self.dropped[namespace] = self.dropped.get(namespace, 0) + excess
            log.warning("the dead-letter queue of namespace %r is full (%d): its %d oldest dropped",
                        namespace, self.limit, excess)
            self._store.write_later(lambda db: db.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE namespace=? ORDER BY id "
                "LIMIT ?)", (namespace, excess)))
            count = self.limit
        self._counts[namespace] = count

    @staticmethod
    def _write(db: sqlite3.Connection, rows: list[tuple], stored_ids: Any, port: int) -> None:
        """Rows made by `undeliverable` (serialized here: in the write-behind thread, off the kernel lock)."""
        db.executemany(_INSERT, [
            (namespace, msg.id, msg.sender, receiver, msg.tag, json.dumps(msg.body), msg.data, msg.correlation_id,
             msg.sent_at_ms, reason, attempts, dead_at_ms, detail)
            for namespace, msg, receiver, reason, attempts, dead_at_ms, detail in rows])
        db.executemany("DELETE FROM port_messages WHERE id=?", stored_ids)
        if port:
            db.execute("DELETE FROM port_messages WHERE port=?", (port,))

    # -- the queue (no kernel lock needed, but `forget` and `take` need it) ---------------------------
    def list(self, namespace: str, after_id: int, limit: int, receiver: int = 0) -> list[DeadLetter]:
        where, params = "namespace=? AND id>?", [namespace, after_id]
        if receiver:
            where += " AND receiver=?"
            params.append(receiver)
        return [_dead_letter(r) for r in self._store.query(f"{_SELECT} WHERE {where} ORDER BY id LIMIT ?",
                                                          (*params, limit))]

    def get(self, namespace: str, dead_letter_id: int) -> DeadLetter:
        dead_letter_id = C.message_id(dead_letter_id, "id")
        rows = self._store.query(f"{_SELECT} WHERE namespace=? AND id=?", (namespace, dead_letter_id))
        if not rows:
            raise NotFound(f"no dead letter {dead_letter_id} in namespace {namespace!r}")
        return _dead_letter(rows[0])

    def count(self, namespace: str) -> int:
        return self._counts.get(namespace, 0)

    def retry_locked(self, dead: DeadLetter, to: Process) -> int:
        """Send `dead`'s message again to `to` (kernel lock held), as its sender; the new message's id.
        It leaves the queue once delivered; a refusal (a full mailbox) leaves it there. Under the lock,
        a second retry of the same one finds it gone (NotFound)."""
        if not self._store.query("SELECT 1 FROM dead_letters WHERE id=?", (dead.id,)):
            raise NotFound(f"no dead letter {dead.id} in namespace {dead.namespace!r} (retried or purged meanwhile)")
        msg = dead.message
        again = self._new_message(msg.sender, to.pid, msg.tag, msg.body, msg.data, msg.correlation_id)
        self._deliver(to, again, True)
        self.forget_locked(dead.namespace, [dead.id])
        return again.id

    def forget_locked(self, namespace: str, ids: list[int]) -> int:
        """Take dead letters out of the queue (kernel lock held): how many were there."""
        if not ids:
            return 0
        found: list[int] = []

        def delete(db: sqlite3.Connection) -> None:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                found.append(db.execute(f"DELETE FROM dead_letters WHERE namespace=? AND id IN ({marks})",
                                        (namespace, *chunk)).rowcount)
        self._store.transaction(delete)
        gone = sum(found)
        self._counts[namespace] = max(self._counts.get(namespace, 0) - gone, 0)
        return gone

    def purge_locked(self, namespace: str, ids: list[int], everything: bool, before_ms: int) -> int:
        """Take out of `namespace`'s queue for good (lock held) exactly one of: `ids`, `everything`, or
        those that came before `before_ms`. How many went."""
        if sum((bool(ids), everything, bool(before_ms))) != 1:
            raise InvalidArgument("purge needs exactly one of ids, all or before_ms")
        if before_ms < 0:
            raise InvalidArgument(f"before_ms is a unix time in ms, not {before_ms}")
        if ids:
            return self.forget_locked(namespace, ids)
        found: list[int] = []
        where, params = ("namespace=? AND dead_at_ms<?", (namespace, before_ms)) if before_ms else ("namespace=?",
                                                                                                    (namespace,))
        self._store.transaction(lambda db: found.append(
            db.execute(f"DELETE FROM dead_letters WHERE {where}", params).rowcount))
        self._counts[namespace] = max(self._counts.get(namespace, 0) - found[0], 0)
        return found[0]


def _dead_letter(row: tuple) -> DeadLetter:
    (id_, namespace, message_id, sender, receiver, tag, body, data, correlation_id, sent_at_ms, reason, attempts,
     dead_at_ms, detail) = row
    msg = Message(message_id, sender, receiver, tag, json.loads(body), bytes(data), correlation_id, sent_at_ms)
    return DeadLetter(id_, namespace, msg, receiver, reason, attempts, dead_at_ms, detail)

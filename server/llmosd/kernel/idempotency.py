"""Idempotent sends: a Send's `idempotency_key` makes a retried send a no-op.

The first send with a key from a sender (its `from` pid; for a client sending
with `from` 0, its token: every single-user client of a namespace is one
sender, and had better make its keys unique, as the SDK's random ones are)
is remembered, with its message id, for the retention window
(KernelConfig.idempotency_window_ms, `--idempotency-window-s`, 10 minutes by
default). A send with the same key from the same sender within the window is
answered with that first message id, and nothing new is stored or delivered,
whatever its receiver or body. The window is what a client's retries must fit
in: the SDK's retries of a send (llmos.Client) take seconds.

A key sent to a stored mailbox (a port) is stored with the message, in its
transaction, and so survives a restart or a `kill -9` of the server; keys of
messages to in-memory mailboxes live in memory, as those messages do. At most
`limit` keys are kept (KernelConfig.idempotency_keys); past it the oldest are
forgotten early, so under that much traffic the window is shorter.

Every method is called with the kernel lock held.
"""
from __future__ import annotations

import itertools
import sqlite3
from typing import Callable

from ..api import checks as C
from ..api.authority import Caller
from .store import Store, now_ms

Key = tuple[str, str]  # (the sender, as key() names it; the key)

SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    sender TEXT NOT NULL,
    key TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, key)
)
"""
PRUNE_EVERY = 1024  # stored keys written between two deletions of the expired ones


class IdempotencyKeys:
    def __init__(self, store: Store, window_ms: int, limit: int) -> None:
        self._store = store
        self.window_ms = window_ms
        self.limit = limit
        now = now_ms()
        store.transaction(lambda db: (db.execute(SCHEMA),
                                      db.execute("DELETE FROM idempotency_keys WHERE expires_at_ms<=?", (now,))))
        # (sender, key) -> (message id, expiry), oldest first (a key is never renewed while it lives)
        self._keys: dict[Key, tuple[int, int]] = {
            (sender, key): (message_id, expires) for sender, key, message_id, expires in store.query(
                "SELECT sender, key, message_id, expires_at_ms FROM idempotency_keys ORDER BY expires_at_ms")}
        self._stored_since_prune = 0

    @staticmethod
    def key(sender: int, caller: Caller | None, key: str) -> Key:
        """Whose `key` (checked) it is: the sending pid's, or with none, the client's (its namespace and token)."""
        C.text(key, "idempotency_key")
        if sender or caller is None:
            return str(sender), key
        return f"client {caller.namespace} {caller.key}", key

    def first(self, key: Key) -> int | None:
        """The message id the first send with `key` got, if within the window."""
        entry = self._keys.get(key)
        return entry[0] if entry is not None and entry[1] > now_ms() else None

    def remember(self, key: Key, message_id: int) -> None:
        """Remember a first send, once it is delivered."""
        now = now_ms()
        self._keys.pop(key, None)  # an expired one: the new one goes to the end
        self._keys[key] = (message_id, now + self.window_ms)
        for oldest in list(itertools.islice(self._keys, 16)):  # a few each time keeps up with inserts
            if self._keys[oldest][1] > now and len(self._keys) <= self.limit:
                break
            del self._keys[oldest]

    def stored(self, key: Key, message_id: int) -> Callable[[sqlite3.Connection], None]:
        """The write that stores a key with its stored message (in the message's transaction)."""
        return self.stored_many({key: message_id})

    def stored_many(self, keys: dict[Key, int]) -> Callable[[sqlite3.Connection], None]:
        """The write that stores keys with their stored messages (a batch's, in its transaction)."""
        now = now_ms()
        self._stored_since_prune += len(keys)
        prune = self._stored_since_prune >= PRUNE_EVERY
        if prune:
            self._stored_since_prune = 0

        rows = [(*key, message_id, now + self.window_ms) for key, message_id in keys.items()]

        def write(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR REPLACE INTO idempotency_keys VALUES (?,?,?,?)", rows)
            if prune:
                db.execute("DELETE FROM idempotency_keys WHERE expires_at_ms<=?", (now,))
        return write

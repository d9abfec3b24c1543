"""The audit log: every call that changes something (each RPC but the reader ones), who made it,
what it named and how it ended, in a SQLite database of its own (audit.db beside kernel.db),
bounded to the newest rows.

Calls are queued and written by a thread of the log's own, so that no RPC waits for the disk. Its
own file, because SQLite has one writer per database: in kernel.db, each batch held the write lock
that a port's message waits for while a Send or Recv is answered (the store's p99 write went from
0.3 to 1.1 ms in a Send+Recv loop). A batch is one INSERT statement (its own transaction): the
sqlite3 module releases the GIL for every statement it steps, and each release is a hand-off to the
threads that answer calls (a row per statement, with the cut and a BEGIN/COMMIT around them, made
the writer a third thread contending for the GIL in a Send+Recv loop). Rows beyond the newest
max_rows are cut once a tenth of max_rows more have come, and never read meanwhile. Lua processes'
syscalls are not audited: they are in-kernel programs, and auditing each message would cost the
fast paths.
"""
from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from typing import Any

from .authority import PROCESS, Caller
from ..kernel.store import padded_rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    namespace TEXT NOT NULL,
    who TEXT NOT NULL,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL
);
"""
DEFAULT_ROWS = 100_000  # the newest rows kept; older ones are deleted as new ones come
GATHER_S = 0.05  # how long the writer lets rows gather once one is queued: each batch takes the GIL a few times
ROWS_PER_STATEMENT = 128  # rows of one INSERT (6 parameters each, well within SQLite's limit); a power of two (padded_rows)
TARGET_FIELDS = ("pid", "to", "to_name", "target", "watcher", "parent", "name", "path", "from_path", "id", "namespace")


def who(caller: Caller) -> str:
    return f"pid {caller.pid}" if caller.role == PROCESS else f"{caller.role} {caller.key or '(no token)'}"


def target_of(req: Any) -> str:
    """What a request names, for the log: its first set field of TARGET_FIELDS."""
    for field in _target_fields(type(req)):
        value = getattr(req, field, None)
        if value:
            return f"{field}={value}"[:300]
    return ""


_TARGET_FIELDS_OF: dict[type, tuple[str, ...]] = {}  # a protobuf request type -> those of TARGET_FIELDS it has


def _target_fields(kind: type) -> tuple[str, ...]:
    """TARGET_FIELDS a request of type `kind` can have (asking a protobuf message for a field it lacks
    raises inside getattr, which costs more than the rest of the call's logging)."""
    fields = _TARGET_FIELDS_OF.get(kind)
    if fields is None:
        descriptor = getattr(kind, "DESCRIPTOR", None)
        if descriptor is None or not hasattr(descriptor, "fields_by_name"):
            return TARGET_FIELDS
        fields = _TARGET_FIELDS_OF[kind] = tuple(f for f in TARGET_FIELDS if f in descriptor.fields_by_name)
    return fields


class AuditLog:
    def __init__(self, data_dir: str, max_rows: int = DEFAULT_ROWS) -> None:
        self.max_rows = max_rows
        self._db = sqlite3.connect(os.path.join(data_dir, "audit.db"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # as the store's: survives a kill -9 of the server
        self._db.execute("PRAGMA cache_size=-256")  # KiB: it only appends; the kernel's store has the big cache
        self._db.executescript(SCHEMA)
        self._move_from_kernel_db(os.path.join(data_dir, "kernel.db"))
        self._db_lock = threading.Lock()
        # The newest row's id, and the id below which rows have been cut (read never returns those
        # below newest - max_rows, cut or not yet).
        self._newest = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0]
        self._cut_below = 0
        self._queue: list[tuple] = []  # (time.time(), caller, method, target, outcome) of each call
        self._queue_lock = threading.Lock()  # a plain lock: a call's record takes it (a Condition costs more)
        self._queued = threading.Event()  # set when a row is queued into an empty queue, and on close
        self._closed = False
        self._writer = threading.Thread(target=self._write_behind, name="audit-writer", daemon=True)
        self._writer.start()

    def _move_from_kernel_db(self, kernel_db: str) -> None:
        """Rows a server before audit.db wrote into kernel.db's audit table come here, once."""
        if not os.path.exists(kernel_db):
            return
        self._db.execute("ATTACH DATABASE ? AS kernel", (kernel_db,))
        try:
            if self._db.execute("SELECT 1 FROM kernel.sqlite_master WHERE type='table' AND name='audit'").fetchone():
                self._db.execute("BEGIN")
                try:
                    self._db.execute("INSERT INTO audit (at_ms, namespace, who, method, target, outcome) "
                                     "SELECT at_ms, namespace, who, method, target, outcome FROM kernel.audit ORDER BY id")
                    self._db.execute("DROP TABLE kernel.audit")
                finally:
                    self._db.execute("COMMIT")
        finally:
            self._db.execute("DETACH DATABASE kernel")

    def record(self, caller: Caller, method: str, target: str, outcome: str) -> None:
        if not self.max_rows:  # --audit-rows 0: no audit log
            return
        row = (time.time(), caller, method, target, outcome)  # made into the table's row by the writer (_flush)
        with self._queue_lock:
            self._queue.append(row)
            first = len(self._queue) == 1
        if first:
            self._queued.set()

    def read(self, limit: int, before_id: int = 0) -> list[tuple]:
        """The newest `limit` rows (below `before_id` if set), newest first:
        (id, at_ms, namespace, who, method, target, outcome)."""
        self._flush()
        with self._db_lock:
            return self._db.execute(
                "SELECT * FROM audit WHERE (?1 = 0 OR id < ?1) AND id > ?3 ORDER BY id DESC LIMIT ?2",
                (before_id, limit, self._newest - self.max_rows),
            ).fetchall()

    def _flush(self) -> None:
        with self._queue_lock:
            rows, self._queue = self._queue, []
        if not rows:
            return
        rows = [(int(at * 1000), caller.namespace, who(caller), method, target, outcome)
                for at, caller, method, target, outcome in rows]
        with self._db_lock:
            for start in range(0, len(rows), ROWS_PER_STATEMENT):
                chunk = rows[start:start + ROWS_PER_STATEMENT]
                self._newest = self._db.execute(*padded_rows(_insert_many, chunk)).lastrowid
            if self._newest - self.max_rows >= self._cut_below + max(self.max_rows // 10, 1):
                self._cut_below = self._newest - self.max_rows
                self._db.execute("DELETE FROM audit WHERE id <= ?", (self._cut_below,))

    def _write_behind(self) -> None:
        while True:
            self._queued.wait()
            if self._closed:
                return
            time.sleep(GATHER_S)  # let a burst gather into one statement
            self._queued.clear()  # before the rows are taken: one queued after that sets it again
            if self._closed:  # (its set may have been cleared just now) close() writes what is left
                return
            self._flush()

    def close(self) -> None:
        self._closed = True
        self._queued.set()
        self._writer.join()
        self._flush()
        self._db.close()


@functools.lru_cache(maxsize=8)
def _insert_many(n: int) -> str:
    """n rows in one statement; rows of NULLs (padded_rows') are skipped."""
    return ("INSERT INTO audit (at_ms, namespace, who, method, target, outcome) SELECT * FROM (VALUES "
            + ",".join(["(?, ?, ?, ?, ?, ?)"] * n) + ") WHERE column1 IS NOT NULL")

"""The kernel's durable state: one SQLite database (WAL) under the data directory.

What must survive a restart or a `kill -9` of the server lives here:
- the pid and message-id counters (ids are never reused),
- every process record and, once it has ended, its exit (for Wait),
- ports (external clients' mailboxes) and every message waiting in one,
- durable processes (spawned with durable): their specs, their mailboxes (in
  port_messages, whose `port` is the owning pid) and their journals
  (kernel/journal.py);
- the logs of the processes that ended last (`log_retention` of them).

Port operations are written and committed before the syscall answers.
Durable processes' writes (their journals, specs and mailboxes) go through
one ordered queue (`enqueue`), written in order in the write-behind batches
(group commit): a crash keeps a prefix of it (kernel/journal.py says why
that is enough). A unit of the queue (one call's ops) is never split.
Records of in-kernel processes (which die with the server anyway) go through
a write-behind queue flushed by a background thread, so that spawning
thousands of processes a second does not wait on SQLite. The queue keeps one
row per process, its columns merged (a process that starts and ends within a
batch is one row), and a batch is written with one statement per few
hundred rows: the sqlite3 module releases the GIL for every statement it
steps, and each release is a hand-off to a busy worker.

Why one file: every write to kernel.db goes through the one connection and
the one ordered queue here, and what a crash may keep (a prefix of the queue,
whole units) depends on how those writes are ordered and batched together;
the other tables' owners (dead letters, idempotency keys) write through it.
"""
from __future__ import annotations

import _sqlite3
import ctypes
import functools
import itertools
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from prometheus_client.core import HistogramMetricFamily, Metric

from .durations import Durations

if TYPE_CHECKING:
    from .process import Limits

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    parent INTEGER NOT NULL,
    namespace TEXT NOT NULL,
    priority INTEGER NOT NULL,
    weight INTEGER NOT NULL,
    limits TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    exit_reason TEXT,
    result TEXT,
    error TEXT,
    ended_at_ms INTEGER,
    usage TEXT,
    opener TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    role TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS port_messages (
    id INTEGER PRIMARY KEY,
    port INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    tag TEXT NOT NULL,
    body TEXT NOT NULL,
    data BLOB NOT NULL,
    correlation_id TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    notify_undelivered INTEGER NOT NULL DEFAULT 0  -- its sender wants an UNDELIVERED notice (kernel/deadletters.py)
);
CREATE INDEX IF NOT EXISTS port_messages_by_port ON port_messages (port, id);
CREATE TABLE IF NOT EXISTS durable_processes (
    pid INTEGER PRIMARY KEY,
    spec BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    pid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    call TEXT NOT NULL,
    args_hash INTEGER NOT NULL,
    result BLOB NOT NULL,
    PRIMARY KEY (pid, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS process_logs (
    pid INTEGER PRIMARY KEY,
    dropped INTEGER NOT NULL,  -- lines lost to the size limits before the first one kept
    lines TEXT NOT NULL        -- JSON: [[written at ms, text], ...]
);
"""

# Ids are handed out from blocks reserved in the database, so that a restart
# skips the rest of a block instead of reusing an id. A block is twice the
# size of the one before, up to the largest: a busy server reserves rarely
# (each reservation waits for the disk), an idle one keeps its ids small.
FIRST_ID_BLOCK = 4096
LARGEST_ID_BLOCK = 1 << 20

PROCESS_COLUMNS = (
    "pid", "kind", "name", "parent", "namespace", "priority", "weight", "limits", "started_at_ms", "state",
    "exit_reason", "result", "error", "ended_at_ms", "usage", "opener",
)
LOGS_KEPT_FROM = "logs_kept_from"  # a row of counters: the oldest pid whose log the last cut kept
NAME, STATE = PROCESS_COLUMNS.index("name"), PROCESS_COLUMNS.index("state")  # where they are in a row
ROWS_PER_STATEMENT = 512  # 16 columns each: within SQLite's 32,766 variables; a power of two (padded_rows)
# The write-behind batches (Store._gather_locked): the rows queued within GATHER_S of the first, and
# while they keep coming, up to GATHER_MAX_S: so non-durable processes' records reach the disk at most
# about GATHER_MAX_S after they change (a crash of the server may lose that much of them).
GATHER_S = 0.005
GATHER_MAX_S = 0.05


@dataclass(slots=True)
class ProcessRecord:
    pid: int
    kind: str
    name: str | None
    parent: int
    namespace: str
    priority: int
    weight: int
    limits: dict[str, int]
    started_at_ms: int
    state: str
    exit_reason: str | None = None
    result: Any = None
    error: str | None = None
    ended_at_ms: int | None = None
    usage: dict[str, int] | None = None  # final counters, once ended
    log: list[tuple[int, str]] | None = None  # the last log lines (kernel/logs.py); None: in the store only
    log_dropped: int = 0
    opener: str = ""  # a port's: the key of the client identity that opened it (api/authority.py)


@dataclass(slots=True)
class StoredMessage:
    id: int
    port: int
    sender: int
    tag: str
    body: Any
    data: bytes
    correlation_id: str
    sent_at_ms: int
    notify_undelivered: bool = False

# SQLite keeps a prepared statement's last bound values until it is bound again, and the sqlite3
# module keeps up to 128 prepared statements: a 4 MiB message or result written once stayed in
# memory for good, one per distinct statement (the store has dozens), charged to nobody. Once
# SQLite's memory passes this budget after a write, the connection is opened afresh, which lets
# those values go; the page cache (2 MB a connection) stays well under it.
SQLITE_MEMORY_BUDGET = 16 << 20
# A write that binds less than this cannot by itself take SQLite past the budget: all 128 cached
# statements holding such values come to 8 MiB. Its check is skipped (asking SQLite is a ctypes call,
# 3-4 us of the 50 a port's message write takes in the server).
SMALL_WRITE_BYTES = 64 << 10


def _sqlite_memory_used() -> Callable[[], int]:
    """SQLite's own count of the bytes it has allocated (the library the sqlite3 module uses)."""
    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype, used.argtypes = ctypes.c_int64, []
    return used


sqlite_memory_used = _sqlite_memory_used()

COMMIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# The sqlite3 module binds None as NULL only after it has looked for an adapter for it: two failed
# attribute lookups, each formatting an AttributeError (about 1,200 instructions per None, with the
# GIL held; a process's row binds up to seven, and padded_rows' pads are all None). One registered
# for None is found at once: an empty dict's get, which answers None in C (a lambda ran Python).
sqlite3.register_adapter(type(None), {}.get)


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    """Thread-safe access to the kernel database."""

    def __init__(self, data_dir: str, log_retention: int = 10_000) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "kernel.db")
        self._db = self._connect()
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(processes)")}
        if "opener" not in columns:  # a database from before ports had owners
            self._db.execute("ALTER TABLE processes ADD COLUMN opener TEXT NOT NULL DEFAULT ''")
        if "notify_undelivered" not in {row[1] for row in self._db.execute("PRAGMA table_info(port_messages)")}:
            self._db.execute("ALTER TABLE port_messages ADD COLUMN notify_undelivered INTEGER NOT NULL DEFAULT 0")
        self._db_lock = threading.Lock()  # one user of the connection at a time
        # Each transaction's time (a durable write, or a write-behind batch), for /metrics; observed
        # with _db_lock held.
        self._commit_seconds = Durations(COMMIT_BUCKETS_S)
        self._counters: dict[str, list[int]] = {}  # name -> [next, end of reserved block]
        # Counter name -> the block reserved ahead by the writer thread, and
        # the end of the last block handed out (ids only ever grow).
        self._spare: dict[str, tuple[int, int]] = {}
        self._handed: dict[str, int] = {}
        self._spares_wanted: set[str] = set()
        self._block_size: dict[str, int] = {}

        # Write-behind process rows: pid -> a whole row (PROCESS_COLUMNS) while
        # its spawn is not written yet, and pid -> columns to update for the
        # others. Their own lock, held only to add or take them, so that the
        # kernel never waits while a batch is being written.
        self._pending: dict[int, list[Any]] = {}
        self._pending_updates: dict[int, dict[str, Any]] = {}
        # Durable writes (sql, params) and write_later's (None, write), in the order they must be applied.
        self._ordered: list[tuple[str | None, Any]] = []
        self._pending_logs: dict[int, tuple[int, list[tuple[int, str]]]] = {}  # pid -> (dropped, lines)
        self._records_queued = 0  # process rows, updates and logs queued so far (_gather_locked)
        self.log_retention = log_retention
        self._logs_unpruned = 0  # logs written since the table was last cut to log_retention
        self._pending_lock = threading.Lock()
        self._flush_wanted = threading.Condition(self._pending_lock)
        self._closed = False
        self._writer = threading.Thread(target=self._write_behind, name="store-writer", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a crash of this process (kill -9), which
        # is the promise; only an OS crash could lose the last transactions.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def commit_seconds(self) -> Iterator[Metric]:
        """The commits' times, as /metrics shows them (api/metrics.py)."""
        family = HistogramMetricFamily("llmos_store_commit_seconds", "Time to commit a store transaction")
        self._commit_seconds.add_to(family, {})
        yield family

    def _let_go_of_bound_values(self) -> None:
        """After a write (the connection's lock held): see SQLITE_MEMORY_BUDGET."""
        if sqlite_memory_used() > SQLITE_MEMORY_BUDGET:
            self._db.close()
            self._db = self._connect()

    # ids -------------------------------------------------------------------------
    def next_id(self, counter: str) -> int:
        """The next id of `counter`. Callers serialize (the kernel holds its lock)."""
        block = self._counters.get(counter)
        if block is None or block[0] >= block[1]:
            block = self._counters[counter] = list(self.take_ids(counter))
        value = block[0]
        block[0] += 1
        return value

    def take_ids(self, counter: str) -> tuple[int, int]:
        """A block of ids of `counter`, [first, end), above every one handed
        out before and never given again, also after a restart. Callers
        serialize. The writer thread reserves the next block meanwhile: the
        reservation waits for the disk (and for a batch being written, tens of
        ms), and the caller typically holds the kernel lock."""
        with self._pending_lock:
            spare = self._spare.pop(counter, None)
            self._spares_wanted.add(counter)
            self._flush_wanted.notify()
        handed = self._handed.get(counter, 0)
        block = spare if spare is not None and spare[0] >= handed else self._reserve(counter)
        self._handed[counter] = block[1]
        return block

    def _reserve(self, counter: str) -> tuple[int, int]:
        with self._db_lock:
            size = self._block_size.get(counter, FIRST_ID_BLOCK)
            self._block_size[counter] = min(size * 2, LARGEST_ID_BLOCK)
            row = self._db.execute("SELECT next FROM counters WHERE name=?", (counter,)).fetchone()
            start = row[0] if row else 1
            self._db.execute(
                "INSERT INTO counters(name, next) VALUES(?, ?)"
                " ON CONFLICT(name) DO UPDATE SET next=excluded.next",
                (counter, start + size),
            )
        return start, start + size

    # process records ---------------------------------------------------------------
    def record_spawn(self, rec: Any, durable: bool = False) -> None:
        """`rec`: a ProcessRecord, or the kernel's Process itself (whose limits
        are a Limits), which has the same fields."""
        limits = _counters_json(rec.limits) if isinstance(rec.limits, dict) else _limits_json(rec.limits)
        row = [
            rec.pid, rec.kind, rec.name, rec.parent, rec.namespace, rec.priority, rec.weight,
            limits, rec.started_at_ms, rec.state, None, None, None, None, None, rec.opener,
        ]
        if durable:
            self._write_now(_INSERT_ONE, row)
            return
        with self._pending_lock:
            self._pending[rec.pid] = row
            self._records_queued += 1
            self._wake_writer()

    def record_exit(self, rec: ProcessRecord, durable: bool = False) -> None:
        self._update(rec.pid, STATE, _exit_values(rec), durable)

    @staticmethod
    def exit_op(rec: ProcessRecord) -> tuple[str, tuple]:
        """The op that records `rec`'s exit, for a unit of the ordered queue (`enqueue`)."""
        return _update_sql(STATE, len(values := _exit_values(rec))), (*values, rec.pid)

    def record_name(self, pid: int, name: str | None) -> None:
        self._update(pid, NAME, (name,), durable=False)

    def load_process(self, pid: int) -> ProcessRecord | None:
        self.flush()
        with self._db_lock:
            row = self._db.execute("SELECT * FROM processes WHERE pid=?", (pid,)).fetchone()
        return _record(row) if row else None

    def live_records(self) -> list[ProcessRecord]:
        with self._db_lock:
            rows = self._db.execute("SELECT * FROM processes WHERE ended_at_ms IS NULL ORDER BY pid").fetchall()
        return [_record(r) for r in rows]

    def ended_records(self, limit: int) -> list[ProcessRecord]:
        self.flush()
        with self._db_lock:
            rows = self._db.execute(
                "SELECT * FROM processes WHERE ended_at_ms IS NOT NULL ORDER BY pid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_record(r) for r in reversed(rows)]

    # process logs ----------------------------------------------------------------------
    def record_log(self, pid: int, lines: list[tuple[int, str]], dropped: int) -> None:
        """An ended process's log (a list the caller no longer changes), written behind (encoded by
        the writer, off the kernel lock); only the `log_retention` newest pids' are kept."""
        if self.log_retention <= 0 or not (lines or dropped):
            return
        with self._pending_lock:
            self._pending_logs[pid] = (dropped, lines)
            self._records_queued += 1
            self._wake_writer()

    def load_log(self, pid: int) -> tuple[list[tuple[int, str]], int] | None:
        """(lines, dropped before them) of an ended process's stored log; ([], 0) if it wrote none
        (an empty log is not stored); None if the store no longer keeps it (beyond log_retention:
        pids older than the last cut's, or every pid when it keeps none)."""
        self.flush()
        with self._db_lock:
            row = self._db.execute("SELECT dropped, lines FROM process_logs WHERE pid=?", (pid,)).fetchone()
            cut = None if row else self._db.execute("SELECT next FROM counters WHERE name=?",
                                                    (LOGS_KEPT_FROM,)).fetchone()
        if row:
            return [(at, text) for at, text in json.loads(row[1])], row[0]
        if self.log_retention <= 0 or (cut is not None and pid < cut[0]):
            return None
        return [], 0

    def _write_logs(self, logs: dict[int, tuple[int, list[tuple[int, str]]]]) -> None:
        """Part of _apply_pending's transaction: the logs, then the oldest cut beyond log_retention
        (once a tenth of it has been written since the last cut, so a cut is rare)."""
        self._db.executemany("INSERT OR REPLACE INTO process_logs VALUES (?, ?, ?)",
                             [(pid, dropped, json.dumps(lines, ensure_ascii=False))
                              for pid, (dropped, lines) in logs.items()])
        self._logs_unpruned += len(logs)
        if self._logs_unpruned > self.log_retention // 10:
            self._logs_unpruned = 0
            cut = self._db.execute("SELECT pid FROM process_logs ORDER BY pid DESC LIMIT 1 OFFSET ?",
                                   (self.log_retention - 1,)).fetchone()
            if cut is not None:  # remembered: below it, a log that is not here may have been cut (load_log)
                self._db.execute("DELETE FROM process_logs WHERE pid < ?", cut)
                self._db.execute("INSERT OR REPLACE INTO counters(name, next) VALUES(?, ?)", (LOGS_KEPT_FROM, cut[0]))

    # tokens: only their SHA-256 is kept -------------------------------------------------
    def add_token(self, token_id: str, sha256: str, namespace: str, role: str, label: str) -> None:
        self._write_now("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                        (token_id, sha256, namespace, role, label, now_ms()))

    def tokens(self) -> list[tuple[str, str, str, str, str, int]]:
        """(id, sha256, namespace, role, label, created_at_ms) of every token."""
        with self._db_lock:
            return self._db.execute("SELECT * FROM tokens ORDER BY created_at_ms, id").fetchall()

    def delete_token(self, token_id: str) -> bool:
        with self._db_lock:
            self._apply_pending()
            return self._db.execute("DELETE FROM tokens WHERE id=?", (token_id,)).rowcount > 0

    # port messages ---------------------------------------------------------------------
    def put_message(self, msg: StoredMessage, also: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Store a port's message; `also`, a write that must be in its transaction (an idempotency key)."""
        row = (
            msg.id, msg.port, msg.sender, msg.tag, json.dumps(msg.body), msg.data,
            msg.correlation_id, msg.sent_at_ms, msg.notify_undelivered,
        )
        if also is None:
            # (the body's JSON is ASCII: json.dumps escapes the rest)
            self._write_now(STORE_MESSAGE, row, small=len(row[4]) + len(msg.data) < SMALL_WRITE_BYTES)
        else:
            self.transaction(lambda db: (db.execute(STORE_MESSAGE, row), also(db)))

    def delete_message(self, message_id: int) -> None:
        self._write_now("DELETE FROM port_messages WHERE id=?", (message_id,), small=True)

    def put_messages(self, msgs: list[Any], also: list[Callable[[sqlite3.Connection], None]] = ()) -> None:
        """Store a batch of a port's messages (kernel Messages) in one transaction, with `also`'s writes."""
        rows = [_message_params(m) for m in msgs]
        self.transaction(lambda db: (db.executemany(STORE_MESSAGE, rows), [write(db) for write in also]))

    def delete_messages(self, message_ids: list[int]) -> None:
        """Take a batch of a port's messages out of the store, in one transaction."""
        if message_ids:
            self.transaction(lambda db: db.executemany(DELETE_MESSAGE, [(i,) for i in message_ids]))

    # other modules' tables (kernel/deadletters.py) ----------------------------------------
    def transaction(self, write: Callable[[sqlite3.Connection], None]) -> None:
        """Run `write` with the connection in one transaction, committed before this returns."""
        with self._db_lock:
            self._apply_pending()
            self._db.execute("BEGIN")
            try:
                write(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._let_go_of_bound_values()

    def write_later(self, write: Callable[[sqlite3.Connection], None]) -> None:
        """Run `write` with the connection in the write-behind thread's next batch (its transaction), in
        the ordered queue: after the durable writes queued before it, before those queued after."""
        with self._pending_lock:
            self._ordered.append((None, write))
            self._flush_wanted.notify()

    def query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        """The rows of a read, after every write asked for before it."""
        with self._db_lock:
            self._apply_pending()
            return self._db.execute(sql, params).fetchall()

    def delete_port_messages(self, port: int) -> None:
        self._write_now("DELETE FROM port_messages WHERE port=?", (port,), small=True)

    def port_messages(self, port: int) -> Iterator[StoredMessage]:
        with self._db_lock:
            rows = self._db.execute("SELECT * FROM port_messages WHERE port=? ORDER BY id", (port,)).fetchall()
        for r in rows:
            yield StoredMessage(r[0], r[1], r[2], r[3], json.loads(r[4]), bytes(r[5]), r[6], r[7], bool(r[8]))

    def stored_messages(self, pid: int) -> Iterator[StoredMessage]:
        """A durable process's or a port's stored messages, by id."""
        return self.port_messages(pid)

    # durable processes (kernel/journal.py) -------------------------------------------------
    def enqueue(self, ops: list[tuple[str, Any]]) -> None:
        """Queue writes of durable state, applied in order with the next batch, all of `ops` in one transaction."""
        with self._pending_lock:
            self._ordered.extend(ops)
            if len(self._ordered) == len(ops):
                self._flush_wanted.notify()

    # writing -----------------------------------------------------------------------------
    def _write_now(self, sql: str, row: tuple | list, small: bool = False) -> None:
        """One statement, committed now; `small`: it binds under SMALL_WRITE_BYTES."""
        with self._db_lock:
            # Earlier write-behind rows first, so the database never holds
            # an exit without its spawn.
            self._apply_pending()
            began = time.perf_counter()
            self._db.execute(sql, row)
            self._commit_seconds.observe(time.perf_counter() - began)
            if not small:  # (_apply_pending checks after its own batch)
                self._let_go_of_bound_values()

    def _update(self, pid: int, first: int, values: tuple, durable: bool) -> None:
        """Set the columns of a process's row from PROCESS_COLUMNS[first] on to `values`."""
        names = PROCESS_COLUMNS[first:first + len(values)]
        if durable:
            self._write_now(_update_sql(first, len(values)), (*values, pid))
            return
        with self._pending_lock:
            self._records_queued += 1
            row = self._pending.get(pid)
            if row is not None:  # its spawn is not written yet: one row for both
                row[first:first + len(values)] = values
                return
            self._pending_updates.setdefault(pid, {}).update(zip(names, values))
            self._wake_writer()

    def _queued_locked(self) -> int:
        """How many rows, updates, ordered writes and logs wait for the write-behind (pending lock held)."""
        return len(self._pending) + len(self._pending_updates) + len(self._ordered) + len(self._pending_logs)

    def _wake_writer(self) -> None:
        if self._queued_locked() == 1:  # the first: the writer may be asleep
            self._flush_wanted.notify()

    def _apply_pending(self) -> None:
        """Write the pending rows in one transaction (the connection's lock held,
        so that batches reach the database in the order they were taken):
        whole rows as multi-row inserts, the rest as updates."""
        with self._pending_lock:
            if not self._queued_locked():
                return  # the common case before a port's write: nothing behind it
            rows, self._pending = list(self._pending.values()), {}
            updates, self._pending_updates = self._pending_updates, {}
            ordered, self._ordered = self._ordered, []
            logs, self._pending_logs = self._pending_logs, {}
        by_columns: dict[tuple[str, ...], list[tuple]] = {}
        for pid, columns in updates.items():
            by_columns.setdefault(tuple(columns), []).append((pid, *columns.values()))
        began = time.perf_counter()
        self._db.execute("BEGIN")
        try:
            for start in range(0, len(rows), ROWS_PER_STATEMENT):
                chunk = rows[start:start + ROWS_PER_STATEMENT]
                self._db.execute(*padded_rows(_insert_many, chunk))
            for names, values in by_columns.items():
                for start in range(0, len(values), ROWS_PER_STATEMENT):
                    chunk = values[start:start + ROWS_PER_STATEMENT]
                    self._db.execute(*padded_rows(functools.partial(_update_many, names), chunk))
            for sql, params in _durable_batch(ordered):
                if sql is None:
                    params(self._db)  # a write_later's
                else:
                    self._db.executemany(sql, params)
            if logs:
                self._write_logs(logs)
        finally:
            self._db.execute("COMMIT")
            self._commit_seconds.observe(time.perf_counter() - began)
        self._let_go_of_bound_values()

    def flush(self) -> None:
        with self._db_lock:
            self._apply_pending()

    def _write_behind(self) -> None:
        while True:
            with self._pending_lock:
                while not self._queued_locked() and not self._spares_wanted and not self._closed:
                    self._flush_wanted.wait()
                if self._closed:  # close() writes what is left
                    return
                wanted, self._spares_wanted = self._spares_wanted, set()
            for counter in wanted:
                block = self._reserve(counter)
                with self._pending_lock:
                    self._spare[counter] = block
            with self._pending_lock:
                self._gather_locked()
            self.flush()

    def _gather_locked(self) -> None:
        """Let a burst gather into one transaction (pending lock held): GATHER_S after the writer
        woke, then, while process records keep coming (more in each GATHER_S), until GATHER_MAX_S
        has passed. A durable write (someone waits for it), ids wanted ahead and close end the
        gathering at once. Why: in a stream of spawns, each batch of GATHER_S took the GIL from the
        kernel a dozen times (the sqlite3 module releases it for every statement it prepares and
        steps, and the writer waits for it back), and a process spawned in one batch and ended in
        the next was written twice (an insert, then an update)."""
        if self._closed or not self._queued_locked():
            return
        deadline = time.monotonic() + GATHER_MAX_S
        queued = self._records_queued
        self._flush_wanted.wait(GATHER_S)
        while not (self._ordered or self._spares_wanted or self._closed):
            if self._records_queued == queued or time.monotonic() >= deadline:
                return
            queued = self._records_queued
            self._flush_wanted.wait(GATHER_S)

    def close(self) -> None:
        with self._pending_lock:
            self._closed = True
            self._flush_wanted.notify_all()
        self._writer.join()
        self.flush()
        self._db.close()


# The commonest values skip the json module, whose setup per call costs more
# than their encoding.
def _counters_json(counters: dict[str, int] | None) -> str:
    """A dict of the kernel's own counters (limits, usage) as JSON: its keys
    are plain identifiers and its values integers, the same keys every time."""
    if counters is None:
        return "null"
    keys = tuple(counters)
    template = _COUNTER_TEMPLATES.get(keys)
    if template is None:
        template = _COUNTER_TEMPLATES[keys] = "{" + ",".join(f'"{key}":%d' for key in keys) + "}"
    return template % tuple(counters.values())


_COUNTER_TEMPLATES: dict[tuple[str, ...], str] = {}


def _limits_json(limits: Limits) -> str:
    """A Limits as JSON. Most processes share one Limits (the server's defaults, or their
    parent's): its text is made once and kept by identity (a Limits never changes), with the
    object itself, so that no other can take its id meanwhile; 64 at most."""
    kept = _LIMITS_JSON.get(id(limits))
    if kept is not None and kept[0] is limits:
        return kept[1]
    if len(_LIMITS_JSON) >= 64:
        _LIMITS_JSON.clear()
    text = _counters_json(limits.as_dict())
    _LIMITS_JSON[id(limits)] = (limits, text)
    return text


_LIMITS_JSON: dict[int, tuple[Limits, str]] = {}


def _exit_values(rec: ProcessRecord) -> tuple:
    """`rec`'s columns from STATE on: state, exit_reason, result, error, ended_at_ms, usage."""
    return (rec.state, rec.exit_reason, _result_json(rec.result), rec.error, rec.ended_at_ms,
            _counters_json(rec.usage))


def _update_sql(first: int, count: int) -> str:
    """The UPDATE of a process's row's columns PROCESS_COLUMNS[first:first + count]."""
    return f"UPDATE processes SET {', '.join(f'{n}=?' for n in PROCESS_COLUMNS[first:first + count])} WHERE pid=?"


def _result_json(value: Any) -> str:
    return "null" if value is None else str(value) if type(value) is int else json.dumps(value)


_INSERT_ONE = f"INSERT OR REPLACE INTO processes({','.join(PROCESS_COLUMNS)}) VALUES ({','.join('?' * len(PROCESS_COLUMNS))})"


def padded_rows(statement: Callable[[int], str], rows: list[Sequence[Any]]) -> tuple[str, list]:
    """`statement(n)` and its parameters for `rows` (at least one, all of one width), padded with
    rows of NULLs, which the statement must skip, to the next power of two: a few statements, each
    prepared once and kept in the connection's cache. A statement per batch size was parsed anew
    for nearly every batch (thousands of parameters), and pushed an older one out of the cache:
    both with the GIL released, which handed it to a waiting thread each time."""
    n = 1 << (len(rows) - 1).bit_length()
    params = list(itertools.chain.from_iterable(rows))
    params.extend([None] * ((n - len(rows)) * len(rows[0])))
    return statement(n), params


@functools.lru_cache(maxsize=16)
def _insert_many(n: int) -> str:
    """n rows of values in PROCESS_COLUMNS' order, in one statement; rows whose pid is NULL are skipped."""
    row = f"({','.join('?' * len(PROCESS_COLUMNS))})"
    return (f"INSERT OR REPLACE INTO processes({','.join(PROCESS_COLUMNS)})"
            f" SELECT * FROM (VALUES {','.join([row] * n)}) WHERE column1 IS NOT NULL")


@functools.lru_cache(maxsize=32)
def _update_many(names: tuple[str, ...], n: int) -> str:
    """Columns `names` of n rows from values (pid, *values) each, in one statement; a row whose pid
    is NULL matches none."""
    row = f"({','.join('?' * (len(names) + 1))})"
    assignments = ", ".join(f"{name}=v.column{i + 2}" for i, name in enumerate(names))
    return (f"UPDATE processes SET {assignments} FROM (VALUES {','.join([row] * n)}) AS v"
            " WHERE processes.pid=v.column1")


# The durable writes (kernel/journal.py): a message's copy in a durable mailbox, and its removal
# (params: (id,)). A copy's params are the message itself (a Message, or anything with its fields):
# the writer makes its row, off the kernel lock, and only if its batch does not remove it again.
STORE_MESSAGE = "INSERT OR REPLACE INTO port_messages VALUES(?,?,?,?,?,?,?,?,?)"
DELETE_MESSAGE = "DELETE FROM port_messages WHERE id=?"


def _message_params(m: Any) -> tuple:
    return (m.id, m.to, m.sender, m.tag, _result_json(m.body), m.data, m.correlation_id, m.sent_at_ms,
            m.notify_undelivered)


def _durable_batch(ordered: list[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
    """A batch of the ordered queue as a few executemany calls (sql, rows) with the same end state
    in its transaction, and write_later's writes (None, write) where they were queued. Between two
    writes: a message whose last op there removes it is not stored first (durable processes hand
    most messages over at once), and the statements run inserts first (each row is inserted
    once), then removals of messages by id, then the rest (removals of whole processes' rows,
    which come after anything else of theirs)."""
    steps: list[tuple[str | None, Any]] = []
    last: dict[int, tuple[str, Any]] = {}  # message id -> its last op since the last write
    by_sql: dict[str, list[tuple]] = {}
    for sql, params in ordered:
        if sql is STORE_MESSAGE:
            last[params.id] = (sql, params)
        elif sql is DELETE_MESSAGE:
            last[params[0]] = (sql, params)
        elif sql is not None:
            by_sql.setdefault(sql, []).append(params)
        else:
            _statements(steps, last, by_sql)
            steps.append((None, params))
            last, by_sql = {}, {}
    _statements(steps, last, by_sql)
    return steps


def _statements(steps: list[tuple[str | None, Any]], last: dict[int, tuple[str, Any]],
                by_sql: dict[str, list[tuple]]) -> None:
    """_durable_batch's statements of the ops between two writes, in their order, onto `steps`."""
    for sql, params in last.values():
        by_sql.setdefault(sql, []).append(_message_params(params) if sql is STORE_MESSAGE else params)
    steps.extend(sorted(by_sql.items(), key=lambda item: 0 if item[0].startswith("INSERT") else
                        1 if item[0] is DELETE_MESSAGE else 2))


def _record(row: tuple) -> ProcessRecord:
    return ProcessRecord(
        pid=row[0], kind=row[1], name=row[2], parent=row[3], namespace=row[4], priority=row[5], weight=row[6],
        limits=json.loads(row[7]), started_at_ms=row[8], state=row[9], exit_reason=row[10],
        result=json.loads(row[11]) if row[11] is not None else None, error=row[12], ended_at_ms=row[13],
        usage=json.loads(row[14]) if row[14] else None, opener=row[15],
    )

"""The kernel's database (llmosd.kernel.store) on its own: the write-behind rows of
processes and the id blocks, through a real SQLite file, closed and opened
again as a restart would."""
from __future__ import annotations

import pathlib
import sqlite3
import time

from llmosd.kernel.process import Limits
from llmosd.kernel.store import (FIRST_ID_BLOCK, ROWS_PER_STATEMENT, SQLITE_MEMORY_BUDGET, ProcessRecord, Store,
                                 StoredMessage, sqlite_memory_used)


def record(pid: int, name: str | None = None) -> ProcessRecord:
    return ProcessRecord(
        pid=pid, kind="LUA", name=name, parent=1, namespace="default", priority=0, weight=100,
        limits={"cpu_ms": 0, "memory_bytes": 1 << 20}, started_at_ms=1000 + pid, state="RUNNABLE",
    )


def end(rec: ProcessRecord, result: object) -> ProcessRecord:
    rec.state, rec.exit_reason, rec.result, rec.ended_at_ms = "EXITED", "normal", result, 2000 + rec.pid
    rec.usage = {"cpu_ms": rec.pid, "messages_sent": 2}
    return rec


def test_process_rows_merge_and_batch_across_restarts(tmp_path: pathlib.Path) -> None:
    store = Store(str(tmp_path))
    n = ROWS_PER_STATEMENT + 7  # more than one statement's worth
    # Spawned and ended within one batch: one row each.
    for pid in range(1, n + 1):
        store.record_spawn(record(pid))
        store.record_exit(end(record(pid), {"pid": pid, "list": [1, None, "x"]}))
    store.flush()
    # Spawned in one batch, renamed and ended in the next: updates.
    for pid in range(n + 1, 2 * n + 1):
        store.record_spawn(record(pid))
    store.flush()
    for pid in range(n + 1, 2 * n + 1):
        store.record_name(pid, f"p{pid}")
        store.record_exit(end(record(pid), pid if pid % 2 else None))
    # Still running at the restart.
    store.record_spawn(record(10_000, name="live"))
    store.close()

    store = Store(str(tmp_path))
    first = store.load_process(1)
    assert first is not None and first.state == "EXITED" and first.result == {"pid": 1, "list": [1, None, "x"]}
    assert first.limits == {"cpu_ms": 0, "memory_bytes": 1 << 20} and first.usage == {"cpu_ms": 1, "messages_sent": 2}
    for pid in (n + 1, n + 2, 2 * n):
        rec = store.load_process(pid)
        assert rec is not None and rec.name == f"p{pid}" and rec.ended_at_ms == 2000 + pid
        assert rec.result == (pid if pid % 2 else None) and rec.started_at_ms == 1000 + pid
    assert [r.pid for r in store.live_records()] == [10_000]
    assert len(store.ended_records(10 * n)) == 2 * n
    store.close()


def test_each_process_row_keeps_its_own_limits(tmp_path: pathlib.Path) -> None:
    """A Limits' JSON is made once per Limits object and reused by identity: processes that share
    one, processes with their own (more than the store keeps texts for), and a Limits made again
    after an equal one went each read back their own limits."""
    store = Store(str(tmp_path))
    shared = Limits(memory_bytes=1 << 20, mailbox=5)
    given: dict[int, dict[str, int]] = {}  # not the objects: a freed one's id may be reused
    for pid in range(1, 201):
        limits = shared if pid % 2 else Limits(cpu_ms=pid, mailbox_bytes=pid * 10)
        rec = record(pid)
        rec.limits = limits  # a live Process's limits are a Limits (record_spawn takes either)
        store.record_spawn(rec)
        given[pid] = limits.as_dict()
        del limits, rec
    store.flush()
    for pid, limits in given.items():
        row = store.load_process(pid)
        assert row is not None and row.limits == limits, pid
    store.close()


def test_batches_of_any_size_write_their_rows_with_a_few_statements(tmp_path: pathlib.Path) -> None:
    """Each batch's rows go in one statement per ROWS_PER_STATEMENT, padded to a power of two with
    rows of NULLs that it skips (store.padded_rows): every row written once, no padding row written,
    and a few statements for all the batch sizes, not one per size."""
    class Recorded:
        """The connection, noting each statement it is given."""

        def __init__(self, db: sqlite3.Connection) -> None:
            self.db, self.statements = db, set()

        def execute(self, sql: str, *params: object) -> sqlite3.Cursor:
            self.statements.add(sql)
            return self.db.execute(sql, *params)

        def __getattr__(self, name: str) -> object:
            return getattr(self.db, name)

    store = Store(str(tmp_path))
    store._db = recorded = Recorded(store._db)
    pid, sizes = 0, [1, 2, 3, 5, 17, 31, 33, 64, 65, ROWS_PER_STATEMENT + 3]
    for size in sizes:
        pids = range(pid + 1, pid + size + 1)
        pid += size
        for p in pids:
            store.record_spawn(record(p))
        store.flush()
        for p in pids:
            store.record_exit(end(record(p), p))
        store.flush()
    assert store.query("SELECT COUNT(*), COUNT(DISTINCT pid), MIN(pid), MAX(pid) FROM processes") == [(pid, pid, 1, pid)]
    assert store.query("SELECT COUNT(*) FROM processes WHERE state != 'EXITED' OR result != CAST(pid AS TEXT)") == [(0,)]
    # 1, 2, 4, 8, 32, 64, 128 and ROWS_PER_STATEMENT rows (and 4 for the last batch's rest): 8 of each.
    assert len([sql for sql in recorded.statements if sql.startswith("INSERT")]) == 8
    assert len([sql for sql in recorded.statements if sql.startswith("UPDATE")]) == 8
    store.close()


def test_a_stream_of_records_is_written_in_few_transactions(tmp_path: pathlib.Path) -> None:
    """The write-behind gathers records while they keep coming (Store._gather_locked), up to
    GATHER_MAX_S: a record every millisecond for about 0.1 s is a couple of transactions, not one
    per GATHER_S (about 20); a process that spawns and ends meanwhile is one insert. Every record
    arrives, and a lone one is written after a quiet GATHER_S (flush waits for nothing here)."""
    store = Store(str(tmp_path))
    commits = lambda: sum(store._commit_seconds.counts)  # noqa: E731
    before = commits()
    for pid in range(1, 101):
        store.record_spawn(record(pid))
        store.record_exit(end(record(pid), pid))
        time.sleep(0.001)
    deadline = time.monotonic() + 10
    while store.query("SELECT COUNT(*) FROM processes WHERE state = 'EXITED'") != [(100,)] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.query("SELECT COUNT(*) FROM processes WHERE state = 'EXITED'") == [(100,)]
    assert commits() - before <= 8  # 2-3 here; allows a few stalls of this thread past GATHER_S
    store.close()


def test_ids_only_grow_and_are_never_given_twice(tmp_path: pathlib.Path) -> None:
    store = Store(str(tmp_path))
    handed = [store.next_id("pid") for _ in range(3 * FIRST_ID_BLOCK)]  # several blocks, some reserved ahead
    blocks = [store.take_ids("message") for _ in range(3)]
    store.close()
    assert handed == sorted(set(handed))
    assert all(a[1] <= b[0] for a, b in zip(blocks, blocks[1:]))
    assert blocks[1][1] - blocks[1][0] > blocks[0][1] - blocks[0][0]  # a busy counter reserves more at a time

    store = Store(str(tmp_path))
    assert store.next_id("pid") > max(handed)
    assert store.take_ids("message")[0] >= blocks[-1][1]
    store.close()


def test_big_values_written_do_not_stay_in_memory(tmp_path: pathlib.Path) -> None:
    """SQLite keeps each prepared statement's last bound values, and the sqlite3 module keeps
    statements: without the store's budget, every distinct statement that wrote a 3 MiB value
    would hold a copy of it for good. Written here through each kind of write (write-behind
    rows and updates, a port's message, another module's table), and a dozen distinct ones."""
    store = Store(str(tmp_path))
    big = "v" * (3 << 20)
    bound = SQLITE_MEMORY_BUDGET + (8 << 20)  # the budget, and the last write's values
    try:
        for pid in range(1, 13):
            store.record_spawn(record(pid))
            store.record_exit(end(record(pid), big + str(pid)))  # spawn and exit in one batch: one insert
            store.flush()
            store.put_message(StoredMessage(pid, 1, 0, "t", big, b"", "", 0))
            store.transaction(lambda db: db.execute(f"INSERT OR REPLACE INTO counters(name, next) VALUES (?, ?) -- {pid}",
                                                    (big + str(pid), pid)))
            assert sqlite_memory_used() < bound, f"SQLite holds {sqlite_memory_used() >> 20} MiB"
        for pid in range(1, 13):
            store.record_exit(end(record(pid), big))  # updates of written rows
            store.flush()
            assert sqlite_memory_used() < bound, f"SQLite holds {sqlite_memory_used() >> 20} MiB"
        assert store.load_process(12).result == big
    finally:
        store.close()

"""pool: a pool of worker processes with acknowledged jobs (docs/userland-library.md; the Lua
twin is pool.lua, `require "pool"`)::

    from llmos.std import pool

    # a worker program (spawned by the pool): handle each job, return its result
    pool.work(lambda job, info: job * job)            # info: {"id", "attempt", "args"}
    # a batch in this process: results in order
    out = pool.map([1, 2, 3], size=4, worker={"path": "python/square.py"})
    # out["results"][i] == {"ok": True, "result": 1, "attempts": 1}; out["redelivered"], ...
    # or a pool process serving other processes until pool.stop(pid)
    pool.run(size=4, worker={"lua": source}, name="squares")
    r = pool.call("squares", 7, timeout_ms=5000)      # {"ok", "result" | "error", "attempts"}

The dispatcher (the process running map or run) receives every message with ack, so each job
is leased, not consumed, while a worker has it; the job is acknowledged when its result comes.
When a worker ends before answering (it crashed, or was killed), the job is nacked: the kernel
delivers it again, in its original place, with attempt + 1, and a new worker is started. A job
that has been handed out max_attempts times fails with its last worker's error. Jobs
outstanding at once are at most the dispatcher's mailbox limit. Workers and dispatchers of
either language work together (the messages are the same).
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Callable

from llmos.errors import LlmosError
from llmos.userland import sys

FOREVER_MS = 315_360_000_000  # a lease that only the dispatcher ends (MAX_DURATION_MS)


class GaveUp(RuntimeError):
    """Workers kept ending: more restarts than max_restarts."""


def work(handler: Callable[[Any, dict[str, Any]], Any]) -> None:
    """The worker's side: take jobs from the pool that spawned this process and answer each with
    handler(job, {"id", "attempt", "args"}). A handler that raises ends the worker (the job goes back)."""
    source = sys.args.get("pool") if isinstance(sys.args, dict) else None
    if not source:
        raise RuntimeError("pool.work: this process was not started by a pool (no args['pool'])")
    while True:
        msg = sys.recv(sender=source, tag="pool.job")
        job = msg.body
        result = handler(job["job"], {"id": job["id"], "attempt": job["attempt"], "args": sys.args.get("args")})
        sys.send(source, {"id": job["id"], "result": result}, tag="pool.done")


def _dispatch(worker: dict[str, Any], size: int, max_attempts: int, max_restarts: int | None,
              finish: Callable[[Any, bool, Any], None], finished: Callable[[], bool]) -> dict[str, int]:
    if not isinstance(worker, dict):
        raise ValueError("pool: worker must be the workers' spawn keywords (lua=, python= or path=, ...)")
    me = sys.self()
    max_restarts = 10 * size if max_restarts is None else max_restarts
    workers: set[int] = set()
    idle: list[int] = []
    busy: dict[int, Any] = {}
    queue: list[Any] = []
    last_error: dict[int, str] = {}
    stats = {"done": 0, "failed": 0, "redelivered": 0, "workers_started": 0}

    def start_worker() -> None:
        spec = dict(worker, args={"pool": me, "args": worker.get("args")})
        pid = sys.spawn(**spec, monitor=True)
        workers.add(pid)
        idle.append(pid)
        stats["workers_started"] += 1

    def shutdown() -> None:
        for pid in workers:
            sys.kill(pid, "shutdown")
        for pid in workers:
            sys.recv(sender=pid, tag="EXIT")  # none left behind

    for _ in range(size):
        start_worker()
    while not finished():
        while queue and idle:
            job, pid = queue.pop(0), idle.pop()
            busy[pid] = job
            try:
                sys.send(pid, {"id": job.id, "attempt": job.attempt, "job": job.body}, tag="pool.job")
            except LlmosError:
                pass  # it ended meanwhile: its EXIT notice gives the job back
        msg = sys.recv(ack=True, lease_ms=FOREVER_MS)
        if msg.tag == "pool.job":
            if msg.attempt > max_attempts:
                sys.ack(msg)
                stats["failed"] += 1
                finish(msg, False, last_error.pop(msg.id, "failed"))
            else:
                queue.append(msg)
            continue
        sys.ack(msg)  # not a job: taken for good
        job = busy.get(msg.sender)
        if msg.tag == "pool.done" and job is not None and isinstance(msg.body, dict) and msg.body.get("id") == job.id:
            del busy[msg.sender]
            idle.append(msg.sender)
            sys.ack(job)
            stats["done"] += 1
            last_error.pop(job.id, None)
            finish(job, True, msg.body.get("result"))
        elif msg.tag == "EXIT" and msg.sender in workers:
            workers.discard(msg.sender)
            if msg.sender in idle:
                idle.remove(msg.sender)
            if job is not None:
                del busy[msg.sender]
                last_error[job.id] = str(msg.body.get("error") or msg.body.get("reason"))
                stats["redelivered"] += 1
                sys.nack(job)
            if stats["workers_started"] - size >= max_restarts:
                shutdown()
                raise GaveUp(f"pool: gave up after {max_restarts} worker restarts; the last ended with "
                             f"{msg.body.get('reason')}: {msg.body.get('error')}")
            start_worker()
        elif msg.tag == "pool.stop":
            for waiting in [*busy.values(), *queue]:
                sys.nack(waiting)  # back in the mailbox, not lost
            break
    shutdown()
    return stats


def _record(job: Any, ok: bool, value: Any) -> dict[str, Any]:
    if ok:
        return {"ok": True, "result": value, "attempts": job.attempt}
    return {"ok": False, "error": value, "attempts": job.attempt - 1}


def map(jobs: list[Any], worker: dict[str, Any], size: int = 4, max_attempts: int = 3,  # noqa: A001
        max_restarts: int | None = None) -> dict[str, Any]:
    """Run `jobs` on a pool of `size` workers in this process; the results in order:
    {"results": [{"ok", "result" | "error", "attempts"}...], "done", "failed", "redelivered",
    "workers_started"}."""
    me = sys.self()
    results: list[Any] = [None] * len(jobs)
    left = len(jobs)
    for i, job in enumerate(jobs, 1):
        sys.send(me, job, tag="pool.job", correlation_id=f"pool.map:{i}")

    def finish(job: Any, ok: bool, value: Any) -> None:
        nonlocal left
        results[int(re.fullmatch(r"pool\.map:(\d+)", job.correlation_id)[1]) - 1] = _record(job, ok, value)
        left -= 1

    out: dict[str, Any] = dict(_dispatch(worker, size, max_attempts, max_restarts, finish, lambda: left == 0))
    out["results"] = results
    return out


def run(worker: dict[str, Any], size: int = 4, max_attempts: int = 3, max_restarts: int | None = None,
        name: str | None = None) -> dict[str, int]:
    """Serve jobs that other processes submit (submit, call) until stop(pid); returns the stats."""
    if name is not None:
        sys.register(name)

    def finish(job: Any, ok: bool, value: Any) -> None:
        try:
            sys.send(job.sender, _record(job, ok, value), tag="pool.result", correlation_id=job.correlation_id)
        except LlmosError:
            pass  # the submitter has ended

    return _dispatch(worker, size, max_attempts, max_restarts, finish, lambda: False)


_submitted = itertools.count(1)


def submit(to: int | str, job: Any) -> str:
    """Give `job` to the pool `to` (pid or name); its result comes tagged "pool.result" with the
    correlation id returned here."""
    cid = f"pool:{sys.self()}:{next(_submitted)}"
    sys.send(to, job, tag="pool.job", correlation_id=cid)
    return cid


def call(to: int | str, job: Any, timeout_ms: float | None = None) -> dict[str, Any]:
    """Submit `job` and wait for its result: {"ok", "result" | "error", "attempts"}."""
    cid = submit(to, job)
    msg = sys.recv(tag="pool.result", correlation_id=cid, timeout_ms=timeout_ms)
    if msg is None:
        raise TimeoutError(f"pool.call: no result in {timeout_ms} ms (timeout)")
    return msg.body


def stop(to: int | str) -> None:
    """Ask the pool `to` to stop: it kills its workers and its run returns."""
    sys.send(to, None, tag="pool.stop")

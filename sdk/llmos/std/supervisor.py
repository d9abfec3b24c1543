"""supervisor: Erlang/OTP-style supervision of child processes (docs/userland-library.md; the
Lua twin is supervisor.lua, `require "supervisor"`)::

    from llmos.std import supervisor

    report = supervisor.run(
        children=[{"id": "db", "path": "lua/db.lua", "restart": "permanent"},
                  {"id": "job", "python": source, "args": lambda start: {"start": start},
                   "restart": "transient"}],
        strategy="one_for_one", intensity=3, period_ms=5000)

Each child is spawned with a monitor (sys.spawn's keywords: lua, python or path, args, name,
priority, limits, ...; args may be a function of the start count, 1 the first time). When one
ends, its restart decides: permanent children are always restarted, transient ones only after
an abnormal end, temporary ones never. The strategy decides who restarts with it: only the
child (one_for_one), every running child (one_for_all), or the child and the running children
after it in the list (rest_for_one); the others are killed (reason "shutdown") and their EXIT
notices awaited before any is started again, in list order. Restarting more than `intensity`
times within `period_ms` gives up: every child is killed and run raises GaveUp, which ends the
supervisor (its own supervisor sees it crash). run returns once no child is running and none is
to be restarted: {"restarts": n, "strategy": s, "children": {id: {"status":
"running"|"done"|"failed"|"stopped", "restarts": n, "pid": last pid, "result": last result,
"exits": [{"pid", "reason", "error"}...]}}}. While it runs, the supervisor answers
server.call(pid, "which_children") with [{"id", "pid", "status", "restarts"}...] in list order,
and server.call(pid, "stop") by stopping every child and returning its report.
"""
from __future__ import annotations

from typing import Any

from llmos.std import server
from llmos.userland import sys

RESTARTS = ("permanent", "transient", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")


class GaveUp(RuntimeError):
    """More restarts than the intensity allows within the period."""


class _Child:
    def __init__(self, i: int, spec: dict[str, Any]) -> None:
        if not isinstance(spec, dict):
            raise ValueError(f"supervisor.run: child {i} must be a dict (a child spec)")
        self.spec = dict(spec)
        self.id = self.spec.pop("id", None) or f"child{i}"
        self.restart = self.spec.pop("restart", "permanent")
        if self.restart not in RESTARTS:
            raise ValueError(f"supervisor.run: child {self.id}: unknown restart {self.restart!r}")
        self.starts = self.restarts = 0
        self.pid: int | None = None
        self.result: Any = None
        self.status = "new"
        self.exits: list[dict[str, Any]] = []


def run(children: list[dict[str, Any]], strategy: str = "one_for_one", intensity: int = 3,
        period_ms: float = 5000, shutdown_ms: float = 10000) -> dict[str, Any]:
    if strategy not in STRATEGIES:
        raise ValueError(f"supervisor.run: unknown strategy {strategy!r}")
    if not isinstance(children, list) or not children:
        raise ValueError("supervisor.run: children must be a non-empty list of child specs")
    kids = [_Child(i, spec) for i, spec in enumerate(children, 1)]
    if len({c.id for c in kids}) != len(kids):
        raise ValueError("supervisor.run: two children have the same id")
    by_pid: dict[int, _Child] = {}
    backlog: list[Any] = []
    times: list[float] = []
    total = 0

    def start(c: _Child) -> None:
        c.starts += 1
        spec = dict(c.spec)
        if callable(spec.get("args")):
            spec["args"] = spec["args"](c.starts)
        c.pid, c.status = sys.spawn(**spec, monitor=True), "running"
        by_pid[c.pid] = c

    def ended(c: _Child, exit: dict[str, Any]) -> None:
        by_pid.pop(exit["pid"], None)
        c.exits.append({"pid": exit["pid"], "reason": exit.get("reason"), "error": exit.get("error")})
        c.result = exit.get("result")

    def stop(group: list[_Child]) -> None:
        """Kill `group`'s running children (last first) and wait for their EXIT notices; notices
        of other children that come meanwhile are handled after."""
        waiting = {}
        for c in reversed(group):
            if c.pid is not None and by_pid.get(c.pid) is c:
                sys.kill(c.pid, "shutdown")
                waiting[c.pid] = c
        while waiting:
            msg = sys.recv(tag="EXIT", timeout_ms=shutdown_ms)
            if msg is None:
                raise RuntimeError("supervisor: killed children did not end in time")
            c = waiting.pop(msg.body["pid"], None)
            if c is None:
                backlog.append(msg)
            else:
                ended(c, msg.body)
                c.status = "stopped"

    def report() -> dict[str, Any]:
        return {"restarts": total, "strategy": strategy,
                "children": {c.id: {"status": c.status, "restarts": c.restarts, "pid": c.pid, "result": c.result,
                                    "exits": c.exits} for c in kids}}

    def restart(c: _Child, exit: dict[str, Any]) -> None:
        nonlocal times, total
        now = sys.now()
        times = [t for t in times if now - t < period_ms]
        if len(times) >= intensity:
            stop(kids)
            text = (f"supervisor: gave up: {intensity} restarts within {period_ms} ms is the most allowed "
                    f"(intensity); child {c.id} (pid {exit['pid']}) ended with {exit.get('reason')}: "
                    f"{exit.get('error')}")
            sys.log(text)
            raise GaveUp(text)
        times.append(now)
        total += 1
        c.restarts += 1
        again = [c]
        if strategy != "one_for_one":
            at = kids.index(c)
            stop([o for i, o in enumerate(kids) if o is not c and o.pid is not None and by_pid.get(o.pid) is o
                  and (strategy == "one_for_all" or i > at)])
            again = []
            for o in kids:
                if o is c or (o.status == "stopped" and o.restart != "temporary"):
                    if o is not c:
                        o.restarts += 1
                    again.append(o)
        sys.log(f"supervisor: {c.id} (pid {exit['pid']}) ended with {exit.get('reason')}; "
                f"{strategy} restarts {len(again)} child(ren)")
        for o in again:
            start(o)

    for c in kids:
        start(c)
    while by_pid:
        msg = backlog.pop(0) if backlog else sys.recv()
        c = by_pid.get(msg.body.get("pid")) if msg.tag == "EXIT" and isinstance(msg.body, dict) else None
        if c is not None:
            exit = msg.body
            ended(c, exit)
            normal = exit.get("reason") == "normal"
            if c.restart == "permanent" or (c.restart == "transient" and not normal):
                restart(c, exit)
            else:
                c.status = "done" if normal else "failed"
        elif msg.tag == "call" and msg.body == "which_children":
            server.reply(msg, [{"id": o.id, "pid": o.pid, "status": o.status, "restarts": o.restarts} for o in kids])
        elif msg.tag == "call" and msg.body == "stop":
            stop(kids)
            server.reply(msg, True)
            return report()
    return report()

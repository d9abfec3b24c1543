"""The userland standard library's Python twins (llmos.std) in Python agents, over a real llmosd
and real gRPC, and their interplay with the Lua modules (one protocol on the wire)."""
from __future__ import annotations

from typing import Any

import llmos
from test_stdlib import SQUARER, WAIT_S, call, registered, result, run, server, src, until  # noqa: F401 (fixtures)

SUPERVISE = src("""
    from llmos.std import supervisor
    from llmos.userland import sys

    def starts(start):
        return {"start": start}

    children = [dict(spec, args=starts) for spec in sys.args["children"]]
    sys.exit(supervisor.run(children, strategy=sys.args["strategy"], intensity=sys.args.get("intensity", 3),
                            period_ms=sys.args.get("period_ms", 5000)))
""")
PY_WAITS_FOR_GO = "from llmos.userland import sys\nsys.recv(tag='go')\nsys.exit(sys.args['start'])\n"
LUA_CRASHES_FIRST = "if args.start == 1 then error('crash on start 1') end sys.recv{tag = 'go'} return args.start"


def test_the_library_imports_in_an_agent(client: llmos.Client) -> None:
    out = result(run(client, python=src("""
        from llmos.std import agent, pool, server, supervisor
        from llmos.userland import sys
        sys.exit(sorted(m.__name__ for m in (agent, pool, server, supervisor)))
    """)))
    assert out == ["llmos.std.agent", "llmos.std.pool", "llmos.std.server", "llmos.std.supervisor"]


def test_python_supervisor_one_for_all_over_mixed_children(client: llmos.Client) -> None:
    port = client.open_port()
    sup = client.spawn(python=SUPERVISE, args={"strategy": "one_for_all", "intensity": 5, "period_ms": 60_000,
                                               "children": [{"id": "py", "python": PY_WAITS_FOR_GO, "restart": "transient"},
                                                            {"id": "lua", "lua": LUA_CRASHES_FIRST, "restart": "transient"}]})
    n = iter(range(10**6))
    kids = until(lambda: (lambda k: k if k[1]["restarts"] == 1 and k[0]["status"] == "running" else None)(
        call(client, port, sup, "which_children", f"w{next(n)}")), "the restart")
    for kid in kids:
        client.send(kid["pid"], None, tag="go")
    report = result(client.wait(sup, timeout=WAIT_S))
    py, lua = report["children"]["py"], report["children"]["lua"]
    assert report["restarts"] == 1
    assert (py["status"], py["restarts"], py["result"]) == ("done", 1, 2)
    assert [e["reason"] for e in py["exits"]] == ["shutdown", "normal"]
    assert (lua["status"], lua["restarts"], lua["result"]) == ("done", 1, 2)


PY_COUNTER = src("""
    from llmos.std import server
    from llmos.userland import sys

    def on_call(req, msg, n):
        if req == "get":
            return n, n
        if req == "fail":
            raise ValueError("asked to fail")
        if req == "stop":
            return "bye", server.stop(n)
        return n + req, n + req

    sys.exit(server.serve(call=on_call, cast=lambda req, n: n + req, state=0, name=sys.args["name"]))
""")


def test_python_server_answers_a_lua_client(client: llmos.Client) -> None:
    srv = client.spawn(python=PY_COUNTER, args={"name": "py-counter"})
    registered(client, "py-counter")
    out = result(run(client, lua=src("""
        local server = require "server"
        local function call(req) return server.call("py-counter", req, 20000) end
        local out = {added = call(5), cast = server.cast("py-counter", 2)}
        out.got = call("get")
        out.stopped = call("stop")
        return out
    """)))
    assert out == {"added": 5, "cast": True, "got": 7, "stopped": "bye"}
    assert result(client.wait(srv, timeout=WAIT_S)) == 7


def test_python_client_of_a_lua_server_with_timeout_and_failure(client: llmos.Client) -> None:
    srv = client.spawn(lua=src("""
        local server = require "server"
        return server.serve({name = "lua-echo", call = function(req, msg, s)
          if req == "later" then return server.NOREPLY, s end
          if req == "fail" then error("lua server fails") end
          return {echo = req}, s
        end})
    """))
    registered(client, "lua-echo")
    out = result(run(client, python=src("""
        from llmos.std import server
        from llmos.userland import sys

        out = {"echo": server.call("lua-echo", "hi", timeout_ms=10000)}
        try:
            server.call("lua-echo", "later", timeout_ms=100)
        except server.CallTimeout as e:
            out["timeout"] = str(e)
        out["again"] = server.call("lua-echo", "again", timeout_ms=10000)
        out["cast_nowhere"] = server.cast(2**40, 1)
        try:
            server.call("lua-echo", "fail", timeout_ms=10000)
        except server.CallFailed as e:
            out["failed"] = str(e)
        sys.exit(out)
    """)))
    assert out["echo"] == {"echo": "hi"} and out["again"] == {"echo": "again"}
    assert out["timeout"] == "server.call: no reply from lua-echo in 100 ms (timeout)"
    assert out["cast_nowhere"] is False
    assert "server.call: the server failed: " in out["failed"] and "lua server fails" in out["failed"]
    info = client.wait(srv, timeout=WAIT_S)
    assert info.state == "CRASHED" and "lua server fails" in info.error


PY_SQUARER = src("""
    from llmos.std import pool

    def square(job, info):
        if job.get("crash") and info["attempt"] == 1:
            raise RuntimeError(f"crashing on {job['n']}")
        return {"square": job["n"] ** 2, "attempt": info["attempt"]}

    pool.work(square)
""")


def test_python_pool_map_redelivers_when_a_lua_worker_is_killed(client: llmos.Client) -> None:
    port = client.open_port()
    jobs = [{"n": n} for n in range(1, 7)]
    jobs[2]["hang"] = port
    mapper = client.spawn(python=src("""
        from llmos.std import pool
        from llmos.userland import sys
        sys.exit(pool.map(sys.args["jobs"], worker={"lua": sys.args["worker"]}, size=2))
    """), args={"worker": SQUARER, "jobs": jobs})
    hanging = client.recv(port, tag="hanging", timeout=WAIT_S)
    assert hanging is not None
    client.kill(hanging.body, "killed by the test")
    out = result(client.wait(mapper, timeout=WAIT_S))
    assert [r["result"]["square"] for r in out["results"]] == [n * n for n in range(1, 7)]
    assert [r["attempts"] for r in out["results"]] == [1, 1, 2, 1, 1, 1]
    assert (out["done"], out["failed"], out["redelivered"], out["workers_started"]) == (6, 0, 1, 3)


def test_python_workers_in_a_lua_pool(client: llmos.Client) -> None:
    out = result(run(client, lua=src("""
        local pool = require "pool"
        return pool.map({size = 2, worker = {python = args.worker}}, {{n = 1}, {n = 2, crash = true}, {n = 3}})
    """), args={"worker": PY_SQUARER}))
    assert [(r["result"]["square"], r["attempts"]) for r in out["results"]] == [(1, 1), (4, 2), (9, 1)]
    assert out["redelivered"] == 1


def test_python_pool_service(client: llmos.Client) -> None:
    pool_pid = client.spawn(python=src("""
        from llmos.std import pool
        from llmos.userland import sys
        sys.exit(pool.run(worker={"python": sys.args["worker"]}, size=1, name="py-squares"))
    """), args={"worker": PY_SQUARER})
    registered(client, "py-squares")
    out = result(run(client, python=src("""
        from llmos.std import pool
        from llmos.userland import sys
        out = [pool.call("py-squares", {"n": n, "crash": n == 3}, timeout_ms=20000) for n in (2, 3)]
        pool.stop("py-squares")
        sys.exit(out)
    """)))
    assert out == [{"ok": True, "result": {"square": 4, "attempt": 1}, "attempts": 1},
                   {"ok": True, "result": {"square": 9, "attempt": 2}, "attempts": 2}]
    assert result(client.wait(pool_pid, timeout=WAIT_S))["redelivered"] == 1

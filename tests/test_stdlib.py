"""The userland standard library (docs/userland-library.md) in Lua, over a real llmosd and real
gRPC: `require` (the bundled library, --lib directories, caching per process, refusals), and
the supervisor, server and pool modules. The Python twins are tested in test_stdlib_python.py.

Nothing here measures time: waits are bounded, and a child that must still be running when its
sibling crashes blocks in sys.recv until the test tells it to end.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator

import pytest

import llmos
from llmos.client import ProcessInfo
from llmosd_process import LlmosdServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERLAND = ROOT / "userland"
WAIT_S = 30  # generous bound for any process here to end

LIB_A = {  # the first --lib directory
    "greet.lua": "LOADS = (LOADS or 0) + 1\nlocal M = {n = 0}\nfunction M.hi() M.n = M.n + 1 return 'hi ' .. M.n end\n"
                 "return M\n",
    "team/roles.lua": "return {name = ..., lead = 'ada'}\n",
    "nothing.lua": "-- returns no value\n",
    "waits.lua": "local m = sys.recv{tag = 'none', timeout_ms = 1}\nsys.sleep(1)\nreturn {waited = m == nil}\n",
    "boom.lua": "error('boom in module')\n",
    "broken.lua": "return {\n",
    "cycle_a.lua": "return require 'cycle_b'\n",
    "cycle_b.lua": "return require 'cycle_a'\n",
    "spin.lua": "while true do end\n",
}
LIB_B = {  # the second: greet.lua here is shadowed by the first's
    "greet.lua": "return {from = 'b'}\n",
    "only_b.lua": "return {from = 'b'}\n",
}


def write_tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    base = tmp_path_factory.mktemp("stdlib")
    lib_a, lib_b = write_tree(base / "lib_a", LIB_A), write_tree(base / "lib_b", LIB_B)
    srv = LlmosdServer(base / "data", "--model", "none", "--cpus", "2", "--lib", str(lib_a), "--lib", str(lib_b),
                       userland_root=USERLAND)
    srv.start()
    yield srv
    srv.stop()


def src(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def run(client: llmos.Client, **spawn: Any) -> ProcessInfo:
    pid = client.spawn(**spawn)
    info = client.wait(pid, timeout=WAIT_S)
    assert info is not None, f"pid {pid} did not end within {WAIT_S} s"
    return info


def result(info: ProcessInfo) -> Any:
    assert info.state == "EXITED", f"{info.state} {info.exit_reason}: {info.error}"
    return info.result


def call(client: llmos.Client, port: int, to: int | str, request: Any, cid: str) -> Any:
    """server.call's protocol from a port: a message tagged "call", the reply by correlation id."""
    client.send(to, request, sender=port, tag="call", correlation_id=cid)
    reply = client.recv(port, correlation_id=cid, timeout=WAIT_S)
    assert reply is not None and reply.tag == "reply", reply
    return reply.body


def until(check: Any, what: str) -> Any:
    """Poll `check` (a function answering a value or None) until it answers, for at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(0.02)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


def registered(client: llmos.Client, name: str) -> int:
    """The pid registered as `name`, once it is."""
    return until(lambda: next((p.pid for p in client.ps(name=name)), None), f"a process registered as {name}")


# -- require ---------------------------------------------------------------------------------------------
def test_require_loads_a_module_once_per_process(client: llmos.Client) -> None:
    program = src("""
        local g, again = require "greet", require("greet")
        g.hi()
        local nothing = require "nothing"
        return {same = g == again, loads = LOADS, hi = again.hi(), roles = require("team.roles"),
                nothing = nothing, waits = require("waits"), only_b = require("only_b").from}
    """)
    first, second = result(run(client, lua=program)), result(run(client, lua=program))
    assert first == second  # each process loads and keeps its own copy: no state is shared
    assert first == {"same": True, "loads": 1, "hi": "hi 2", "roles": {"name": "team.roles", "lead": "ada"},
                     "nothing": True, "waits": {"waited": True}, "only_b": "b"}


def test_require_finds_the_bundled_library_after_the_lib_directories(client: llmos.Client) -> None:
    out = result(run(client, lua=src("""
        local names = {}
        for _, name in ipairs{"supervisor", "server", "pool", "agent"} do
          names[name] = type(require(name))
        end
        names.greet = require("greet").from or "lib_a"  -- lib_a's greet, not lib_b's
        return names
    """)))
    assert out == {"supervisor": "table", "server": "table", "pool": "table", "agent": "table", "greet": "lib_a"}


BAD_NAMES = ["../x", "a/b", "/etc/passwd", "a\0b", "a..b", ".a", "a.", "1a", "a-b", "", "a b", "é",
             "a" * 257, "lua.echo\n"]


def test_require_refuses_what_is_not_a_module_name(client: llmos.Client) -> None:
    out = result(run(client, lua=src("""
        local out = {}
        for i, name in ipairs(args.names) do out[i] = select(2, pcall(require, name)) end
        out[#out + 1] = select(2, pcall(require, 42))
        out[#out + 1] = select(2, pcall(require))
        return out
    """), args={"names": BAD_NAMES}))
    assert len(out) == len(BAD_NAMES) + 2
    for name, error in zip(BAD_NAMES, out):
        assert "is not a module name: names are dotted identifiers" in error, (name, error)
    assert out[-2:] == ["require: a module name is a string, not a number",
                        "require: a module name is a string, not a nil"]


def test_require_reaches_only_the_library(client: llmos.Client) -> None:
    """Programs under the userland root are not modules, and no other loader exists."""
    out = result(run(client, lua=src("""
        local ok, missing = pcall(require, "lua.echo")
        return {missing = missing, deep = select(2, pcall(require, "no.such.module")),
                package = type(package), io = type(io), loadfile = type(loadfile), dofile = type(dofile)}
    """)))
    assert out["missing"] == ("require: module 'lua.echo' not found in the userland library "
                              "(2 --lib directories and llmos's own)")
    assert "module 'no.such.module' not found" in out["deep"]
    assert (out["package"], out["io"], out["loadfile"], out["dofile"]) == ("nil",) * 4


def test_module_errors_propagate_and_are_not_cached(client: llmos.Client) -> None:
    out = result(run(client, lua=src("""
        local out = {}
        for _, name in ipairs{"boom", "boom", "broken", "cycle_a"} do out[#out + 1] = select(2, pcall(require, name)) end
        return out
    """)))
    assert out[0] == out[1] == "boom.lua:1: boom in module"  # the second require ran it again
    assert out[2].startswith("broken.lua:2:")
    assert "require: module 'cycle_a' is required again while it loads (a cycle)" in out[3]


def test_a_module_that_never_returns_is_stopped_by_the_cpu_limit(client: llmos.Client) -> None:
    info = run(client, lua="require 'spin'", limits={"cpu_ms": 200})
    assert (info.state, info.exit_reason) == ("KILLED", "cpu_limit")


def test_an_uncaught_require_error_ends_the_program_with_it(client: llmos.Client) -> None:
    info = run(client, lua="require 'no_such_module'")
    assert info.state == "CRASHED" and "module 'no_such_module' not found" in info.error


def test_lib_must_be_a_directory(tmp_path: pathlib.Path) -> None:
    out = subprocess.run([sys.executable, "-m", "llmosd", "--lib", str(tmp_path / "missing"), "--model", "none"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--lib" in out.stderr and "not a directory" in out.stderr


# -- supervisor ------------------------------------------------------------------------------------------
# A child that waits for "go" (so that it is running when a sibling crashes), then returns its start count.
WAITS_FOR_GO = "sys.recv{tag = 'go'} return args.start"
CRASHES_FIRST = "if args.start == 1 then error('crash on start 1') end sys.recv{tag = 'go'} return args.start"
SUPERVISE = src("""
    local supervisor = require "supervisor"
    local children = {}
    for i, spec in ipairs(args.children) do
      children[i] = {id = spec.id, lua = spec.lua, restart = spec.restart,
                     args = function(start) return {start = start} end}
    end
    return supervisor.run{strategy = args.strategy, intensity = args.intensity, period_ms = args.period_ms,
                          children = children}
""")


def supervise(client: llmos.Client, strategy: str) -> tuple[int, int]:
    port = client.open_port()
    sup = client.spawn(lua=SUPERVISE, args={"strategy": strategy, "intensity": 5, "period_ms": 60_000, "children": [
        {"id": "a", "lua": WAITS_FOR_GO, "restart": "transient"},
        {"id": "b", "lua": CRASHES_FIRST, "restart": "transient"},
        {"id": "c", "lua": WAITS_FOR_GO, "restart": "transient"},
    ]})
    return sup, port


def children_when(client: llmos.Client, sup: int, port: int, ready: Any) -> list[dict]:
    n = iter(range(10**6))
    return until(lambda: (lambda kids: kids if ready(kids) else None)(
        call(client, port, sup, "which_children", f"which-{next(n)}")), "the supervisor's children")


@pytest.mark.parametrize("strategy, restarted", [("one_for_one", {"b"}), ("one_for_all", {"a", "b", "c"}),
                                                 ("rest_for_one", {"b", "c"})])
def test_supervisor_strategies_restart_the_right_children(client: llmos.Client, strategy: str,
                                                          restarted: set[str]) -> None:
    sup, port = supervise(client, strategy)
    kids = children_when(client, sup, port, lambda kids: kids[1]["restarts"] == 1)
    assert [k["status"] for k in kids] == ["running"] * 3
    for kid in kids:
        client.send(kid["pid"], None, tag="go")
    report = result(client.wait(sup, timeout=WAIT_S))
    assert report["restarts"] == 1 and report["strategy"] == strategy
    for cid, child in report["children"].items():
        again = cid in restarted
        assert (child["status"], child["restarts"], child["result"]) == ("done", int(again), 1 + again), cid
        reasons = [e["reason"] for e in child["exits"]]
        if cid == "b":
            assert reasons == ["error", "normal"] and "crash on start 1" in child["exits"][0]["error"]
        else:  # a sibling restarted with b was killed by the supervisor first
            assert reasons == (["shutdown", "normal"] if again else ["normal"]), cid


def test_supervisor_restart_types(client: llmos.Client) -> None:
    """permanent: restarted even after a normal end; transient: not after a normal end; temporary: never."""
    port = client.open_port()
    sup = client.spawn(lua=SUPERVISE, args={"strategy": "one_for_one", "children": [
        {"id": "temp", "lua": "error('temporary fails')", "restart": "temporary"},
        {"id": "trans", "lua": "return 'fine'", "restart": "transient"},
        {"id": "perm", "lua": "if args.start == 1 then return 'once' end sys.recv{tag = 'go'}", "restart": "permanent"},
    ]})
    children_when(client, sup, port, lambda kids: [k["status"] for k in kids] == ["failed", "done", "running"]
                  and kids[2]["restarts"] == 1)
    assert call(client, port, sup, "stop", "stop-1") is True
    report = result(client.wait(sup, timeout=WAIT_S))
    kids = report["children"]
    assert (kids["temp"]["status"], kids["temp"]["restarts"]) == ("failed", 0)
    assert (kids["trans"]["status"], kids["trans"]["restarts"], kids["trans"]["result"]) == ("done", 0, "fine")
    assert (kids["perm"]["status"], kids["perm"]["restarts"]) == ("stopped", 1)
    assert [e["reason"] for e in kids["perm"]["exits"]] == ["normal", "shutdown"]
    assert report["restarts"] == 1


def test_supervisor_gives_up_past_its_intensity_and_kills_its_children(client: llmos.Client) -> None:
    sup = client.spawn(lua=SUPERVISE, args={"strategy": "one_for_one", "intensity": 2, "period_ms": 600_000,
                                             "children": [{"id": "steady", "lua": WAITS_FOR_GO},
                                                          {"id": "bad", "lua": "error('always')"}]})
    info = client.wait(sup, timeout=WAIT_S)
    assert info.state == "CRASHED" and "supervisor: gave up: 2 restarts within 600000 ms" in info.error
    assert "child bad" in info.error and "always" in info.error
    kids = client.ps(parent=sup, include_ended=True)
    assert len(kids) == 1 + 3  # steady once; bad, restarted twice
    assert all(k.ended for k in kids)
    assert sorted(k.exit_reason for k in kids) == ["error"] * 3 + ["shutdown"]


def test_supervisor_refuses_bad_specs(client: llmos.Client) -> None:
    out = result(run(client, lua=src("""
        local supervisor = require "supervisor"
        local out = {}
        for i, opts in ipairs{{children = {}}, {strategy = "one_for_none", children = {{lua = "return 1"}}},
                              {children = {{lua = "return 1", restart = "sometimes"}}},
                              {children = {{lua = "return 1", bogus = 1}}}, {intensty = 3, children = {{lua = ""}}},
                              {children = {{id = "x", lua = ""}, {id = "x", lua = ""}}}} do
          out[i] = select(2, pcall(supervisor.run, opts))
        end
        return out
    """)))
    assert [e.split(": ", 1)[1] for e in out] == [
        "children must be a non-empty list of child specs", "unknown strategy one_for_none",
        "child child1: unknown restart sometimes", "child child1: unknown option bogus", "unknown option intensty",
        "two children have the id x"]


def test_supervisor_example_restarts_a_crashing_worker(client: llmos.Client) -> None:
    out = result(run(client, path="lua/supervisor.lua", args={"fail_times": 2}))
    worker = out["children"]["worker"]
    assert out["restarts"] == 2
    assert (worker["status"], worker["result"], worker["restarts"]) == ("done", 42, 2)
    assert [e["reason"] for e in worker["exits"]] == ["error", "error", "normal"]


# -- server ----------------------------------------------------------------------------------------------
COUNTER = src("""
    local server = require "server"
    return server.serve({
      name = args.name,
      call = function(req, msg, n)
        if req == "get" then return n, n end
        if req == "later" then return server.NOREPLY, n end   -- never answered: the caller times out
        if req == "fail" then error("asked to fail") end
        if req == "stop" then return "bye", server.stop(n) end
        return n + req, n + req
      end,
      cast = function(req, n) return n + req end,
      info = function(msg, n) return n + 1000 end,
    }, 0)
""")


def test_server_call_cast_and_timeout(client: llmos.Client) -> None:
    srv = client.spawn(lua=COUNTER, args={"name": "counter-1"})
    registered(client, "counter-1")
    out = result(run(client, lua=src("""
        local server = require "server"
        local out = {}
        out.added = server.call("counter-1", 5, 5000)
        out.cast = server.cast("counter-1", 2)                 -- never waits for the server
        sys.send("counter-1", "not a request", {tag = "other"})
        out.got = server.call(args.srv, "get", 5000)           -- by pid; after the cast and the info message
        local ok, err = pcall(server.call, "counter-1", "later", 100)
        out.timed_out = err
        out.after = server.call("counter-1", "get", 5000)      -- a late reply would not be taken for this one
        out.cast_nowhere = {server.cast(2^40, 1)}
        out.stopped = server.call("counter-1", "stop", 5000)
        return out
    """), args={"srv": srv}))
    assert out["added"] == 5 and out["cast"] is True and out["got"] == 1007 and out["after"] == 1007
    assert out["timed_out"].endswith("server.call: no reply from counter-1 in 100 ms (timeout)")
    assert out["cast_nowhere"][0] is False and "pid" in out["cast_nowhere"][1]
    assert out["stopped"] == "bye"
    assert result(client.wait(srv, timeout=WAIT_S)) == 1007


def test_server_handler_failure_answers_the_caller_and_ends_the_server(client: llmos.Client) -> None:
    srv = client.spawn(lua=COUNTER, args={"name": "counter-2"})
    registered(client, "counter-2")
    out = result(run(client, lua="local server = require 'server' return {pcall(server.call, 'counter-2', 'fail', 5000)}"))
    assert out[0] is False and "server.call: the server failed: " in out[1] and "asked to fail" in out[1]
    info = client.wait(srv, timeout=WAIT_S)
    assert info.state == "CRASHED" and "asked to fail" in info.error


# -- pool ------------------------------------------------------------------------------------------------
# A worker: squares n; a job {n, crash = true} crashes its worker on the first attempt; a job
# {n, hang = port} tells the port its worker's pid on the first attempt and waits to be killed.
SQUARER = src("""
    local pool = require "pool"
    pool.work(function(job, info)
      if job.crash and info.attempt == 1 then error("crashing on " .. job.n) end
      if job.always then error("always failing on " .. job.n) end
      if job.hang and info.attempt == 1 then
        sys.send(job.hang, sys.self(), {tag = "hanging"})
        sys.recv{tag = "never"}
      end
      return {square = job.n * job.n, attempt = info.attempt, args = info.args}
    end)
""")


def test_pool_map_redelivers_the_job_of_a_crashed_or_killed_worker(client: llmos.Client) -> None:
    port = client.open_port()
    jobs = [{"n": n} for n in range(1, 11)]
    jobs[3]["crash"] = True
    jobs[6]["hang"] = port
    mapper = client.spawn(lua=src("""
        local pool = require "pool"
        return pool.map({size = 3, worker = {lua = args.worker, args = "shared"}}, args.jobs)
    """), args={"worker": SQUARER, "jobs": jobs})
    hanging = client.recv(port, tag="hanging", timeout=WAIT_S)
    assert hanging is not None
    client.kill(hanging.body, "killed by the test")
    out = result(client.wait(mapper, timeout=WAIT_S))
    assert [r["result"]["square"] for r in out["results"]] == [n * n for n in range(1, 11)]
    assert all(r["ok"] and r["result"]["args"] == "shared" for r in out["results"])
    attempts = [r["attempts"] for r in out["results"]]
    assert attempts[3] == attempts[6] == 2 and attempts.count(1) == 8
    assert (out["done"], out["failed"], out["redelivered"], out["workers_started"]) == (10, 0, 2, 5)
    assert all(k.ended for k in client.ps(parent=mapper, include_ended=True))  # the pool stopped its workers


def test_pool_job_fails_after_max_attempts(client: llmos.Client) -> None:
    out = result(run(client, lua=src("""
        local pool = require "pool"
        return pool.map({size = 2, max_attempts = 3, worker = {lua = args.worker}}, {{n = 1}, {n = 2, always = true}})
    """), args={"worker": SQUARER}))
    ok, failed = out["results"]
    assert ok == {"ok": True, "result": {"square": 1, "attempt": 1}, "attempts": 1}
    assert failed["ok"] is False and failed["attempts"] == 3 and "always failing on 2" in failed["error"]
    assert (out["done"], out["failed"], out["redelivered"]) == (1, 1, 3)


def test_pool_serves_submitted_jobs_until_stopped(client: llmos.Client) -> None:
    pool_pid = client.spawn(lua="return require('pool').run{size = 2, name = 'squares', worker = {lua = args.worker}}",
                            args={"worker": SQUARER})
    registered(client, "squares")
    out = result(run(client, lua=src("""
        local pool = require "pool"
        local out = {}
        for n = 1, 4 do out[n] = pool.call("squares", {n = n, crash = n == 2}, 10000) end
        pool.stop("squares")
        return out
    """)))
    assert [r["result"]["square"] for r in out] == [1, 4, 9, 16]
    assert [r["attempts"] for r in out] == [1, 2, 1, 1]
    stats = result(client.wait(pool_pid, timeout=WAIT_S))
    assert (stats["done"], stats["failed"], stats["redelivered"], stats["workers_started"]) == (4, 0, 1, 3)


def test_readme_stdlib_example_runs(client: llmos.Client) -> None:
    readme = (ROOT / "README.md").read_text()
    [source] = re.findall(r"```lua stdlib\n(.*?)```", readme, re.S)
    assert result(run(client, lua=source)) == {"answer": 42, "restarts": 1}

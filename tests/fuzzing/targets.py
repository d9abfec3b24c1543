"""The fuzz targets: Hypothesis tests over a FuzzServer, one per surface.

- rpc: every method once, in a random order, then a few more, every field hostile
  (requests.py), naming the example's own processes: two ports (one with a mailbox
  of 2), a Lua process blocked in recv under a registered name, one that has ended;
- wire: every method once, with a valid request's bytes mutated (invalid UTF-8,
  wrong wire types, 11-byte varints, deep nesting, truncation...);
- lua: a program calling every sys function with hostile arguments, and value round
  trips (lua_programs.py);
- python: a Python agent making every call through the agent socket, hostile, as
  itself and as other processes, and llmos.userland calls with hostile values;
- machine: random sequences against a model of ports, messages, files, locks
  (machine.py).

tests/test_fuzz.py runs each under PROFILES["ci"]; tools/fuzz.py under "long".
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Callable

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value

from . import lua_programs as lp
from . import requests as rq
from .harness import (
    DOCUMENTED, LEAKED_EXCEPTION, MAX_STATUS_BYTES, METHODS, OK, STATS, FuzzServer, Outcome, check_outcome, fail,
    result_of, short,
)
from .values import Fate, same_json

_names = itertools.count(1)

SETTINGS = dict(deadline=None, database=None, print_blob=False, report_multiple_bugs=True,
                suppress_health_check=list(HealthCheck))
# Examples per target: CI's budget keeps tests/test_fuzz.py under 2 minutes on 2 cores
# (45 s measured on an idle 2-core machine, every violation tolerated so that all examples
# ran), and CI does not shrink (each violation's message holds the exact call, program
# or sequence that broke; shrinking against a server restarted after each break could
# take minutes). "long" is one round of tools/fuzz.py, which shrinks.
PROFILES: dict[str, dict[str, Any]] = {
    "ci": {"derandomize": True, "shrink": False, "steps": 20,
           "examples": {"rpc": 20, "wire": 12, "lua": 20, "python": 3, "machine": 8}},
    "long": {"derandomize": False, "shrink": True, "steps": 40,
             "examples": {"rpc": 40, "wire": 30, "lua": 40, "python": 6, "machine": 15}},
}


def hypothesis_settings(profile: str, target: str) -> settings:
    p = PROFILES[profile]
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if p["shrink"] else [])
    return settings(max_examples=p["examples"][target], derandomize=p["derandomize"],
                    stateful_step_count=p["steps"], phases=phases, **SETTINGS)


# -- the example's processes ------------------------------------------------------------------
def victims(server: FuzzServer, ex: Any) -> rq.Pool:
    """Processes an example's calls may name: live, blocked, named, ended."""
    n = next(_names)
    a_name, r_name = f"fz-a{n}", f"fz-r{n}"
    port_a = ex.spawned(server.must("OpenPort", pb.OpenPortRequest(name=a_name)).pid)
    port_b = ex.spawned(server.must("OpenPort", pb.OpenPortRequest(mailbox=2)).pid)
    receiver = ex.spawned(server.spawn_lua(
        "sys.register(args) while true do local m = sys.recv{} if m.tag == 'stop' then return m.body end end",
        args=r_name))
    ended = ex.spawned(server.spawn_lua("return {done = true}"))
    server.must("Wait", pb.WaitRequest(pid=ended, timeout_ms=5000), deadline=7)
    return rq.Pool([port_a, port_b, receiver, ended], [a_name, r_name], [f"fz/{n}.txt"])


def _call(server: FuzzServer, ex: Any, req: rq.Request, target: str = "rpc") -> Any:
    deadline, blocking = rq.deadline_for(req)
    method = METHODS[req.method]
    out = server.call(req.method, req.message, deadline, max_items=3 if method.name == "Events" else 10_000)
    STATS.rpc[(req.method, out.code.name)] += 1
    check_outcome(out, blocking, target, lambda: f"Reproducer: {req!r}")
    if out.ok and req.refusals:
        return fail(f"{req.method}:accepted", f"{req.method} answered OK though {'; '.join(req.refusals)}. "
                    f"Reproducer: {req!r}")
    if out.ok and req.method in ("Spawn", "OpenPort"):
        ex.spawned(out.response.pid)
    return out


# -- rpc --------------------------------------------------------------------------------------
def rpc_example(server: FuzzServer, data: Any) -> None:
    with server.example("rpc") as ex:
        pool = victims(server, ex)
        order = data.draw(st.permutations(sorted(METHODS)), label="every method, in this order")
        again = data.draw(st.lists(st.sampled_from(sorted(METHODS)), max_size=4), label="then")
        for method in order + again:
            _call(server, ex, data.draw(rq.request(method, pool), label=method))


# -- wire -------------------------------------------------------------------------------------
def wire_example(server: FuzzServer, data: Any) -> None:
    with server.example("wire") as ex:
        pool = victims(server, ex)
        for method in data.draw(st.permutations(sorted(METHODS)), label="every method, in this order"):
            req = data.draw(rq.wire_request(method, pool), label=method)
            m = METHODS[method]
            payload = req.payloads if m.client_streaming else req.payloads[0]
            out = server.call(method, payload, 0.2 if rq.may_block(m) else 10.0, raw=True, max_items=3)
            STATS.wire[(method, out.code.name)] += 1
            check_outcome(out, rq.may_block(m), "wire", lambda: f"Reproducer: {req!r}")


# -- lua --------------------------------------------------------------------------------------
LUA_BUDGET_S = 20.0  # a program still running after this is killed (a loaded machine is slow)
KILLED_WAITING = "fuzz: done waiting"  # the Kill reason when a program sat blocked


def lua_example(server: FuzzServer, data: Any) -> None:
    with server.example("lua") as ex:
        pool = victims(server, ex)
        collector = server.open_port(mailbox=5000)
        program = data.draw(lp.programs(len(pool.pids), len(pool.names)), label="program")
        pid = ex.spawned(server.spawn_lua(program.source(), args={"collector": collector, "pids": pool.pids,
                                                                   "names": pool.names}))
        info = _run_to_end(server, pid)
        if info is None:
            return
        messages = server.drain(collector)
        server.call("Kill", pb.KillRequest(pid=collector))
        server.harness_pids.discard(collector)
        _check_program(server, ex, program, info, messages)


def _run_to_end(server: FuzzServer, pid: int) -> pb.ProcessInfo | None:
    """Wait for the program; kill it once it has sat blocked a while (its last step
    may block for ever) or its time is up. None if the server stopped answering."""
    start, blocked_polls = time.monotonic(), 0
    while True:
        out = server.call("Wait", pb.WaitRequest(pid=pid, timeout_ms=200), deadline=10)
        if not out.ok:
            server.broken(f"Wait:{out.code.name}", f"Wait(timeout_ms=200) on a Lua program answered {out.code.name} "
                          f"{short(out.details)} after {out.elapsed:.1f} s")
            return None
        if not out.response.timed_out:
            return out.response.process
        info = server.call("GetProcess", pb.GetProcessRequest(pid=pid))
        blocked = info.ok and info.response.state == pb.BLOCKED and info.response.blocked_on != "infer"
        blocked_polls = blocked_polls + 1 if blocked else 0
        if blocked_polls >= 3 or time.monotonic() - start > LUA_BUDGET_S:
            server.call("Kill", pb.KillRequest(pid=pid, reason=KILLED_WAITING))
            out = server.call("Wait", pb.WaitRequest(pid=pid, timeout_ms=5000), deadline=10)
            if out.ok and out.response.timed_out:
                server.broken("kill:no effect", f"the fuzzed program {pid} did not end within 5 s of Kill")
                return server.must("GetProcess", pb.GetProcessRequest(pid=pid))
            return out.response.process


def _check_program(server: FuzzServer, ex: Any, program: lp.Program, info: pb.ProcessInfo,
                   messages: list[pb.Message]) -> None:
    reports = {}
    trips = {}
    for m in messages:
        if m.tag == "call":
            body = from_value(m.body)
            reports[body["i"]] = body
        elif m.tag in ("rt", "rs"):
            if m.correlation_id in trips:
                return fail("lua:duplicate", f"message {m.correlation_id} arrived twice. {program!r}")
            trips[m.correlation_id] = m
    for i, step in enumerate(program.steps, 1):
        r = reports.get(i)
        if r is None:
            continue
        where = f"Step {i}: {step!r}. Program: {program!r}"
        if step.kind == "call":
            STATS.lua[(step.fname, "ok" if r["ok"] else "error")] += 1
            STATS.contexts[step.context] += 1
            _check_call(step, r, where)
        else:
            STATS.lua[(f"round trip: {step.kind}", "ok" if r["ok"] else "error")] += 1
            if step.kind == "exit":  # a child ends with sys.exit(value)
                STATS.lua[("sys.exit", "ok" if r["ok"] else "error")] += 1
            _check_trip(server, ex, i, step, r, trips, where)
    unreported = [i for i in range(1, len(program.steps) + 1) if i not in reports]
    if unreported and info.exit_reason == KILLED_WAITING:
        stuck = program.steps[unreported[0] - 1]
        # (in xpcall's handler a failing call is made again for its own error, some 200 times)
        if not stuck.blocks and stuck.kind == "call" and stuck.context != "xpcall handler":
            return fail(f"lua:{stuck.fname}:stuck", f"step {unreported[0]}, {stuck!r}, which cannot wait long, "
                        f"had not returned when the program was killed (blocked for 0.6 s, or running for "
                        f"{LUA_BUDGET_S:.0f} s). Program: {program!r}")
    last = program.steps[-1]
    if last.kind == "call" and last.fname == "sys.exit" and len(program.steps) not in reports \
            and last.context in lp.CAN_BLOCK and info.state in (pb.EXITED, pb.CRASHED):
        _check_ending(info, last.value, f"the program's sys.exit({last.value!r}). Program: {program!r}")
    if info.state == pb.CRASHED and LEAKED_EXCEPTION.search(info.error):
        return fail("lua:crash leaked exception", f"the program crashed with {short(info.error)}. {program!r}")


def _check_call(step: lp.Step, r: dict, where: str) -> None:
    name = step.fname
    if r["ok"]:
        if step.refusals:
            return fail(f"lua:{name}:accepted", f"{name} succeeded though {'; '.join(step.refusals)}. {where}")
        return
    err = r.get("err") or ""
    if LEAKED_EXCEPTION.search(err):
        return fail(f"lua:{name}:leaked exception", f"{name} failed with a Python exception's text: "
                    f"{short(err)}. {where}")
    if step.context in lp.FAITHFUL_ERRORS and r.get("errtype") != "string":
        return fail(f"lua:{name}:error not a string", f"{name} raised a {r.get('errtype')}. {where}")


def _check_trip(server: FuzzServer, ex: Any, i: int, step: lp.Step, r: dict, trips: dict, where: str) -> None:
    v = step.value
    assert v is not None
    refused = v.fate in (Fate.INVALID, Fate.TOO_BIG)
    if step.kind in ("port", "self", "args"):
        if r["ok"] and refused:
            return fail(f"lua:{step.kind}:accepted", f"the value model refuses {v!r} ({v.fate}), "
                        f"yet it was accepted. {where}")
        if not r["ok"]:
            err = r.get("err") or ""
            if "LOST" in err:
                return fail("lua:self:lost", f"a message a process sent itself was not there: {where}")
            if v.fate == Fate.OK:
                return fail(f"lua:{step.kind}:refused", f"{v!r} is a valid value, refused: {short(err)}. {where}")
            if LEAKED_EXCEPTION.search(err):
                return fail(f"lua:{step.kind}:leaked exception", f"{short(err)}. {where}")
            return
    if step.kind in ("port", "self"):
        msg = trips.get(f"{'rt' if step.kind == 'port' else 'rs'}{i}")
        if msg is None:
            return fail(f"lua:{step.kind}:lost", f"the send succeeded and the message never arrived. {where}")
        if v.fate == Fate.OK and not same_json(from_value(msg.body), v.json):
            return fail(f"lua:{step.kind}:changed", f"{v!r} arrived as {short(from_value(msg.body))}. {where}")
        return
    if not r["ok"]:
        return fail(f"lua:{step.kind}:spawn failed", f"spawning the child failed: {short(r.get('err'))}. {where}")
    child = ex.spawned(r["ret"])
    out = server.call("Wait", pb.WaitRequest(pid=child, timeout_ms=5000), deadline=10)
    check_outcome(out, blocking=False, where="lua child")
    if not out.ok:
        return fail("readback:Wait", f"Wait on child {child}: {out.code.name} {short(out.details)}. {where}")
    if out.response.timed_out:
        return fail(f"lua:{step.kind}:child hangs", f"child {child} did not end within 5 s. {where}")
    _check_ending(out.response.process, v, where)


def _check_ending(info: pb.ProcessInfo, v: Any, where: str) -> None:
    """A process that ended with `v` (its return or exit value): EXITED with it, or
    CRASHED if the value model refuses it."""
    state = pb.ProcessState.Name(info.state)
    if v.fate == Fate.OK:
        if info.state != pb.EXITED:
            return fail("lua:result refused", f"ending with {v!r} gave {state} {short(info.error)}. {where}")
        if not same_json(result_of(info), v.json):
            return fail("lua:result changed", f"ending with {v!r} stored {short(result_of(info))}. {where}")
    elif v.fate == Fate.INVALID and info.state != pb.CRASHED:
        return fail("lua:result accepted", f"ending with {v!r} (refused by the value model) gave {state} "
                    f"with result {short(result_of(info))}. {where}")
    # TOO_BIG: refused, or stored; either way Wait just read it back.


# -- python -----------------------------------------------------------------------------------
AGENT = r'''
import json
import grpc
from llmos.userland import sys as k

import llmos

collector = k.args["collector"]
work = json.loads(k.recv(tag="calls", timeout_ms=30000).data)
for i, expr in enumerate(work["userland"]):  # llmos.userland's own calls, with hostile values
    try:
        eval(expr, {"k": k, "C": collector})
        outcome, code, text = "ok", "", ""
    except llmos.LlmosError as e:
        outcome, code, text = type(e).__name__, e.code.name, str(e)
    except Exception as e:
        outcome, code, text = type(e).__name__, "", str(e)
    k.send(collector, {"u": i, "outcome": outcome, "code": code,
                       "text": text.encode("ascii", "backslashreplace").decode()[:600]}, tag="userland")
channel = k._k._channel
for i, (method, kind, payloads, deadline) in enumerate(work["raw"]):
    path = "/llmos.v1.Kernel/" + method
    requests = [bytes.fromhex(p) for p in payloads]
    code, details = "OK", ""
    try:
        if kind == "unary_unary":
            channel.unary_unary(path)(requests[0], timeout=deadline)
        elif kind == "unary_stream":
            stream = channel.unary_stream(path)(requests[0], timeout=deadline)
            for n, _ in enumerate(stream):
                if n >= 2:
                    stream.cancel()
                    code = "CLIENT_CANCELLED"
                    break
        else:
            channel.stream_unary(path)(iter(requests), timeout=deadline)
    except grpc.RpcError as e:
        code, details = (e.code().name, e.details() or "") if code == "OK" else (code, "")
    k.send(collector, {"i": i, "code": code, "bytes": len(details.encode()),
                       "details": details.encode("ascii", "backslashreplace").decode()[:600]}, tag="call")
'''
# Calls of llmos.userland that must fail: with llmos.LlmosError of a documented code, or
# Python's TypeError/ValueError for arguments the SDK refuses itself. C is a port's pid.
USERLAND_CALLS = [
    "k.send(C, float('nan'))", "k.send(C, {'a': [float('inf')]})", "k.send(C, 2**60)", "k.send(C, '\\ud800')",
    "k.send(C, b'raw')", "k.send(2**64 - 1, 1)", "k.send(0, 1)", "k.send('nobody', 1)",
    "k.recv(timeout_ms=-1)", "k.recv(timeout_ms=float('nan'))", "k.recv(sender=2**64, timeout_ms=0)",
    "k.sleep(float('nan'))", "k.sleep(-1)", "k.wait(k.self())", "k.wait(2**64 - 1, timeout_ms=0)",
    "k.kill(2**63)", "k.register('\\u202e')", "k.register('')", "k.register('x' * 257)",
    "k.set_priority(None, 10**15)", "k.set_priority(None, 21)", "k.set_priority(None, 0, weight=10**6)",
    "k.spawn(lua='return 1', limits={'bogus': 1})", "k.spawn(lua='return 1', priority=10**9)",
    "k.spawn(python='(' * 100000)", "k.spawn(lua='return 1', args=float('nan'))", "k.spawn()",
    "k.fs.write('fz/a\\u0085b', b'x')", "k.fs.read('../../etc/passwd')", "k.lock.acquire('', timeout_ms=0)",
    "k.lock.acquire('l', timeout_ms=-5)", "k.info(2**63)", "k.infer(prompt='x', max_tokens=-1)",
    "k.infer(prompt='x', bogus=1)", "k.monitor(2**64 - 1)",
]
# Fields an agent may set only to itself (README: it cannot receive from another
# mailbox, send as someone else or open ports).
AGENT_SELF_ONLY = {("Recv", "pid"), ("Send", "from")}
# ...and where an agent leaves one of its identity fields 0, the kernel fills in the agent.
AGENT_IDENTITY = {"Spawn": "parent", "Send": "from", "Recv": "pid", "Register": "pid", "Monitor": "watcher",
                  "Infer": "pid", "Acquire": "pid", "Release": "pid", "Exit": "pid", "WriteFile": "pid",
                  "CreateContext": "pid", "ForkContext": "pid", "DropContext": "pid"}
AGENT_DENIED = {"OpenPort"}


def python_example(server: FuzzServer, data: Any) -> None:
    with server.example("python") as ex:
        pool = victims(server, ex)
        collector = server.open_port(mailbox=5000)
        agent = ex.spawned(server.must("Spawn", pb.SpawnRequest(python=AGENT, args=to_value({"collector": collector})))
                           .pid)
        pool.pids.append(agent)
        order = data.draw(st.permutations(sorted(METHODS)), label="every method, in this order")
        calls = [data.draw(rq.request(method, pool), label=method) for method in order]
        wire = []
        for req in calls:
            m = METHODS[req.method]
            kind = ("stream_" if m.client_streaming else "unary_") + ("stream" if m.server_streaming else "unary")
            deadline, _ = rq.deadline_for(req)
            wire.append([req.method, kind, [x.SerializeToString().hex() for x in req.messages] or [""], deadline])
        small = [len(json.dumps(w)) < 100_000 for w in wire]  # the calls travel in one message
        calls = [c for c, fits in zip(calls, small) if fits]
        wire = [w for w, fits in zip(wire, small) if fits]
        userland = data.draw(st.lists(st.sampled_from(USERLAND_CALLS), min_size=1, max_size=8, unique=True),
                             label="llmos.userland calls")
        payload = json.dumps({"raw": wire, "userland": userland}).encode()
        server.must("Send", _send(collector, agent, "calls", payload))
        out = server.call("Wait", pb.WaitRequest(pid=agent, timeout_ms=30_000), deadline=35)
        if out.ok and out.response.timed_out:
            server.call("Kill", pb.KillRequest(pid=agent))
        messages = server.drain(collector)
        server.call("Kill", pb.KillRequest(pid=collector))
        server.harness_pids.discard(collector)
        for m in messages:
            r = from_value(m.body)
            if m.tag == "userland":
                _check_userland_call(userland[r["u"]], r, agent)
        reports = {from_value(m.body)["i"]: from_value(m.body) for m in messages if m.tag == "call"}
        for i, req in enumerate(calls):
            r = reports.get(i)
            if r is None:
                continue
            _check_agent_call(req, r, agent)


def _check_userland_call(expr: str, r: dict, agent: int) -> None:
    STATS.agent[(f"userland {expr.split('(')[0]}", r["code"] or r["outcome"])] += 1
    where = f"In Python agent {agent}: {expr} -> {r['outcome']} {r['code']} {short(r['text'])}"
    if r["outcome"] == "ok":
        return fail(f"userland:{expr.split('(')[0]}:accepted", f"succeeded though it must fail. {where}")
    if r["code"]:
        if getattr(grpc.StatusCode, r["code"]) not in DOCUMENTED:
            return fail(f"userland:{r['code']}", where)
    elif r["outcome"] not in ("TypeError", "ValueError"):
        return fail(f"userland:{r['outcome']}", f"a {r['outcome']} instead of an llmos error. {where}")
    if LEAKED_EXCEPTION.search(r["text"]) and r["outcome"] not in ("TypeError", "ValueError"):
        return fail("userland:leaked exception", where)


def _send(frm: int, to: int, tag: str, data: bytes) -> pb.SendRequest:
    req = pb.SendRequest(to=to, tag=tag, data=data)
    setattr(req, "from", frm)
    return req


def _check_agent_call(req: rq.Request, r: dict, agent: int) -> None:
    code = r["code"]
    STATS.agent[(req.method, code)] += 1
    where = f"From inside Python agent {agent}: {req!r}"
    if code == "CLIENT_CANCELLED":
        return
    status = getattr(grpc.StatusCode, code)
    blocking = rq.deadline_for(req)[1]
    out = Outcome(req.method, status, r["details"], client_gave_up=code == "DEADLINE_EXCEEDED" and blocking)
    check_outcome(out, blocking, "agent", lambda: where)
    if r["bytes"] > MAX_STATUS_BYTES:
        return fail(f"{req.method}:long message", f"a {r['bytes']}-byte status message. {where}")
    itself = AGENT_IDENTITY.get(req.method)
    refusals = [r for r in req.refusals if not (itself and r.startswith(f"{itself}: 0 is unset"))]
    if req.method in AGENT_DENIED:
        refusals.append("agents cannot open ports")
    for method, fname in AGENT_SELF_ONLY:
        if req.method == method and req.messages and getattr(req.messages[0], fname) not in (0, agent):
            refusals.append(f"an agent acting as pid {getattr(req.messages[0], fname)}")
    if status == OK and refusals:
        return fail(f"agent:{req.method}:accepted", f"answered OK though {'; '.join(refusals)}. {where}")


# -- running ----------------------------------------------------------------------------------
EXAMPLES: dict[str, Callable[[FuzzServer, Any], None]] = {
    "rpc": rpc_example, "wire": wire_example, "lua": lua_example, "python": python_example,
}


def run(target: str, server: FuzzServer, profile: str = "ci", seed: int | None = None) -> None:
    """Run one target under a profile (a seed makes a "long" run reproducible)."""
    if target == "machine":
        from .machine import run_machine
        run_machine(server, hypothesis_settings(profile, target))
        return
    example = EXAMPLES[target]

    @hypothesis_settings(profile, target)
    @given(data=st.data())
    def fuzz(data: Any) -> None:
        example(server, data)

    fuzz.__name__ = f"fuzz_{target}"
    fuzz.__qualname__ = fuzz.__name__
    if seed is not None:
        from hypothesis import seed as with_seed
        fuzz = with_seed(seed)(fuzz)
    fuzz()

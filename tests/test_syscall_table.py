"""The one syscall table (server/llmosd/api/table.py) against the three userlands: every syscall
reachable from gRPC, from Lua's `sys` or from a Python agent's `llmos.userland.sys` is in the table
(and the other way round), and the userlands agree on which arguments a syscall refuses and why.
Real server, real gRPC, real Lua and Python processes."""
from __future__ import annotations

import inspect
import pathlib
import re
from typing import Any, Iterator

import grpc
import pytest

from llmos import userland
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd.api.syscalls import SERVICE, SYSCALLS
from llmosd.api.table import BY_NAME, BY_RPC, LUA_CALLS, LUA_YIELDS, TABLE
from llmosd_process import LlmosdServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SANDBOX = ROOT / "server" / "llmosd" / "lua" / "sandbox.c"


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = LlmosdServer(tmp_path_factory.mktemp("table") / "data", "--model", "none", "--cpus", "2")
    server.start()
    with server.channel() as channel:
        yield kernel_pb2_grpc.KernelStub(channel)
    server.stop()


def run_lua(stub: Any, source: str, args: Any = None) -> Any:
    pid = stub.Spawn(pb.SpawnRequest(lua=source, args=to_value(args))).pid
    info = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=30_000)).process
    assert info.exit_reason == "normal", info.error
    return from_value(info.result)


def run_python(stub: Any, source: str, args: Any = None) -> Any:
    pid = stub.Spawn(pb.SpawnRequest(python=source, args=to_value(args))).pid
    info = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=60_000)).process
    assert info.exit_reason == "normal", info.error
    return from_value(info.result)


# -- every way in is in the table --------------------------------------------------------------
def test_every_rpc_is_an_entry_with_a_handler() -> None:
    assert {m.name for m in SERVICE.methods} == set(BY_RPC) == set(SYSCALLS)


def test_the_table_names_each_syscall_once() -> None:
    assert len(BY_NAME) == len(TABLE)
    assert len(BY_RPC) == sum(1 for s in TABLE if s.rpc)


LIST_SYS = """
local found = {}
local function walk(t, prefix)
  for k, v in pairs(t) do
    if type(v) == "function" then found[#found + 1] = prefix .. k
    elseif type(v) == "table" then walk(v, prefix .. k .. ".") end
  end
end
walk(sys, "")
return found
"""


def test_lua_sys_is_exactly_the_table_entries_for_lua(stub: Any) -> None:
    assert sorted(run_lua(stub, LIST_SYS)) == sorted(s.name for s in TABLE if s.lua)


def test_python_agents_sys_is_exactly_the_table_entries_for_python() -> None:
    found = set()
    for prefix, cls in (("", userland.Sys), ("fs.", userland.Files), ("lock.", userland.Locks),
                        ("cond.", userland.Conds), ("context.", userland.Contexts)):
        found |= {prefix + name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}
    assert sorted(found) == sorted(s.name for s in TABLE if s.python)


def test_what_lua_sandbox_calls_and_yields_itself_is_in_the_table() -> None:
    """The sandbox's own functions (sys.log, sys.recv, sys.lock.acquire...) name bridge ops and
    yielded syscalls in C: each must be one the table declares, so the Python side has it."""
    source = SANDBOX.read_text()
    yielded = set(re.findall(r'yield_syscall\(L, "(\w+)"', source))
    called = set(re.findall(r'push_ref\(L, sandbox_of\(L\)->call\);\s*lua_pushliteral\(L, "(\w+)"\)', source))
    assert yielded and called
    assert yielded <= LUA_YIELDS
    assert called <= LUA_CALLS


# -- the userlands agree on arguments ----------------------------------------------------------
# (Lua call, the same call as an RPC, that RPC's name for the argument Lua calls `pid`).
SAME_CALLS = [
    ("sys.kill(0)", "Kill", {"pid": 0}),
    ("sys.kill(9007199254740993)", "Kill", {"pid": 9007199254740993}),
    ("sys.kill(123456789)", "Kill", {"pid": 123456789}),
    ("sys.info(0)", "GetProcess", {"pid": 0}),
    ("sys.info(123456789)", "GetProcess", {"pid": 123456789}),
    ("sys.set_priority(PORT, 21)", "SetPriority", {"pid": "PORT", "priority": 21}),
    ("sys.set_priority(PORT, -21)", "SetPriority", {"pid": "PORT", "priority": -21}),
    ("sys.set_priority(PORT, nil, 20000)", "SetPriority", {"pid": "PORT", "weight": 20000}),
    ("sys.set_priority(123456789, 0)", "SetPriority", {"pid": 123456789, "priority": 0}),
    ("sys.register('a\\0b')", "Register", {"pid": "PORT", "name": "a\0b"}),
    ("sys.register('')", "Register", {"pid": "PORT", "name": ""}),
    ("sys.register(string.rep('n', 257))", "Register", {"pid": "PORT", "name": "n" * 257}),
    ("sys.monitor(123456789)", "Monitor", {"watcher": "PORT", "target": 123456789}),
    ("sys.lock.release('')", "Release", {"pid": "PORT", "name": ""}),
    ("sys.fs.stat('a\\0b')", "StatFile", {"path": "a\0b"}),
    ("sys.fs.stat('../x')", "StatFile", {"path": "../x"}),
    ("sys.fs.delete('nothing-here')", "DeleteFile", {"path": "nothing-here"}),
    ("sys.lock.try_acquire('')", "Acquire", {"pid": "PORT", "name": "", "timeout_ms": 0}),
    ("sys.lock.try_acquire('a\\0b')", "Acquire", {"pid": "PORT", "name": "a\0b", "timeout_ms": 0}),
    ("sys.spawn{lua = 'return 1', priority = 21}", "Spawn", {"lua": "return 1", "priority": 21}),
    ("sys.spawn{lua = 'return 1', weight = 20000}", "Spawn", {"lua": "return 1", "weight": 20000}),
    ("sys.spawn{lua = 'return ('}", "Spawn", {"lua": "return ("}),
    ("sys.cond.signal('')", "CondSignal", {"name": ""}),
    ("sys.cond.broadcast('a\\0b')", "CondBroadcast", {"name": "a\0b"}),
    ("sys.cond.wait('', 'l')", "CondWait", {"pid": "PORT", "name": "", "lock": "l"}),
    ("sys.cond.wait('c', 'not-held')", "CondWait", {"pid": "PORT", "name": "c", "lock": "not-held"}),
    ("sys.ack(0)", "Ack", {"pid": "PORT", "message_id": 0}),
    ("sys.nack(123456789)", "Nack", {"pid": "PORT", "message_id": 123456789}),
]
REQUESTS = {"Kill": pb.KillRequest, "GetProcess": pb.GetProcessRequest, "SetPriority": pb.SetPriorityRequest,
            "Register": pb.RegisterRequest, "Monitor": pb.MonitorRequest, "Release": pb.ReleaseRequest,
            "StatFile": pb.FilePath, "DeleteFile": pb.FilePath, "Acquire": pb.AcquireRequest,
            "Spawn": pb.SpawnRequest, "CondSignal": pb.CondSignalRequest, "CondBroadcast": pb.CondSignalRequest,
            "CondWait": pb.CondWaitRequest, "Ack": pb.AckRequest, "Nack": pb.AckRequest}

def grpc_outcome(stub: Any, rpc: str, fields: dict, port: int) -> tuple[str, str]:
    """(status code name, details) of the RPC, ("ok", "ok") if it succeeds; PORT stands for `port`."""
    request = REQUESTS[rpc](**{k: port if v == "PORT" else v for k, v in fields.items()})
    try:
        getattr(stub, rpc)(request)
    except grpc.RpcError as e:
        return e.code().name, e.details()
    return "ok", "ok"


LUA_TRIES = """
local out = {}
for i, call in ipairs(args.calls) do
  local f = load("return " .. call:gsub("PORT", tostring(args.port)), "=call", "t", {sys = sys, string = string})
  local ok, a, b = pcall(f)
  out[i] = (not ok and tostring(a)) or (a == nil and tostring(b)) or "ok"
end
return out
"""


def _lua_reason(text: str) -> str:
    """An error raised in Lua without where it was raised and the syscall's name."""
    return re.sub(r"^sys\.[\w.]+: ", "", re.sub(r"^call:\d+: ", "", text))


def _same(text: str) -> str:
    """What must be the same in both userlands' errors: the rule's reason, after the label each
    gives the argument ("lock name: ...", "sys.lock.acquire: name: ..."), without the numbers
    (the caller's pid) or what each calls the pid an argument names (Lua's sys.monitor(pid) is
    Monitor's target)."""
    return re.sub(r"\d+", "N", text.rsplit(": ", 1)[-1]).replace("target", "pid")


def test_lua_and_grpc_refuse_the_same_arguments_for_the_same_reason(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    lua = run_lua(stub, LUA_TRIES, {"calls": [c for c, _, _ in SAME_CALLS], "port": port})
    assert len(lua) == len(SAME_CALLS)
    disagree = []
    for (call, rpc, fields), lua_text in zip(SAME_CALLS, lua):
        _, grpc_text = grpc_outcome(stub, rpc, fields, port)
        if _same(_lua_reason(lua_text)) != _same(grpc_text):
            disagree.append(f"{call}: Lua {lua_text!r}, gRPC {grpc_text!r}")
    assert disagree == []


PYTHON_TRIES = """
from llmos import userland
from llmos.errors import LlmosError
sys = userland.sys
out = []
for call in userland.sys.args["calls"]:
    try:
        eval(call.replace("PORT", str(userland.sys.args["port"])), {"sys": sys})
        out.append("ok")
    except LlmosError as e:
        out.append(e.code.name)
sys.exit(out)
"""


def test_python_agents_and_grpc_refuse_the_same_arguments_with_the_same_status(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    calls = [c.replace("nil", "None").replace("\\0", "\\x00").replace("string.rep('n', 257)", "'n' * 257")
             .replace("{", "(").replace("}", ")") for c, _, _ in SAME_CALLS]  # Lua's f{...} is Python's f(...)
    # Python agents act only as themselves: the calls that name another process as the actor are Lua's.
    python = run_python(stub, PYTHON_TRIES, {"calls": calls, "port": port})
    assert len(python) == len(SAME_CALLS) and set(python) != {"ok"}
    disagree = []
    for (call, rpc, fields), status in zip(SAME_CALLS, python):
        code, _ = grpc_outcome(stub, rpc, fields, port)
        if status != code:
            disagree.append(f"{call}: Python {status}, gRPC {code}")
    assert disagree == []

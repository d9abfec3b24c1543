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
from llmosd.api import table as T
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
            "CondWait": pb.CondWaitRequest, "Ack": pb.AckRequest, "Nack": pb.AckRequest, "Send": pb.SendRequest,
            "Recv": pb.RecvRequest, "Wait": pb.WaitRequest}

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
    assert disagree == [], "\n".join(disagree)


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
    assert disagree == [], "\n".join(disagree)


# -- bad arguments generated from the table's argument specs ------------------------------------
# Per kind: (what is wrong, the value in Lua, in Python, in a gRPC request field or None where the
# field's type cannot hold it). A value is only ever wrong in one way, so every userland refuses it
# for the same reason, before the syscall does anything.
BAD_VALUES = {
    T.PID: [("wrong type", "'x'", "'x'", None), ("zero", "0", "0", 0), ("negative", "-1", "-1", None),
            ("huge", "9007199254740993", "2**53 + 1", 2**53 + 1), ("NaN", "0/0", "float('nan')", None)],
    T.SENDER: [("wrong type", "'x'", "'x'", None), ("negative", "-1", "-1", None),
               ("huge", "9007199254740993", "2**53 + 1", 2**53 + 1)],
    T.RECEIVER: [("wrong type", "true", "True", None), ("huge", "9007199254740993", "2**53 + 1", 2**53 + 1),
                 ("bad UTF-8", "'\\255'", None, None)],
    T.INTEGER: [("wrong type", "'x'", "'x'", None), ("NaN", "0/0", "float('nan')", None)],
    T.DURATION_MS: [("negative", "-1", "-1", -1), ("NaN", "0/0", "float('nan')", None),
                    ("wrong type", "'x'", "'x'", None)],
    T.PRIORITY: [("above", "21", "21", 21), ("below", "-21", "-21", -21), ("wrong type", "'x'", "'x'", None)],
    T.WEIGHT: [("above", "20000", "20000", 20000), ("wrong type", "'x'", "'x'", None)],
    T.STRING: [("wrong type", "5", "5", None), ("bad UTF-8", "'\\255'", None, None)],
    T.NAME: [("wrong type", "5", "5", None), ("empty", "''", "''", ""), ("control", "'a\\0b'", "'a\\x00b'", "a\0b"),
             ("too long", "string.rep('n', 257)", "'n' * 257", "n" * 257), ("bad UTF-8", "'\\255'", None, None)],
    T.TEXT: [("wrong type", "5", "5", None), ("too long", "string.rep('t', 2000)", "'t' * 2000", "t" * 2000)],
    T.DATA: [("wrong type", "5", "5", None)],
    T.FLAG: [("wrong type", "'yes'", "'yes'", None)],
    T.MESSAGE_ID: [("zero", "0", "0", 0), ("huge", "9007199254740993", "2**53 + 1", 2**53 + 1),
                   ("wrong type", "'x'", "'x'", None)],
}
# A valid value per kind, for the arguments a generated call does not make bad ("PORT": an open port).
GOOD = {T.PID: ("PORT", "PORT", "PORT"), T.RECEIVER: ("PORT", "PORT", "PORT"), T.STRING: ("'x'", "'x'", "x"),
        T.NAME: ("'x'", "'x'", "x"), T.PRIORITY: ("0", "0", 0), T.DATA: ("''", "b''", b""),
        T.DURATION_MS: ("0", "0", 0), T.MESSAGE_ID: ("1", "1", 1), T.VALUE: ("nil", "None", None)}
# The fields an entry's RPC needs besides its arguments (whose fields have the arguments' names),
# for the entries whose RPC is not the entry's own (info is GetProcess) or names the actor.
RPC_FIXED = {"monitor": {"watcher": "PORT"}, "recv": {"pid": "PORT"}, "ack": {"pid": "PORT"}, "nack": {"pid": "PORT"},
             "register": {"pid": "PORT"}, "lock.acquire": {"pid": "PORT"}, "lock.release": {"pid": "PORT"},
             "lock.try_acquire": {"pid": "PORT", "timeout_ms": 0}, "cond.wait": {"pid": "PORT"}}
RPC_OF = {"lock.try_acquire": "Acquire"}
PYTHON_KEYWORDS = {"from": "sender"}  # `from` is a Python keyword: llmos.userland's sys.recv calls it sender
# context.*: checked only where an engine runs (this server has none: UNIMPLEMENTED first, everywhere).
NEEDS_ENGINE = {"infer", "context.create", "context.fork", "context.drop"}


def _reachable(entry: T.Syscall) -> int:
    return (entry.lua is not None) + entry.python + (entry.rpc is not None)


def generated_calls() -> list[tuple[str, str, str | None, str | None, dict | None]]:
    """(label, Lua call, Python call, RPC name, request fields) per bad value of every argument of
    every entry reachable from two or more userlands."""
    calls = []
    for entry in TABLE:
        if not entry.args or _reachable(entry) < 2 or entry.name in NEEDS_ENGINE:
            continue
        for i, arg in enumerate(entry.args):
            targets = [(arg, None)] if arg.kind != T.OPTIONS else [(o, arg) for o in arg.options]
            bad_key = [(T.Arg("bogus", "unknown option"), arg)] if arg.kind == T.OPTIONS else []
            for target, within in targets + bad_key:
                values = BAD_VALUES.get(target.kind, []) if target.name != "bogus" else [("unknown", "1", "1", None)]
                for what, lua_bad, py_bad, grpc_bad in values:
                    calls.append(_call(entry, i, target, within, what, lua_bad, py_bad, grpc_bad))
    return calls


def _call(entry: T.Syscall, i: int, target: T.Arg, within: T.Arg | None, what: str, lua_bad: str,
          py_bad: str | None, grpc_bad: Any) -> tuple[str, str, str | None, str | None, dict | None]:
    lua_args, py_args, py_keywords, fields = [], [], [], {}
    for j, arg in enumerate(entry.args):
        if arg.kind == T.OPTIONS:
            if j == i:
                lua_args.append(f"{{{target.name} = {lua_bad}}}")
                py_keywords.append(f"{PYTHON_KEYWORDS.get(target.name, target.name)}={py_bad}")
                fields[target.name] = grpc_bad
            continue
        if j == i:
            lua_args.append(lua_bad)
            py_args.append(py_bad)
            fields[arg.name] = grpc_bad
        elif j < i or not arg.optional or arg.kind in GOOD and all(
                not a.optional or a.kind in GOOD for a in entry.args[i + 1:j]):
            # positional: every one before the bad one; after it, the required ones (and valid
            # ones up to them: set_priority needs a priority or a weight)
            lua, py, field = GOOD[arg.kind] if arg.kind in GOOD else ("nil", "None", None)
            lua_args.append(lua)
            py_args.append(py)
            if field is not None:
                fields[arg.name] = field
    label = f"sys.{entry.name} {target.name} {what}"
    lua_call = f"sys.{entry.name}({', '.join(lua_args)})"
    python = None if py_bad is None or not entry.python else \
        f"sys.{entry.name}({', '.join(py_args + py_keywords)})"
    rpc = RPC_OF.get(entry.name, entry.rpc)
    if grpc_bad is None or rpc not in REQUESTS:
        return label, lua_call, python, None, None
    return label, lua_call, python, rpc, {**RPC_FIXED.get(entry.name, {}), **fields}


LUA_GENERATED = """
local out = {}
for i, call in ipairs(args.calls) do
  local f = load("return " .. call:gsub("PORT", tostring(args.port)), "=call", "t", {sys = sys, string = string})
  local ok, a, b = pcall(f)
  out[i] = (not ok and tostring(a)) or (a == nil and b ~= nil and tostring(b)) or "ok"
end
return out
"""
PYTHON_GENERATED = """
from llmos import userland
from llmos.errors import LlmosError
sys = userland.sys
out = []
for call in sys.args["calls"]:
    try:
        eval(call.replace("PORT", str(sys.args["port"])), {"sys": sys})
        out.append(["OK", "ok"])
    except LlmosError as e:
        out.append([e.code.name, e.message])
sys.exit(out)
"""


def _words(text: str) -> str:
    """An error's words without who says them: Lua's position, the "sys.x: " prefix; and the
    numbers (a pid given, the caller's pid)."""
    text = re.sub(r"^call:\d+: ", "", text)
    text = re.sub(r"^sys\.[\w.]+: ", "", text)
    return re.sub(r"-?\d+", "N", text)


def test_generated_bad_arguments_get_the_same_status_and_words_everywhere(stub: Any) -> None:
    port = stub.OpenPort(pb.OpenPortRequest()).pid
    calls = generated_calls()
    assert len(calls) > 40
    lua = run_lua(stub, LUA_GENERATED, {"calls": [c[1] for c in calls], "port": port})
    python = run_python(stub, PYTHON_GENERATED, {"calls": [c[2] or "None" for c in calls], "port": port})
    disagree = []
    for (label, lua_call, py_call, rpc, fields), lua_text, (py_code, py_text) in zip(calls, lua, python):
        assert lua_text != "ok", f"{label}: Lua accepted {lua_call}"
        if lua_text.endswith(": options: NaN and infinity are not JSON numbers"):
            # A Lua table crosses whole, by the value model (DECISIONS.md): a NaN in it is refused
            # before any option is looked at.
            assert py_call is None or py_code == "INVALID_ARGUMENT", (label, py_code)
            continue
        if label.endswith(" bogus unknown"):
            # Lua's option tables against Python's keywords (test_python_keywords_are_the_table_arguments):
            # each names the keyword its own way.
            assert "unknown option" in lua_text and "bogus" in lua_text, (label, lua_text)
            assert py_call is None or (py_code, "bogus" in py_text) == ("INVALID_ARGUMENT", True), (label, py_text)
            continue
        answers = {"Lua": _words(lua_text)}
        if py_call is not None:
            answers["Python"] = _words(py_text)
            if py_code != "INVALID_ARGUMENT" and py_code != "NOT_FOUND":
                disagree.append(f"{label}: Python {py_code} {py_text!r}")
        if rpc is not None:
            code, text = grpc_outcome(stub, rpc, fields, port)
            answers["gRPC"] = _words(text)
            if py_call is not None and code != py_code:
                disagree.append(f"{label}: Python {py_code}, gRPC {code}")
        if len(set(answers.values())) > 1:
            disagree.append(f"{label}: {answers}")
    assert disagree == [], "\n".join(disagree)


def test_python_keywords_are_the_table_arguments() -> None:
    """A Python agent's syscalls take the table's arguments: the positional ones by position, the
    options as keywords (Python's `sender` is the table's `from`, a Python keyword); extra
    parameters only where the table has none to give (context.create, infer, fs: checked by
    their services)."""
    owners = {"": userland.Sys, "fs.": userland.Files, "lock.": userland.Locks, "cond.": userland.Conds,
              "context.": userland.Contexts}
    differ = []
    for entry in TABLE:
        if not entry.python or not entry.args:
            continue
        prefix, _, method = entry.name.rpartition(".")
        function = getattr(owners[prefix + "." if prefix else ""], method)
        python = [PYTHON_KEYWORDS.get(p, p) for p in inspect.signature(function).parameters if p != "self"]
        table = [PYTHON_KEYWORDS.get(o.name, o.name) for a in entry.args
                 for o in (a.options if a.kind == T.OPTIONS else (a,))]
        names = {"monitor": ["target"], "ack": ["message_id"], "nack": ["message_id"]}  # (Python: pid, msg)
        if sorted(names.get(entry.name, python)) != sorted(table):
            differ.append(f"sys.{entry.name}: Python {python}, table {table}")
    assert differ == []


def test_a_refusal_names_the_first_bad_option_in_the_entry_order_whatever_the_tables(stub: Any) -> None:
    """Options are checked as given (the few a call has); when two are bad, the refusal names the
    first in the table entry's order (priority before weight), as it would have checking in order."""
    from llmosd.api import checks
    from llmosd.api.errors import InvalidArgument

    for given in ({"monitor": "yes", "weight": "x", "priority": "y"}, {"priority": "y", "weight": "x"}):
        with pytest.raises(InvalidArgument, match="priority must be an integer"):
            checks.arguments("spawn", {"options": {"lua": "return 1", **given}}, "sys.spawn: ")
    assert checks.arguments("spawn", {"options": {"weight": 7, "lua": "return 1", "monitor": None}}) == (
        {"weight": 7, "lua": "return 1"},)
    refused = run_lua(stub, "return {pcall(sys.spawn, {monitor = 'yes', weight = 'x', priority = 'y', lua = 'return 1'})}")
    assert refused[0] is False and refused[1].endswith("sys.spawn: priority must be an integer"), refused

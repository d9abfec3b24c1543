"""The isolation matrix (issue 14), generated from the syscall table (server/llmosd/api/table.py).

For every entry of the table, each actor applies it to each target its call can name, through a
real llmosd over real gRPC; the test checks that the answer is exactly the one the entry's rule
gives (docs/authority.md). Actors: clients with the admin token (namespace "default"), an owner
and a reader token of namespace "alpha", an owner token of namespace "beta"; a Lua process and a
Python agent of "alpha"; a client without a token (single-user mode's owner of "default").
Targets: the actor's own object, an object of its namespace that another owner made (another
token's port, a process that is not the caller's descendant), and an object of another namespace
("beta" for alpha's actors, "alpha" for the others), live and ended.

A client's call and a Python agent's are the same RPC request (CALLS[name].request), made here and
sent over the agent socket by the agent; a Lua process runs the entry's `sys` call (CALLS[name].lua).
test_every_entry_has_a_call fails when the table has an entry CALLS does not know how to make, so
no entry escapes the matrix. `expected` says what each cell answers, from the entry's rule alone.
"""
from __future__ import annotations

import inspect
import itertools
import re
import signal
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterator

import grpc
import httpx
import pytest
from google.protobuf import json_format

import llmos
from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmosd.api.table import ACT, ADMIN_ONLY, BY_NAME, NAMESPACE as NAMESPACE_RULE, OWN_MAILBOX, TABLE, Syscall
from llmosd_process import LlmosdServer

WAIT_S = 60
FOREVER = "while true do sys.recv{tag = 'never'} end"
OK, NOT_FOUND, DENIED = "OK", "NOT_FOUND", "PERMISSION_DENIED"

# -- what a call names ------------------------------------------------------------------------------
PROCESS = "process"  # a pid
PORT = "port"  # a mailbox: a client's port, a process's own
FILE = "file"  # a path in the namespace's tree ("dN/f")
DEAD_LETTER = "dead_letter"  # an id in the namespace's dead-letter queue
NAMESPACE = "namespace"  # a namespace's name
TOKEN = "token"  # a token's id
CONTEXT = "context"  # {pid, context}: a conversation context and the process that owns it
NAME = "name"  # a registered name
LEASE = "lease"  # {pid, id}: a message leased (received with ack) from a mailbox
NOTHING = "nothing"  # the call names no object: the caller's own namespace or itself

OWN, SIBLING, FOREIGN = "own", "sibling", "foreign"
ENDED = "foreign_ended"  # another namespace's process (or port) that has ended: as unknown as a live one
CHILD = "child"  # a process actor's child (a client's processes are all its namespace's)
EVERY_PROCESS = (OWN, CHILD, SIBLING, FOREIGN, ENDED)
# Objects that belong to one namespace, named by what a caller passes: a client's are its token's
# namespace's (an admin's, "default"'s); only pids (processes, ports, their contexts) and namespace
# names reach another namespace, and only for an admin.
ADMIN_SEES = {PROCESS, PORT, CONTEXT, NAMESPACE, LEASE}
# What a kind's targets are (a namespace has one file tree, one queue, one set of names).
TARGETS = {PROCESS: EVERY_PROCESS, PORT: (OWN, SIBLING, FOREIGN, ENDED),
           CONTEXT: (OWN, SIBLING, FOREIGN), LEASE: (OWN, SIBLING, FOREIGN), FILE: (OWN, FOREIGN),
           DEAD_LETTER: (OWN, FOREIGN),
           NAMESPACE: (OWN, FOREIGN), TOKEN: (OWN, FOREIGN), NAME: (OWN, FOREIGN), NOTHING: (OWN,)}

# A value of each kind, to make a request without a server (test_every_entry_has_a_call).
SAMPLE = {PROCESS: 1, PORT: 1, FILE: "d/f", DEAD_LETTER: 1, NAMESPACE: "alpha", TOKEN: "id", NAME: "n",
          CONTEXT: {"pid": 1, "context": 1}, LEASE: {"pid": 1, "id": 1}, NOTHING: None}


@dataclass(frozen=True)
class Call:
    """How to make one entry's call on a target `t` (its value by the kind, `u` a fresh name)."""

    target: str  # the kind of object it names
    request: str | None = None  # the RPC's request: a Python expression of t and u (pb: the protos)
    lua: str | None = None  # Lua statements (t, u), run in a Lua process of alpha
    python: str | None = None  # an entry without an RPC: a Python expression (sys, t, u) in an agent
    found: str | None = None  # a listing finds the target (an expression of r, the reply, and t): else NOT_FOUND
    fresh: bool = False  # the call uses up its target: each cell gets one of its own
    lua_targets: tuple[str, ...] = (OWN,)  # what the Lua call can name (most name the caller itself)
    process_own: str = "self"  # a process actor's own object: "self", or "child" (what it may end)
    lua_rule: str | None = None  # the rule the Lua call's target is under, if not the entry's
    # The request's other fields that name a process, each set to another namespace's (with the own
    # target in the first): it must not be found, NOT_FOUND; a filter's (what a reply shows of it, an
    # expression of r) finds nothing (NOT_FOUND too, by `found`'s convention).
    fields: tuple[tuple[str, str | None], ...] = ()
    lua_fields: tuple[tuple[str, str], ...] = ()  # the same in Lua: statements of f, the other process


SPAWN = "lua = 'return 1'"
# A Lua process leases a message of its own mailbox (nobody else may receive from it).
LUA_LEASE = "sys.send(sys.self(), 1, {tag = u}); sys.%s(sys.recv{tag = u, ack = true}.id)"
CHAT = "[pb.ChatMessage(role='user', content='hi')]"
# A process's cells the matrix cannot make (why): only clients' are made.
LEFT_OUT = {"exit": "a process's Exit ends itself: Lua's sys.exit names nobody, an agent's naming another is "
                    "refused before any lookup (tests/test_authority.py test_a_python_agent_past_its_library)"}
# One entry per table entry: test_every_entry_has_a_call keeps it so.
CALLS: dict[str, Call] = {
    "spawn": Call(PROCESS, f"pb.SpawnRequest(parent=t, {SPAWN})", lua="sys.spawn{lua = 'return 1'}",
                  fields=(("dead_letter", None),),
                  lua_fields=(("dead_letter", "sys.spawn{lua = 'return 1', dead_letter = f}"),)),
    "kill": Call(PROCESS, "pb.KillRequest(pid=t)", lua="sys.kill(t)", fresh=True, process_own="child",
                 lua_targets=EVERY_PROCESS),
    # A client's Exit closes a port (the port's rule); a process's (LEFT_OUT) ends itself.
    "exit": Call(PORT, "pb.ExitRequest(pid=t)", fresh=True),
    "wait": Call(PROCESS, "pb.WaitRequest(pid=t, timeout_ms=0)", lua="sys.wait(t, 0)", process_own="child",
                 lua_targets=EVERY_PROCESS),
    "sleep": Call(NOTHING, lua="sys.sleep(0)", python="sys.sleep(0)"),
    "self": Call(NOTHING, lua="assert(sys.self() > 0)", python="sys.self()"),
    "now": Call(NOTHING, lua="assert(sys.now() > 0)", python="sys.now()"),
    "log": Call(NOTHING, lua="sys.log('matrix')", python="sys.log('matrix')"),
    "info": Call(PROCESS, "pb.GetProcessRequest(pid=t)", lua="sys.info(t)", lua_targets=EVERY_PROCESS),
    "set_priority": Call(PROCESS, "pb.SetPriorityRequest(pid=t, priority=0)", lua="sys.set_priority(t, 0)",
                         lua_targets=EVERY_PROCESS),
    # The watcher is what `act` judges (Lua's is the caller itself; its target any process of the namespace).
    "monitor": Call(PROCESS, "pb.MonitorRequest(watcher=t, target=t)", lua="sys.monitor(t)",
                    lua_targets=EVERY_PROCESS, lua_rule=NAMESPACE_RULE, fields=(("target", None),)),
    "list_processes": Call(PROCESS, "pb.ListProcessesRequest()", found="t in [p.pid for p in r.processes]",
                           fields=(("parent", "len(r.processes) > 0"),)),
    "read_log": Call(PROCESS, "pb.ReadLogRequest(pid=t)"),
    "follow_log": Call(PROCESS, "pb.ReadLogRequest(pid=t)"),
    "events": Call(NOTHING, "pb.EventsRequest()"),
    "require": Call(NOTHING, lua="require('pool')"),
    "send": Call(PROCESS, "pb.SendRequest(to=t, tag='matrix')", lua="sys.send(t, 1, {tag = 'matrix'})",
                 lua_targets=EVERY_PROCESS, fields=(("from", None),)),
    "send_batch": Call(PROCESS, "pb.SendBatchRequest(to=t, messages=[pb.BatchMessage(tag='matrix')])",
                       fields=(("from", None),)),
    "recv": Call(PORT, "pb.RecvRequest(pid=t, timeout_ms=0)", lua="sys.recv{tag = 'matrix-none', timeout_ms = 0}",
                 fields=(("from", "r.HasField('message')"),),
                 lua_fields=(("from", "assert(sys.recv{from = f, timeout_ms = 0}, 'NOT_FOUND: nothing from it')"),)),
    "ack": Call(LEASE, "pb.AckRequest(pid=t['pid'], message_id=t['id'])", lua=LUA_LEASE % "ack", fresh=True),
    "nack": Call(LEASE, "pb.AckRequest(pid=t['pid'], message_id=t['id'])", lua=LUA_LEASE % "nack",
                 fresh=True),
    "register": Call(PROCESS, "pb.RegisterRequest(pid=t, name=u)", lua="sys.register(u)"),
    "whereis": Call(NAME, lua="assert(sys.whereis(t), 'NOT_FOUND: no such name')",
                    python="found(sys.whereis(t))"),
    "open_port": Call(NOTHING, "pb.OpenPortRequest()", fields=(("dead_letter", None),)),
    "list_dead_letters": Call(DEAD_LETTER, "pb.ListDeadLettersRequest()",
                              found="t in [d.id for d in r.dead_letters]",
                              fields=(("receiver", "len(r.dead_letters) > 0"),)),
    "get_dead_letter": Call(DEAD_LETTER, "pb.GetDeadLetterRequest(id=t)"),
    "retry_dead_letter": Call(DEAD_LETTER, "pb.RetryDeadLetterRequest(id=t)", fresh=True, fields=(("to", None),)),
    "purge_dead_letters": Call(DEAD_LETTER, "pb.PurgeDeadLettersRequest(ids=[t])", found="r.purged == 1",
                               fresh=True),
    "fs.write": Call(PROCESS, "pb.WriteFileRequest(pid=t, path=u, data=b'x')", lua="sys.fs.write(u, 'x')"),
    "fs.read": Call(FILE, "pb.ReadFileRequest(path=t)", lua="sys.fs.read(t)", lua_targets=(OWN, FOREIGN)),
    "fs.stat": Call(FILE, "pb.FilePath(path=t)", lua="sys.fs.stat(t)", lua_targets=(OWN, FOREIGN)),
    "fs.list": Call(FILE, "pb.FilePath(path=t.rpartition('/')[0])", lua="sys.fs.list(t:match('^[^/]*'))",
                    lua_targets=(OWN, FOREIGN)),
    "fs.delete": Call(FILE, "pb.FilePath(path=t)", lua="sys.fs.delete(t)", fresh=True, lua_targets=(OWN, FOREIGN)),
    "fs.rename": Call(FILE, "pb.RenameFileRequest(from_path=t, to_path=u)", lua="sys.fs.rename(t, u)", fresh=True,
                      lua_targets=(OWN, FOREIGN)),
    "fs.mkdir": Call(NOTHING, "pb.FilePath(path=u)", lua="sys.fs.mkdir(u)"),
    "lock.acquire": Call(PROCESS, "pb.AcquireRequest(pid=t, name=u, timeout_ms=0)",
                         lua="assert(sys.lock.acquire(u, {timeout_ms = 0}))"),
    "lock.try_acquire": Call(NOTHING, lua="assert(sys.lock.try_acquire(u))", python="sys.lock.try_acquire(u)"),
    # (the lock is acquired for t by the admin first: lock.release and cond.wait need it held)
    "lock.release": Call(PROCESS, "pb.ReleaseRequest(pid=t, name=u)", lua="sys.lock.release(u)"),
    "cond.wait": Call(PROCESS, "pb.CondWaitRequest(pid=t, name=u, lock=u, timeout_ms=0)",
                      lua="sys.cond.wait(u .. '-c', u, 0)"),
    "cond.signal": Call(PROCESS, "pb.CondSignalRequest(pid=t, name=u)", lua="sys.cond.signal(u)"),
    "cond.broadcast": Call(PROCESS, "pb.CondSignalRequest(pid=t, name=u)", lua="sys.cond.broadcast(u)"),
    "infer": Call(PROCESS, "pb.InferRequest(pid=t, prompt='hi', sampling=pb.SamplingParams(max_tokens=1))",
                  lua="sys.infer{prompt = 'hi', max_tokens = 1}"),
    "context.create": Call(PROCESS, f"pb.CreateContextRequest(pid=t, messages={CHAT})",
                           lua="sys.context.create{messages = {{role = 'user', content = 'hi'}}}"),
    "context.fork": Call(CONTEXT, "pb.ForkContextRequest(pid=t['pid'], context_id=t['context'])",
                         lua="sys.context.fork(t.context)", lua_targets=(OWN, SIBLING, FOREIGN)),
    "context.drop": Call(CONTEXT, "pb.DropContextRequest(pid=t['pid'], context_id=t['context'])",
                         lua="sys.context.drop(t.context)", fresh=True, lua_targets=(OWN, SIBLING, FOREIGN)),
    "create_token": Call(NOTHING, "pb.CreateTokenRequest(namespace='alpha', role='reader', label=u)"),
    "list_tokens": Call(NOTHING, "pb.ListTokensRequest()"),
    "revoke_token": Call(TOKEN, "pb.RevokeTokenRequest(id=t)", found="r.revoked", fresh=True),
    "get_namespace": Call(NAMESPACE, "pb.GetNamespaceRequest(name=t)"),
    "set_namespace": Call(NAMESPACE, "pb.SetNamespaceRequest(name=t, weight=100)"),
    "read_audit": Call(NOTHING, "pb.ReadAuditRequest(limit=1)"),
}

# -- the actors -------------------------------------------------------------------------------------
CLIENTS = ("admin", "owner", "reader", "other", "none")  # none: no token, single-user mode's owner of "default"
ROLE = {"admin": "admin", "owner": "owner", "reader": "reader", "other": "owner", "none": "owner"}
LUA, PYTHON = "lua", "python"
ACTORS = CLIENTS + (LUA, PYTHON)


def expected(entry: Syscall, actor: str, which: str, names_actor_field: bool, engine: bool) -> str:
    """What `actor` applying `entry` to its `which` target answers: by the entry's rule
    (docs/authority.md), and for one the rule lets through to the inference service when the
    server runs no engine, UNIMPLEMENTED."""
    want = _by_rule(entry, actor, which, names_actor_field)
    by_engine = want == OK or (actor == LUA and CALLS[entry.name].target == CONTEXT)  # (a handle: the engine's)
    if by_engine and not engine and entry.does.startswith("Inference"):
        return "UNIMPLEMENTED"
    return want


def _by_rule(entry: Syscall, actor: str, which: str, names_actor_field: bool) -> str:
    """`names_actor_field`: the target is in the request field an agent must fill with its own pid
    (the entry's acts_as), and is not the agent."""
    kind = CALLS[entry.name].target
    if actor in CLIENTS:
        role = ROLE[actor]
        if entry.rule == ADMIN_ONLY:
            return OK if role == "admin" else DENIED
        if role == "reader" and not entry.reader:
            return DENIED  # before any lookup
        if which in (FOREIGN, ENDED) and not (role == "admin" and kind in ADMIN_SEES):
            return NOT_FOUND  # another namespace's object does not exist for the caller
        if kind in (PORT, LEASE):  # a port is its opener's (or an admin's)
            return OK if which == OWN or role == "admin" else DENIED
        return OK
    if actor == PYTHON:
        if entry.agents is not None or entry.rule == ADMIN_ONLY:
            return DENIED  # the agent socket refuses the RPC to every agent
        if names_actor_field:
            return DENIED  # an agent acts only as itself, before any lookup
        if kind == LEASE and which == OWN:
            return "FAILED_PRECONDITION"  # (World.lease) the rule let it through to the leases it holds: none
    if which in (FOREIGN, ENDED) or (actor == LUA and kind == CONTEXT and which == SIBLING):
        return NOT_FOUND  # (Lua names a context by its handle alone: another process's is no context of its)
    rule = (CALLS[entry.name].lua_rule or entry.rule) if actor == LUA else entry.rule
    if which == SIBLING and rule in (ACT, OWN_MAILBOX):
        return DENIED  # a process acts on itself and its descendants, and receives from its own mailbox
    return OK


METHODS = pb.DESCRIPTOR.services_by_name["Kernel"].methods_by_name


def invoke(stub: Any, rpc: str, request: Any, metadata: Any = None) -> Any:
    """An RPC's reply (a stream's first): the Python actor runs this very function over its socket."""
    method = getattr(stub, rpc)
    desc = METHODS[rpc]
    if desc.client_streaming:
        return method(iter([request]), metadata=metadata)
    if desc.server_streaming:
        stream = method(request, metadata=metadata)
        try:
            return next(stream)
        finally:
            stream.cancel()
    return method(request, metadata=metadata)


class HttpRefusal(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def invoke_http(http: httpx.Client, rpc: str, request: Any, headers: dict[str, str]) -> Any:
    """invoke, through the HTTP gateway (api/http.py): the reply (a stream's first event), or HttpRefusal."""
    desc = METHODS[rpc]
    reply = getattr(pb, desc.output_type.name)()
    url = f"/v1/kernel/{rpc}"
    if desc.client_streaming:  # WriteFile: the body is the bytes; path, append and pid are the query's
        query = {"path": request.path, "append": "true" if request.append else "false", "pid": str(request.pid)}
        r = http.post(url, params=query, content=request.data, headers=headers)
    else:
        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        with http.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code == 200 and desc.server_streaming:
                event = ""
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        event = line[len("event: "):]
                    elif line.startswith("data: "):
                        data = json.loads(line[len("data: "):])
                        if event == "error":
                            raise HttpRefusal(data["error"]["status"])
                        return json_format.ParseDict(data, reply, ignore_unknown_fields=True)
            r.read()
    if r.status_code != 200:
        raise HttpRefusal(r.json()["error"]["status"])
    return json_format.ParseDict(r.json(), reply, ignore_unknown_fields=True)


PY_ACTOR = """
import grpc
import llmos
from llmos.userland import sys
from llmos.v1 import kernel_pb2 as pb

from typing import Any

METHODS = pb.DESCRIPTOR.services_by_name["Kernel"].methods_by_name


""" + inspect.getsource(invoke) + """

def found(value):
    if value is None:
        raise LookupError("not found")
    return value


stub = sys._k._stub
while True:
    m = sys.recv(tag="cells")
    out = []
    for cell in m.body:
        try:
            if cell.get("rpc"):
                request = getattr(pb, METHODS[cell["rpc"]].input_type.name).FromString(bytes.fromhex(cell["request"]))
                out.append(["OK", invoke(stub, cell["rpc"], request).SerializeToString().hex()])
            else:
                eval(cell["code"], {"sys": sys, "t": cell["t"], "u": cell["u"], "found": found})
                out.append(["OK", ""])
        except grpc.RpcError as e:
            out.append([e.code().name, e.details()])
        except llmos.LlmosError as e:
            out.append([e.code.name, str(e)])
        except LookupError:
            out.append(["NOT_FOUND", ""])
    sys.send(m.sender, out, tag="results")
"""

# Each cell's statements run as a function of (t, u); the answer is OK or the error's text.
LUA_ACTOR = """
while true do
  local m = sys.recv{tag = "cells"}
  local out = {}
  for i, cell in ipairs(m.body) do
    local fn, err = load("local t, u, f = ...; " .. cell.code)
    local ok, a, b = false, err, nil
    if fn then ok, a, b = pcall(fn, cell.t, cell.u, cell.f) end
    if not ok then out[i] = tostring(a) elseif a == nil and b ~= nil then out[i] = tostring(b) else out[i] = "OK" end
  end
  sys.send(m.from, out, {tag = "results"})
end
"""

# A Lua program gets the kernel's error as text: its status, by the words of its refusal.
LUA_WORDS = {
    NOT_FOUND: r"NOT_FOUND|no process with pid|no file or directory|no context",
    DENIED: r"acts only on itself|receives only from its own mailbox|belongs to",
    "UNIMPLEMENTED": r"runs no inference engine",
}


def lua_code(text: str) -> str:
    if text == OK:
        return OK
    for code, words in LUA_WORDS.items():
        if re.search(words, text):
            return code
    return text


@dataclass
class Cell:
    entry: Syscall
    actor: str
    which: str
    t: Any  # the target
    u: str  # a fresh name (paths, lock names, registered names)
    want: str
    field: str | None = None  # (Call.fields) the other field set to another namespace's process
    field_pid: int = 0
    door: str = "grpc"  # a client's: gRPC, or the HTTP gateway (POST /v1/kernel/<Method>)
    got: str = ""

    def request(self) -> Any:
        req = _request(CALLS[self.entry.name], self.t, self.u)
        if self.field is not None:
            setattr(req, self.field, self.field_pid)
        return req

    def outcome(self, code: str, reply: Any) -> str:
        """OK, a status code, or NOT_FOUND for a call that answers but finds nothing of what it names."""
        call = CALLS[self.entry.name]
        if self.field is not None:
            found = dict(call.fields)[self.field]
            return NOT_FOUND if code == OK and found is not None and not eval(found, {"r": reply}) else code
        if code == OK and call.found is not None and not eval(call.found, {"r": reply, "t": self.t}):  # noqa: S307
            return NOT_FOUND
        return code


class World:
    """Two namespaces with objects of every kind, and the actors. A namespace's tokens: alpha's owner,
    owner2 and reader; beta's other and other2; default's admin and its single-user client."""

    def __init__(self, server: LlmosdServer, engine: bool) -> None:
        self.server = server
        self.engine = engine
        admin_token = (server.data_dir / "admin.token").read_text().strip()
        self.tokens = {"admin": admin_token}
        made = llmos.Client(server.target, token=admin_token)
        for name, ns, role in (("owner", "alpha", "owner"), ("owner2", "alpha", "owner"),
                               ("reader", "alpha", "reader"), ("other", "beta", "owner"),
                               ("other2", "beta", "owner")):
            self.tokens[name] = made.create_token(ns, role, "matrix")[1]
        made.close()
        self.c = {name: llmos.Client(server.target, token=tok) for name, tok in self.tokens.items()}
        self.c["none"] = llmos.Client(server.target, token=None)  # single-user: owner of "default"
        self.channel = grpc.insecure_channel(server.target)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)
        self.counter = itertools.count()
        self.shared: dict[tuple, Any] = {}
        owner = self.c["owner"]
        self.actor_pid = {LUA: owner.spawn(lua=LUA_ACTOR), PYTHON: owner.spawn(python=PY_ACTOR)}
        self.results_port = owner.open_port()

    # Each actor's namespace: its own token, the token of another owner there, and the foreign one.
    NS = {"admin": ("admin", "none", "owner"), "none": ("none", "admin", "owner"),
          "owner": ("owner", "owner2", "other"),
          "reader": ("owner", "owner2", "other"), "other": ("other", "other2", "owner"),
          LUA: ("owner", "owner2", "other"), PYTHON: ("owner", "owner2", "other")}

    def fresh_name(self) -> str:
        return f"m{next(self.counter)}"

    def token_of(self, actor: str, which: str) -> str:
        own, peer, foreign = self.NS[actor]
        return {OWN: own, CHILD: own, SIBLING: peer, FOREIGN: foreign, ENDED: foreign}[which]

    def target(self, kind: str, actor: str, which: str, fresh: bool, process_own: str) -> Any:
        key = (kind, actor, which, process_own)
        if not fresh and key in self.shared:
            return self.shared[key]
        value = self.make(kind, actor, which, process_own)
        if not fresh:
            self.shared[key] = value
        return value

    def make(self, kind: str, actor: str, which: str, process_own: str) -> Any:
        maker = self.c[self.token_of(actor, which)]
        process_actor = actor in (LUA, PYTHON)
        if which == ENDED:
            pid = maker.open_port() if kind == PORT else maker.spawn(lua="return 1")
            if kind == PORT:
                maker.exit(pid)
            assert maker.wait(pid, timeout=WAIT_S) is not None
            return pid
        if which == CHILD:
            return maker.spawn(lua=FOREVER, parent=self.actor_pid[actor])
        if kind in (PROCESS, PORT, CONTEXT, LEASE):
            if process_actor and which == OWN:
                me = self.actor_pid[actor]
                pid = me if process_own == "self" or kind != PROCESS else \
                    self.c["owner"].spawn(lua=FOREVER, parent=me)
            elif kind in (PORT, LEASE) and not process_actor:
                pid = maker.open_port()
            else:
                pid = maker.spawn(lua=FOREVER)
            if kind == CONTEXT:  # (without an engine, a handle no context has)
                return {"pid": pid, "context": self.c["admin"].create_context(pid, [{"role": "user", "content": "hi"}])
                        .context_id if self.engine else 1}
            if kind == LEASE:
                return {"pid": pid, "id": self.lease(pid)}
            return pid
        if kind == FILE:
            path = f"d{next(self.counter)}/f"
            maker.write_file(path, b"x")
            return path
        if kind == DEAD_LETTER:
            return self.dead_letter(maker)
        if kind == NAMESPACE:
            return maker.get_namespace()["name"]
        if kind == TOKEN:
            return self.c["admin"].create_token(maker.get_namespace()["name"], "reader", "to revoke")[0]
        if kind == NAME:
            name = self.fresh_name()
            maker.spawn(lua=FOREVER, name=name)
            return name
        return None

    def lease(self, pid: int) -> int:
        """A message leased from `pid`'s mailbox: a port's by the admin; a process's, the id of one
        it holds no lease on (only it may receive from its mailbox; an Ack that passes the rule
        answers FAILED_PRECONDITION then)."""
        admin = self.c["admin"]
        if admin.get(pid).kind != "PORT":
            return 1
        admin.send(pid, "lease", tag="lease")
        return admin.recv(pid, tag="lease", ack=True, timeout=WAIT_S).id

    def dead_letter(self, maker: llmos.Client) -> int:
        """A dead letter of maker's namespace, whose receiver (a port) is alive: given up after one attempt."""
        port = maker.open_port(max_attempts=1)
        maker.send(port, "dead", tag="dead")
        got = maker.recv(port, tag="dead", ack=True, timeout=WAIT_S)
        maker.nack(port, got.id)
        (letter,) = maker.dead_letters(port)
        return letter.id


def _cells(world: World) -> list[Cell]:
    cells = []
    for entry in TABLE:
        call = CALLS[entry.name]
        for actor in ACTORS:
            if actor in CLIENTS and call.request is None:
                continue  # no RPC: clients cannot reach it
            if actor == PYTHON and call.request is None and call.python is None:
                continue
            if actor == LUA and call.lua is None:
                continue
            if actor in (LUA, PYTHON) and entry.name in LEFT_OUT:
                continue
            targets = call.lua_targets if actor == LUA else TARGETS[call.target]
            for which in targets:
                if (which == ENDED and actor == "admin") or (which == CHILD and actor in CLIENTS):
                    continue  # an admin sees every namespace: an ended process's answer is the entry's own
                t = world.target(call.target, actor, which, call.fresh, call.process_own)
                u = world.fresh_name()
                names_actor_field = False
                if actor == PYTHON and entry.acts_as and call.request is not None:
                    req = _request(call, t, u)
                    given = getattr(req, entry.acts_as)
                    names_actor_field = given not in (0, world.actor_pid[PYTHON])
                want = expected(entry, actor, which, names_actor_field, world.engine)
                cells.append(Cell(entry, actor, which, t, u, want))
            for field in [f for f, _ in (call.lua_fields if actor == LUA else call.fields)]:
                if actor not in ("owner", "reader", "other", "none", PYTHON, LUA):
                    continue  # (an admin's other namespaces exist: what it may name there is each field's own)
                for which in (FOREIGN, ENDED):
                    t = world.target(call.target, actor, OWN, call.fresh, call.process_own)
                    pid = world.target(PROCESS, actor, which, False, "self")
                    names_actor_field = actor == PYTHON and field == entry.acts_as
                    want = expected(entry, actor, which, names_actor_field, world.engine)
                    cells.append(Cell(entry, actor, which, t, world.fresh_name(), want, field, pid))
    return cells + [_through_http(world, c) for c in cells if c.actor in CLIENTS]


def _through_http(world: World, cell: Cell) -> Cell:
    """The same cell through the HTTP gateway (a target of its own where the call uses it up)."""
    call = CALLS[cell.entry.name]
    which = OWN if cell.field else cell.which
    t = world.target(call.target, cell.actor, which, True, call.process_own) if call.fresh else cell.t
    return dataclasses.replace(cell, t=t, u=world.fresh_name(), door="http")


def _request(call: Call, t: Any, u: str) -> Any:
    return eval(call.request, {"pb": pb, "t": t, "u": u})  # noqa: S307 (the test's own expressions)


def _prepare(world: World, cell: Cell) -> None:
    """What a cell needs held before it: lock.release and cond.wait, the lock (by the admin, for t)."""
    if cell.entry.name in ("lock.release", "cond.wait") and cell.which != ENDED:
        world.c["admin"].acquire(cell.t, cell.u, timeout=0)


# The matrix runs twice: with the built-in tiny model, and with no engine (an inference call that
# passes its rule is then UNIMPLEMENTED; one that does not is refused as without).
@pytest.fixture(scope="module", params=["tiny", "none"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    s = LlmosdServer(tmp_path_factory.mktemp("matrix") / "data", "--model", request.param, "--cpus", "2",
                     "--http", "127.0.0.1:0")
    s.start()
    yield s
    s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def world(server: LlmosdServer) -> Iterator[World]:
    w = World(server, engine="none" not in server.extra)
    yield w
    for client in w.c.values():
        client.close()
    w.channel.close()


def test_every_entry_has_a_call() -> None:
    """A new table entry fails here until the matrix knows how to make its call."""
    assert set(CALLS) == set(BY_NAME)
    for entry in TABLE:
        call = CALLS[entry.name]
        assert (call.request is not None) == (entry.rpc is not None), entry.name
        assert (call.lua is not None) == ((entry.lua is not None or entry.name == "require")
                                          and entry.name not in LEFT_OUT), entry.name
        assert (call.python is not None) == (entry.rpc is None and entry.python), entry.name
        if call.request is not None:
            made = type(_request(call, SAMPLE[call.target], "x")).__name__
            assert made == METHODS[entry.rpc].input_type.name, entry.name


# The uint64 fields of requests that name no process; every other one is a call's target or in its
# `fields` (or below, with why not), so that a new field naming a process is swept too.
NOT_PIDS = {"message_id", "message_ids", "context_id", "offset", "tail", "length", "id", "ids", "after_id", "before_id", "after_pid"}
NOT_SWEPT = {("events", "pid"): "a filter of events to come: a stream that shows nothing shows nothing yet"}


def test_every_field_naming_a_process_is_swept() -> None:
    sentinel = 4242
    for entry in TABLE:
        call = CALLS[entry.name]
        if call.request is None:
            continue
        t = {PROCESS: sentinel, PORT: sentinel, CONTEXT: {"pid": sentinel, "context": 1},
             LEASE: {"pid": sentinel, "id": 1}}.get(call.target, SAMPLE[call.target])
        req = _request(call, t, "x")
        for f in req.DESCRIPTOR.fields:
            if f.type != f.TYPE_UINT64 or f.name in NOT_PIDS or (entry.name, f.name) in NOT_SWEPT:
                continue
            assert getattr(req, f.name) == sentinel or f.name in dict(call.fields), (entry.name, f.name)


def test_the_isolation_matrix(world: World) -> None:
    cells = _cells(world)
    for cell in cells:
        _prepare(world, cell)
    by_actor: dict[str, list[Cell]] = {}
    for cell in cells:
        by_actor.setdefault(cell.actor, []).append(cell)
    http = httpx.Client(base_url=world.server.http, timeout=WAIT_S)
    for actor in CLIENTS:
        metadata = (("authorization", f"Bearer {world.tokens[actor]}"),) if actor in world.tokens else ()
        for cell in by_actor[actor]:
            try:
                if cell.door == "http":
                    reply = invoke_http(http, cell.entry.rpc, cell.request(), dict(metadata))
                else:
                    reply = invoke(world.stub, cell.entry.rpc, cell.request(), metadata)
                cell.got = cell.outcome(OK, reply)
            except grpc.RpcError as e:
                cell.got = e.code().name
            except HttpRefusal as e:
                cell.got = e.status
    http.close()
    for actor in (LUA, PYTHON):
        batch = by_actor[actor]
        body = []
        for cell in batch:
            call = CALLS[cell.entry.name]
            if actor == LUA:
                code = dict(call.lua_fields)[cell.field] if cell.field else call.lua
                body.append({"code": code, "t": cell.t, "u": cell.u, "f": cell.field_pid})
            elif call.request is not None:
                body.append({"rpc": cell.entry.rpc, "request": cell.request().SerializeToString().hex()})
            else:
                body.append({"code": call.python, "t": cell.t, "u": cell.u})
        owner = world.c["owner"]
        owner.send(world.actor_pid[actor], body, sender=world.results_port, tag="cells")
        answers = owner.recv(world.results_port, tag="results", timeout=WAIT_S).body
        for cell, answer in zip(batch, answers):
            call = CALLS[cell.entry.name]
            if actor == LUA:
                cell.got = lua_code(answer)
            else:
                code, detail = answer
                reply = getattr(pb, METHODS[cell.entry.rpc].output_type.name).FromString(bytes.fromhex(detail)) \
                    if code == OK and call.request is not None else None
                cell.got = cell.outcome(code, reply)
    wrong = [f"{c.entry.name} by {c.actor}{' over http' if c.door == 'http' else ''} on "
             f"{f'own {c.t!r} with {c.field}={c.field_pid} ({c.which})' if c.field else f'{c.which} {c.t!r}'}: "
             f"{c.got} (want {c.want})"
             for c in cells if c.got != c.want]
    assert not wrong, f"{len(wrong)} of {len(cells)} cells:\n" + "\n".join(wrong)


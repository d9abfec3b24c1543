"""The syscall table: every syscall of every userland, in one place.

Each entry names a syscall as programs call it (`sys.<name>` in Lua and in
Python agents, e.g. "send", "fs.read", "lock.acquire"), the gRPC method that
serves it to external clients and Python agents, whether it may block, the
subsystem call that does the work, and how each userland reaches it. The
userlands are made from it:
  - gRPC: api/syscalls.py has one handler per `rpc` here (checked at start-up
    against this table and the .proto); agents' identity rules (`acts_as`,
    `agents`) are read from here;
  - Lua: the sandbox builds each state's `sys` table from `lua_layout()`
    (lua/sandbox.c's push_sys), the bridge's call ops are `calls` here
    (lua/runtime.py's _CALLS), and a syscall that blocks yields `yields`
    (lua/slices.py's LuaRuntime.block_<yields>);
  - Python agents: llmos.userland's `sys` has exactly the entries with
    `python` (tests/test_syscall_table.py checks it), each over its `rpc`.
The C fast paths (lua/fast_paths.c) are the Lua implementation of `send` and
of `recv`'s take and block, not a second set of rules: what they do not
handle themselves they hand to the same Python code.

Each entry's `args` say how its arguments are checked: one Arg per argument
(its name as programs pass it, in Lua's order, and its kind, whose one checker
is api/checks.py's KINDS[kind]). The RPC handlers and the Lua bridge check
through checks.arguments(name, values, prefix), so every userland refuses a
bad argument with the same status and the same words ("sys.kill: pid ..."
from Lua and Python agents, "pid ..." from gRPC); the Lua sandbox's C fast
paths take their option keys from here (lua_layout).

Adding a syscall: an entry here, its subsystem code, and the userlands' ends
it names (an RPC handler, a LuaProcess method or LuaRuntime.block_ method).
This module is plain data: anything may import it.
"""
from __future__ import annotations

from dataclasses import dataclass

# Authority rules: what a caller may do to the process (or port) a syscall names. Another
# namespace's processes and names do not exist for the caller (NOT_FOUND) under every rule; an
# admin token sees every namespace. docs/authority.md is checked against this (tests/test_authority.py).
RULES = {
    "namespace": "any process in the caller's namespace",
    "act": "a process: itself and its descendants; an owner token: anything in its namespace",
    "own_mailbox": "a process: its own mailbox only; a client: a port its token opened (or with the port's secret)",
    "admin": "admin tokens only",
}
NAMESPACE, ACT, OWN_MAILBOX, ADMIN_ONLY = RULES

# A retry sends as the message's original sender: for the namespace's clients, not its processes.
DLQ_AGENTS = "the dead-letter queue is for the namespace's clients (a retry sends as the original sender)"

# How Lua's sys.<name> is made (lua/sandbox.c):
C_FUNCTION = "c"  # a function of the sandbox's own, of this name (self, log, send, recv, exit, lock.acquire)
CALL = "call"  # the bridge's call with op calls[0] (for fs.*, the file operation too): never blocks
YIELD = "yield"  # yields `yields` to the kernel, which answers when the syscall is done


# Kinds of argument, each checked by api/checks.py's KINDS[kind] (DECISIONS.md has the ranges).
PID = "pid"  # a process: an integer; 0 is unset (INVALID_ARGUMENT), one that cannot exist NOT_FOUND
RECEIVER = "receiver"  # a pid, or a registered name (the kernel looks it up)
SENDER = "sender"  # a receive's filter: a pid, or 0 for external clients; one that cannot exist NOT_FOUND
DURATION_MS = "duration_ms"  # ms: NaN and negative refused, above 10 years clamped
PRIORITY, WEIGHT = "priority", "weight"  # [-20, 20]; 1..10000
NAME = "name"  # a process, port or lock name: 1..256 printable characters
TEXT = "text"  # a short text (reason, tool name): at most 1 KiB of UTF-8
STRING = "string"  # UTF-8 text of any length (a tag, a correlation id, a path: its owner checks the rest)
DATA = "data"  # raw bytes
FLAG = "flag"  # a boolean
INTEGER = "integer"  # an exact integer (an offset, a count)
MESSAGE_ID = "message_id"  # 1..2^53
CONTEXT = "context"  # a conversation context's handle
LIMITS = "limits"  # a table of Limits' fields
VALUE = "value"  # a JSON value (checked with the message size limit where it is stored)
OPTIONS = "options"  # a table of the named options only (an unknown key is INVALID_ARGUMENT)


@dataclass(frozen=True)
class Arg:
    name: str  # as programs pass it (Lua: in this order); a gRPC request's field of that name
    kind: str  # its checker: api/checks.py KINDS[kind]
    optional: bool = False  # may be left out (Lua nil, Python None, an unset or zero field)
    options: tuple[Arg, ...] = ()  # kind OPTIONS: the keys it may hold, each with its kind


def opts(*options: Arg) -> Arg:
    """A trailing table of options (Lua's {tag = ..., timeout_ms = ...}, Python's keywords)."""
    return Arg("options", OPTIONS, True, options)


def optional(name: str, kind: str) -> Arg:
    return Arg(name, kind, True)


@dataclass(frozen=True)
class Syscall:
    name: str  # sys.<name> in Lua and Python agents; for gRPC-only syscalls, the RPC's name in snake case
    rpc: str | None  # the method of llmos.v1.Kernel (None: no RPC of its own)
    blocks: bool  # may wait: an RPC awaits a future, Lua yields, neither holds a thread
    does: str  # the subsystem call that does the work
    returns: str
    lua: str | None = None  # C_FUNCTION, CALL or YIELD; None: not in Lua's sys
    calls: tuple[str, ...] = ()  # the bridge call ops (LuaProcess methods) its Lua side uses
    yields: str | None = None  # the blocking syscall its Lua side yields
    python: bool = False  # in llmos.userland's sys (Python agents)
    acts_as: str | None = None  # on the agent socket, the request field that must name the calling agent
    agents: str | None = None  # why Python agents may not call `rpc` (None: they may)
    rule: str = "namespace"  # who may apply it to which process (RULES; api/authority.py enforces them)
    # Made on behalf of a durable process only by the process itself (PERMISSION_DENIED for anyone else,
    # admins included): its journal must have every call whose outcome is its own (a lock it holds).
    durable_self: bool = False
    reader: bool = False  # a reader token may call it (everything else needs owner or admin)
    changes: bool = True  # the RPC changes something (recorded in the audit log) unless it is a reader one
    args: tuple[Arg, ...] = ()  # how its arguments are checked (checks.arguments)


TABLE: tuple[Syscall, ...] = (
    # -- processes
    Syscall("spawn", "Spawn", False, "Kernel.spawn", "pid", CALL, ("spawn",), python=True, acts_as="parent", rule=ACT,
            args=(opts(optional("lua", STRING), optional("python", STRING), optional("path", STRING),
                       optional("args", VALUE), optional("name", STRING), optional("priority", INTEGER),
                       optional("weight", INTEGER), optional("limits", LIMITS), optional("monitor", FLAG),
                       optional("source_name", STRING), optional("dead_letter", INTEGER),
                       optional("max_attempts", INTEGER), optional("durable", FLAG)),)),
    Syscall("kill", "Kill", False, "Kernel.kill", "whether it was live", CALL, ("kill",), python=True, rule=ACT,
            args=(Arg("pid", PID), optional("reason", TEXT))),
    Syscall("exit", "Exit", False, "Kernel.exit (Lua: the process ends, lua/slices.py)", "nothing",
            C_FUNCTION, yields="exit", python=True, acts_as="pid", rule=ACT),
    Syscall("wait", "Wait", True, "Kernel.wait", "the ended process's record, or nothing (timed out)",
            YIELD, yields="wait", python=True, changes=False,
            args=(Arg("pid", PID), optional("timeout_ms", DURATION_MS))),
    Syscall("sleep", None, True, "Timers (Python agents: a Recv that times out)", "nothing",
            YIELD, yields="sleep", python=True,
            args=(Arg("ms", DURATION_MS),)),
    Syscall("self", None, False, "the process's own pid (kept by each userland)", "pid", C_FUNCTION, python=True),
    Syscall("now", None, False, "the wall clock", "ms since the epoch", CALL, ("now",), python=True),
    Syscall("log", None, False, "Kernel.log (Python agents: the output file)", "nothing", C_FUNCTION, ("log",),
            python=True),
    Syscall("info", "GetProcess", False, "Kernel.get", "the process's record", CALL, ("info",), python=True,
            reader=True,
            args=(optional("pid", PID),)),
    Syscall("set_priority", "SetPriority", False, "Kernel.set_priority", "nothing", CALL, ("set_priority",),
            python=True, rule=ACT,
            args=(optional("pid", PID), optional("priority", PRIORITY), optional("weight", WEIGHT))),
    Syscall("monitor", "Monitor", False, "Kernel.monitor", "nothing", CALL, ("monitor",), python=True,
            acts_as="watcher", rule=ACT,
            args=(Arg("target", PID),)),
    Syscall("list_processes", "ListProcesses", False, "Kernel.list", "records", reader=True),
    Syscall("read_log", "ReadLog", False, "Kernel.read_log", "lines", rule=ACT, reader=True),
    Syscall("follow_log", "FollowLog", True, "Kernel.read_log, woken by Kernel.follow_log", "a stream of lines",
            rule=ACT, reader=True),
    Syscall("events", "Events", True, "Kernel.event_listeners", "a stream of process events", reader=True),
    Syscall("require", None, False, "Library.source (lua/library.py): a module of the userland library",
            "the module's source, which the sandbox compiles and runs once (Lua's global require, not sys.require)",
            calls=("require",)),
    # -- messages and names
    Syscall("send", "Send", False, "Kernel.send; between Lua processes lua/fast_paths.c's send_message",
            "message id", C_FUNCTION, python=True, acts_as="from",
            args=(Arg("to", RECEIVER), optional("body", VALUE),
                  opts(optional("tag", STRING), optional("data", DATA), optional("correlation_id", STRING),
                       optional("notify_undelivered", FLAG), optional("idempotency_key", STRING)))),
    # Many messages to one receiver in one call (clients' round trips): each message is checked as
    # send's arguments (its handler: checks.arguments("send", ...)); this entry names the receiver only.
    Syscall("send_batch", "SendBatch", False, "Kernel.send_batch", "message ids", acts_as="from",
            agents="a Python agent sends with sys.send: a batch is for clients' round trips",
            args=(Arg("to", RECEIVER),)),
    Syscall("recv", "Recv", True, "Kernel.recv; between Lua processes lua/fast_paths.c's try_recv and receive; "
            "with ack, Acks.recv_locked (kernel/acks.py)",
            "a message, or nothing (timed out)", C_FUNCTION, yields="recv", python=True, acts_as="pid",
            rule=OWN_MAILBOX,
            args=(opts(optional("from", SENDER), optional("tag", STRING), optional("correlation_id", STRING),
                       optional("timeout_ms", DURATION_MS), optional("ack", FLAG),
                       optional("lease_ms", DURATION_MS)),)),
    Syscall("ack", "Ack", False, "Acks.ack (kernel/acks.py)", "nothing", CALL, ("ack",), python=True, acts_as="pid",
            rule=OWN_MAILBOX,
            args=(Arg("message_id", MESSAGE_ID),)),
    Syscall("nack", "Nack", False, "Acks.nack (kernel/acks.py)", "nothing", CALL, ("nack",), python=True,
            acts_as="pid", rule=OWN_MAILBOX,
            args=(Arg("message_id", MESSAGE_ID),)),
    Syscall("register", "Register", False, "Kernel.register", "nothing", CALL, ("register",), python=True,
            acts_as="pid", rule=ACT,
            args=(Arg("name", STRING),)),
    Syscall("whereis", None, False, "Kernel.whereis (Python agents: ListProcesses by name)", "pid or nothing",
            CALL, ("whereis",), python=True, reader=True,
            args=(Arg("name", STRING),)),
    Syscall("open_port", "OpenPort", False, "Kernel.open_port", "pid",
            agents="agents have a mailbox of their own; ports are for external clients"),
    # -- the namespace's dead-letter queue (kernel/deadletters.py): the caller's namespace's, for its clients
    Syscall("list_dead_letters", "ListDeadLetters", False, "DeadLetters.list", "dead letters, a page",
            agents=DLQ_AGENTS, reader=True),
    Syscall("get_dead_letter", "GetDeadLetter", False, "DeadLetters.get", "a dead letter", agents=DLQ_AGENTS,
            reader=True),
    Syscall("retry_dead_letter", "RetryDeadLetter", False, "DeadLetters.retry_locked", "the new message id",
            agents=DLQ_AGENTS),
    Syscall("purge_dead_letters", "PurgeDeadLetters", False, "DeadLetters.forget_locked / purge_locked",
            "how many were taken out", agents=DLQ_AGENTS),
    # -- files (services/files.py)
    Syscall("fs.write", "WriteFile", False, "FileStore.open_writer / write", "file info", CALL, ("fs",),
            python=True, acts_as="pid",
            args=(Arg("path", STRING), Arg("data", DATA), opts(optional("append", FLAG)))),
    Syscall("fs.read", "ReadFile", False, "FileStore.open_reader / read", "bytes", CALL, ("fs",), python=True,
            reader=True,
            args=(Arg("path", STRING), opts(optional("offset", INTEGER), optional("length", INTEGER)))),
    Syscall("fs.stat", "StatFile", False, "FileStore.stat", "file info", CALL, ("fs",), python=True, reader=True,
            args=(Arg("path", STRING),)),
    Syscall("fs.list", "ListFiles", False, "FileStore.list", "file infos", CALL, ("fs",), python=True, reader=True,
            args=(Arg("path", STRING),)),
    Syscall("fs.delete", "DeleteFile", False, "FileStore.delete", "nothing", CALL, ("fs",), python=True,
            args=(Arg("path", STRING),)),
    Syscall("fs.rename", "RenameFile", False, "FileStore.rename", "file info", CALL, ("fs",), python=True,
            args=(Arg("src", STRING), Arg("dst", STRING))),
    Syscall("fs.mkdir", "MakeDir", False, "FileStore.mkdir", "file info", CALL, ("fs",), python=True,
            args=(Arg("path", STRING),)),
    # -- locks (services/sync.py)
    Syscall("lock.acquire", "Acquire", True, "SyncTable.acquire", "{previous_holder_died}, or nothing (timed out)",
            C_FUNCTION, ("lock_acquire_now",), yields="lock_acquire", python=True, acts_as="pid", rule=ACT,
            durable_self=True,
            args=(Arg("name", NAME), opts(optional("semaphore", INTEGER), optional("timeout_ms", DURATION_MS)))),
    Syscall("lock.try_acquire", None, False, "SyncTable.try_acquire (gRPC: Acquire with timeout_ms 0)",
            "{previous_holder_died}, or nothing", CALL, ("lock_try",), python=True,
            args=(Arg("name", NAME), opts(optional("semaphore", INTEGER)))),
    Syscall("lock.release", "Release", False, "SyncTable.release", "nothing", CALL, ("lock_release",), python=True,
            acts_as="pid", rule=ACT, durable_self=True,
            args=(Arg("name", STRING),)),
    # -- condition variables (services/sync.py)
    Syscall("cond.wait", "CondWait", True, "SyncTable.cond_wait", "{signalled, timed_out}, holding the lock again",
            YIELD, yields="cond_wait", python=True, acts_as="pid", rule=ACT, durable_self=True,
            args=(Arg("name", STRING), Arg("lock", STRING), optional("timeout_ms", DURATION_MS))),
    Syscall("cond.signal", "CondSignal", False, "SyncTable.cond_signal", "how many were woken (0 or 1)", CALL,
            ("cond_signal",), python=True, acts_as="pid", rule=ACT,
            args=(Arg("name", STRING),)),
    Syscall("cond.broadcast", "CondBroadcast", False, "SyncTable.cond_broadcast", "how many were woken", CALL,
            ("cond_broadcast",), python=True, acts_as="pid", rule=ACT,
            args=(Arg("name", STRING),)),
    # -- inference (services/inference.py)
    # (their options' values: the inference service's checks, api/checks.py chat, tool_choice...)
    Syscall("infer", "Infer", True, "Inference", "{text, finish_reason, usage}", YIELD, yields="infer",
            python=True, acts_as="pid", rule=ACT,
            args=(opts(*(optional(key, VALUE) for key in (
                "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "priority",
                "timeout_ms", "json_schema", "regex", "grammar", "tools", "tool_choice", "context"))),)),
    Syscall("context.create", "CreateContext", True, "Inference.create_context (waits for the prefill)",
            "context handle", YIELD, yields="context_create", python=True, acts_as="pid", rule=ACT,
            args=(opts(optional("messages", VALUE), optional("tools", VALUE)),)),
    Syscall("context.fork", "ForkContext", False, "Inference.fork_context", "context handle", CALL,
            ("context_fork",), python=True, acts_as="pid", rule=ACT,
            args=(Arg("context", CONTEXT),)),
    Syscall("context.drop", "DropContext", False, "Inference.drop_context", "nothing", CALL, ("context_drop",),
            python=True, acts_as="pid", rule=ACT,
            args=(Arg("context", CONTEXT),)),
    # -- tokens (api/tokens.py)
    Syscall("create_token", "CreateToken", False, "Tokens.create", "id and token", rule=ADMIN_ONLY,
            agents="token management is for admin tokens"),
    Syscall("list_tokens", "ListTokens", False, "Tokens.list", "ids, namespaces, roles, labels", rule=ADMIN_ONLY,
            agents="token management is for admin tokens", changes=False),
    Syscall("revoke_token", "RevokeToken", False, "Tokens.revoke", "whether it existed", rule=ADMIN_ONLY,
            agents="token management is for admin tokens"),
    Syscall("get_namespace", "GetNamespace", False, "Kernel.namespace_use", "use and quotas", reader=True),
    Syscall("set_namespace", "SetNamespace", False, "Namespaces.set", "use and quotas", rule=ADMIN_ONLY,
            agents="namespace settings are for admin tokens"),
    Syscall("read_audit", "ReadAudit", False, "AuditLog.read", "the newest audit entries", rule=ADMIN_ONLY,
            agents="the audit log is for admin tokens", changes=False),
)

BY_NAME = {s.name: s for s in TABLE}
BY_RPC = {s.rpc: s for s in TABLE if s.rpc is not None}
AGENT_IDENTITY = {s.rpc: s.acts_as for s in TABLE if s.rpc is not None and s.acts_as is not None}
AGENT_DENIED = {s.rpc: s.agents for s in TABLE if s.rpc is not None and s.agents is not None}
LUA_CALLS = frozenset(op for s in TABLE for op in s.calls)
LUA_YIELDS = frozenset(s.yields for s in TABLE if s.yields is not None)


def option_keys(s: Syscall) -> tuple[str, ...] | None:
    """The keys of the entry's table of options (None: it takes none)."""
    return next((tuple(o.name for o in a.options) for a in s.args if a.kind == OPTIONS), None)


def lua_layout() -> tuple[tuple[str, str, str | None, str | None, tuple[str, ...] | None], ...]:
    """What lua/sandbox.c builds each state's `sys` from: (path, how, op, file op, option keys) per
    entry; a sandbox function of its own (send, recv) refuses option keys not in the last."""
    out = []
    for s in TABLE:
        if s.lua == C_FUNCTION:
            out.append((s.name, s.lua, None, None, option_keys(s)))
        elif s.lua == CALL:
            op = s.calls[0]
            out.append((s.name, s.lua, op, s.name.rpartition(".")[2] if op == "fs" else None, None))
        elif s.lua == YIELD:
            out.append((s.name, s.lua, s.yields, None, None))
    return tuple(out)


RULE_OF = {s.name: s.rule for s in TABLE}
DURABLE_SELF = frozenset(s.name for s in TABLE if s.durable_self)
READER_RPCS = frozenset(s.rpc for s in TABLE if s.rpc is not None and s.reader)
ADMIN_RPCS = frozenset(s.rpc for s in TABLE if s.rpc is not None and s.rule == ADMIN_ONLY)
AUDITED_RPCS = frozenset(s.rpc for s in TABLE if s.rpc is not None and s.changes and not s.reader)

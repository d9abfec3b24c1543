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
    reader: bool = False  # a reader token may call it (everything else needs owner or admin)
    changes: bool = True  # the RPC changes something (recorded in the audit log) unless it is a reader one


TABLE: tuple[Syscall, ...] = (
    # -- processes
    Syscall("spawn", "Spawn", False, "Kernel.spawn", "pid", CALL, ("spawn",), python=True, acts_as="parent", rule=ACT),
    Syscall("kill", "Kill", False, "Kernel.kill", "whether it was live", CALL, ("kill",), python=True, rule=ACT),
    Syscall("exit", "Exit", False, "Kernel.exit (Lua: the process ends, lua/slices.py)", "nothing",
            C_FUNCTION, yields="exit", python=True, acts_as="pid", rule=ACT),
    Syscall("wait", "Wait", True, "Kernel.wait", "the ended process's record, or nothing (timed out)",
            YIELD, yields="wait", python=True, changes=False),
    Syscall("sleep", None, True, "Timers (Python agents: a Recv that times out)", "nothing",
            YIELD, yields="sleep", python=True),
    Syscall("self", None, False, "the process's own pid (kept by each userland)", "pid", C_FUNCTION, python=True),
    Syscall("now", None, False, "the wall clock", "ms since the epoch", CALL, ("now",), python=True),
    Syscall("log", None, False, "Kernel.log (Python agents: the output file)", "nothing", C_FUNCTION, ("log",),
            python=True),
    Syscall("info", "GetProcess", False, "Kernel.get", "the process's record", CALL, ("info",), python=True,
            reader=True),
    Syscall("set_priority", "SetPriority", False, "Kernel.set_priority", "nothing", CALL, ("set_priority",),
            python=True, rule=ACT),
    Syscall("monitor", "Monitor", False, "Kernel.monitor", "nothing", CALL, ("monitor",), python=True,
            acts_as="watcher", rule=ACT),
    Syscall("list_processes", "ListProcesses", False, "Kernel.list", "records", reader=True),
    Syscall("read_log", "ReadLog", False, "Kernel.read_log", "lines", rule=ACT, reader=True),
    Syscall("events", "Events", True, "Kernel.event_listeners", "a stream of process events", reader=True),
    Syscall("require", None, False, "Library.source (lua/library.py): a module of the userland library",
            "the module's source, which the sandbox compiles and runs once (Lua's global require, not sys.require)",
            calls=("require",)),
    # -- messages and names
    Syscall("send", "Send", False, "Kernel.send; between Lua processes lua/fast_paths.c's send_message",
            "message id", C_FUNCTION, python=True, acts_as="from"),
    Syscall("recv", "Recv", True, "Kernel.recv; between Lua processes lua/fast_paths.c's try_recv and receive; "
            "with ack, Acks.recv_locked (kernel/acks.py)",
            "a message, or nothing (timed out)", C_FUNCTION, yields="recv", python=True, acts_as="pid",
            rule=OWN_MAILBOX),
    Syscall("ack", "Ack", False, "Acks.ack (kernel/acks.py)", "nothing", CALL, ("ack",), python=True, acts_as="pid",
            rule=OWN_MAILBOX),
    Syscall("nack", "Nack", False, "Acks.nack (kernel/acks.py)", "nothing", CALL, ("nack",), python=True,
            acts_as="pid", rule=OWN_MAILBOX),
    Syscall("register", "Register", False, "Kernel.register", "nothing", CALL, ("register",), python=True,
            acts_as="pid", rule=ACT),
    Syscall("whereis", None, False, "Kernel.whereis (Python agents: ListProcesses by name)", "pid or nothing",
            CALL, ("whereis",), python=True, reader=True),
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
            python=True, acts_as="pid"),
    Syscall("fs.read", "ReadFile", False, "FileStore.open_reader / read", "bytes", CALL, ("fs",), python=True,
            reader=True),
    Syscall("fs.stat", "StatFile", False, "FileStore.stat", "file info", CALL, ("fs",), python=True, reader=True),
    Syscall("fs.list", "ListFiles", False, "FileStore.list", "file infos", CALL, ("fs",), python=True, reader=True),
    Syscall("fs.delete", "DeleteFile", False, "FileStore.delete", "nothing", CALL, ("fs",), python=True),
    Syscall("fs.rename", "RenameFile", False, "FileStore.rename", "file info", CALL, ("fs",), python=True),
    Syscall("fs.mkdir", "MakeDir", False, "FileStore.mkdir", "file info", CALL, ("fs",)),
    # -- locks (services/sync.py)
    Syscall("lock.acquire", "Acquire", True, "SyncTable.acquire", "{previous_holder_died}, or nothing (timed out)",
            C_FUNCTION, ("lock_acquire_now",), yields="lock_acquire", python=True, acts_as="pid", rule=ACT),
    Syscall("lock.try_acquire", None, False, "SyncTable.try_acquire (gRPC: Acquire with timeout_ms 0)",
            "{previous_holder_died}, or nothing", CALL, ("lock_try",), python=True),
    Syscall("lock.release", "Release", False, "SyncTable.release", "nothing", CALL, ("lock_release",), python=True,
            acts_as="pid", rule=ACT),
    # -- condition variables (services/sync.py)
    Syscall("cond.wait", "CondWait", True, "SyncTable.cond_wait", "{signalled, timed_out}, holding the lock again",
            YIELD, yields="cond_wait", python=True, acts_as="pid", rule=ACT),
    Syscall("cond.signal", "CondSignal", False, "SyncTable.cond_signal", "how many were woken (0 or 1)", CALL,
            ("cond_signal",), python=True, acts_as="pid", rule=ACT),
    Syscall("cond.broadcast", "CondBroadcast", False, "SyncTable.cond_broadcast", "how many were woken", CALL,
            ("cond_broadcast",), python=True, acts_as="pid", rule=ACT),
    # -- inference (services/inference.py)
    Syscall("infer", "Infer", True, "Inference", "{text, finish_reason, usage}", YIELD, yields="infer",
            python=True, acts_as="pid", rule=ACT),
    Syscall("context.create", "CreateContext", True, "Inference.create_context (waits for the prefill)",
            "context handle", YIELD, yields="context_create", python=True, acts_as="pid", rule=ACT),
    Syscall("context.fork", "ForkContext", False, "Inference.fork_context", "context handle", CALL,
            ("context_fork",), python=True, acts_as="pid", rule=ACT),
    Syscall("context.drop", "DropContext", False, "Inference.drop_context", "nothing", CALL, ("context_drop",),
            python=True, acts_as="pid", rule=ACT),
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


def lua_layout() -> tuple[tuple[str, str, str | None, str | None], ...]:
    """What lua/sandbox.c builds each state's `sys` from: (path, how, op, file op) per entry."""
    out = []
    for s in TABLE:
        if s.lua == C_FUNCTION:
            out.append((s.name, s.lua, None, None))
        elif s.lua == CALL:
            op = s.calls[0]
            out.append((s.name, s.lua, op, s.name.rpartition(".")[2] if op == "fs" else None))
        elif s.lua == YIELD:
            out.append((s.name, s.lua, s.yields, None))
    return tuple(out)


RULE_OF = {s.name: s.rule for s in TABLE}
READER_RPCS = frozenset(s.rpc for s in TABLE if s.rpc is not None and s.reader)
AUDITED_RPCS = frozenset(s.rpc for s in TABLE if s.rpc is not None and s.changes and not s.reader)

"""Authority: who is calling (a `Caller`) and whether it may apply a syscall to a process.

The rules are the syscall table's (`Syscall.rule`, `Syscall.reader`, table.RULES); this module
is their one implementation, called by the kernel for every userland: gRPC clients and Python
agents (api/syscalls.py makes their Caller from the call's metadata), Lua processes (their
LuaProcess's Caller). The C fast paths between Lua processes need no call here: a Lua send
names its sender itself and stays within its namespace (lua/fast_paths.c compares the two
namespaces, interned strings, by pointer; anything else goes through the kernel), a Lua
receive takes from its own mailbox.

Another namespace's processes and names do not exist for a caller: NOT_FOUND, never
PERMISSION_DENIED, so that a caller learns nothing of what it may not touch.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import NotFound, PermissionDenied
from .table import ACT, DURABLE_SELF, OWN_MAILBOX, RULE_OF

ADMIN, OWNER, READER, PROCESS = "admin", "owner", "reader", "process"
TOKEN_ROLES = (ADMIN, OWNER, READER)
DEFAULT_NAMESPACE = sys.intern("default")


@dataclass(frozen=True, slots=True)
class Caller:
    """A syscall's caller. A process (Lua or Python agent) is its pid in its namespace; a client
    is its token's namespace and role, and `key` (the token's id; "" in single-user mode), the
    identity that owns the ports it opens."""

    namespace: str
    role: str
    pid: int = 0
    key: str = ""

    def sees(self, namespace: str) -> bool:
        return self.role == ADMIN or namespace == self.namespace


SINGLE_USER = Caller(DEFAULT_NAMESPACE, OWNER)


def process_caller(pid: int, namespace: str) -> Caller:
    return Caller(namespace, PROCESS, pid)


def not_found(pid: int) -> NotFound:
    return NotFound(f"no process with pid {pid}")


def authorize(caller: Caller | None, syscall: str, pid: int, namespace: str,
              lineage: Callable[[], Iterable[int]], port_key: str | None = None, durable: bool = False) -> None:
    """Whether `caller` may apply `syscall` to the process `pid` of `namespace`: nothing, or
    NotFound (another namespace) / PermissionDenied. `lineage` gives the target's ancestors
    (asked only when needed); `port_key` is the opener's key if the target is a port; `durable`,
    whether it is a durable process. A None caller is the kernel itself."""
    if caller is None or (caller.pid == pid and caller.role == PROCESS):  # a process may act on itself
        return
    if not caller.sees(namespace):
        raise not_found(pid)
    if durable and syscall in DURABLE_SELF:  # (it is not the process itself, above)
        raise PermissionDenied(f"{syscall}: pid {pid} is a durable process: only it takes, gives back or waits "
                               "on a lock for itself (its journal must have each one, docs/durable-agents.md)")
    rule = RULE_OF[syscall]
    if caller.role == PROCESS:
        if rule == OWN_MAILBOX:
            raise PermissionDenied(f"a process receives only from its own mailbox, not pid {pid}'s")
        if rule == ACT and caller.pid not in lineage():
            raise PermissionDenied(f"{syscall}: a process acts only on itself and its descendants; "
                                   f"pid {pid} is neither")
        return
    if rule == OWN_MAILBOX or (port_key is not None and syscall in ("exit", "kill")):  # closing a port
        if port_key is None:
            raise PermissionDenied(f"pid {pid} is a process: only it receives from its mailbox")
        if port_key != caller.key and caller.role != ADMIN:
            raise PermissionDenied(f"port {pid} belongs to the token that opened it")

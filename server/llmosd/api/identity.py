"""Who makes a call: the one place a gRPC call's identity is decided (api/authority.py's Caller).

Every door uses it: the TCP or Unix listener, the agent socket, and the HTTP gateway, which passes
its headers on as the same metadata. The handlers (api/syscalls.py) read the result from CALLER.
"""
from __future__ import annotations

import contextvars
from typing import Any, AsyncIterator, Callable

import grpc

from .authority import ADMIN, PROCESS, READER, SINGLE_USER, TOKEN_ROLES, Caller, process_caller
from .errors import PermissionDenied, Unauthenticated
from .table import ADMIN_RPCS, AGENT_DENIED, AGENT_IDENTITY, READER_RPCS
from ..kernel.kernel import Kernel
from ..kernel.process import PYTHON

TOKEN_HEADER = "llmos-token"  # a Python agent's, on the agent socket
AUTHORIZATION = "authorization"  # a client's: "Bearer TOKEN" (api/tokens.py)

# Who makes the current call (api/authority.py): a client's token identity, or a Python agent.
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=SINGLE_USER)


class Identity:
    """Who makes a call (api/authority.py's Caller), from its metadata, and whether its role may
    make it: the one place a call's identity is decided, for every door (the TCP/Unix listener,
    the agent socket, and the HTTP gateway, which passes its headers on as the same metadata).
    On the agent socket the caller is the agent whose token the call carries, and may act only
    as itself. Elsewhere a call with `authorization: Bearer TOKEN` is that token's namespace and
    role; one without is the owner of `default` in single-user mode, and refused otherwise.
    `client_certificates`: the door verifies client certificates (--tls-client-ca), whose subject
    is then the caller of a call without a token."""

    def __init__(self, k: Kernel, agents: bool, single_user: bool = True, client_certificates: bool = False) -> None:
        self.k = k
        self.agents = agents
        self.single_user = single_user
        self.client_certificates = client_certificates

    def caller_of(self, metadata: Any, auth_context: Callable[[], dict[str, list[bytes]]] | None = None) -> Caller:
        """`auth_context`: the call's (asked only for a call without a token on a door that verifies client
        certificates: it costs more than the rest)."""
        header = TOKEN_HEADER if self.agents else AUTHORIZATION
        given = None
        for key, value in metadata:  # a loop, not a comprehension: one frame fewer on every call
            if key == header:
                given = value
                break
        if self.agents:
            python = self.k.runtimes.get(PYTHON)
            pid = python.pid_of(given) if given is not None and python is not None else None
            proc = self.k.procs.get(pid) if pid is not None else None
            if proc is None:
                raise PermissionDenied("the agent socket needs the llmos-token of a live Python process")
            return process_caller(pid, proc.namespace)
        if given is None:
            names = auth_context().get("x509_common_name") if self.client_certificates and auth_context else None
            if names:  # a client certificate the listener's --tls-client-ca verified
                return _certificate_caller(names[0].decode(errors="replace"))
            if self.single_user:
                return SINGLE_USER
            raise Unauthenticated("this server needs a token: send the metadata authorization: Bearer TOKEN")
        scheme, _, token = given.partition(" ")
        caller = self.k.tokens.caller_of(token.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            raise Unauthenticated("unknown or revoked token (authorization: Bearer TOKEN)")
        return caller

    def check(self, method: str, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        """Set CALLER for the call and return the request, checked (a stream is
        checked message by message)."""
        caller = self.caller_of(ctx.invocation_metadata() or (), ctx.auth_context)
        CALLER.set(caller)
        role = caller.role
        if method in ADMIN_RPCS and role != ADMIN:
            raise PermissionDenied(f"{method} is for admin tokens")
        if role == READER and method not in READER_RPCS:
            raise PermissionDenied(f"a reader token may not call {method}")
        if role != PROCESS:
            return req
        if method in AGENT_DENIED:
            raise PermissionDenied(AGENT_DENIED[method])
        field = AGENT_IDENTITY.get(method)
        if field is None:
            return req
        if hasattr(req, "__aiter__"):
            return self._check_stream(req, field, caller.pid)
        _act_as(req, field, caller.pid)
        return req

    async def _check_stream(self, requests: AsyncIterator[Any], field: str, caller: int) -> AsyncIterator[Any]:
        async for req in requests:
            _act_as(req, field, caller)
            yield req


def _certificate_caller(common_name: str) -> Caller:
    """A client certificate's caller: its subject CN is ROLE@NAMESPACE (docs/authority.md)."""
    role, _, namespace = common_name.partition("@")
    if role not in TOKEN_ROLES or not namespace or not namespace.isprintable():
        raise Unauthenticated(f"a client certificate's subject CN must be ROLE@NAMESPACE (role one of "
                              f"{', '.join(TOKEN_ROLES)}), not {common_name!r}")
    return Caller(namespace, role, key=f"cert:{common_name}")


def _act_as(req: Any, field: str, caller: int) -> None:
    given = getattr(req, field)
    if given == 0:
        setattr(req, field, caller)
    elif given != caller:
        raise PermissionDenied(f"an agent acts only as itself: {field} must be {caller}, not {given}")

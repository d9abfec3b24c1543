"""Durable Python agents (spawn with durable): every syscall an agent makes on the agent socket is
journaled, and answered from the journal while the agent replays after a restart (kernel/journal.py
has the journal, the durability rule and recovery; lua/durable.py does the same for Lua;
docs/durable-agents.md is the user's guide).

An agent's syscalls are RPCs, so the journal sits at the agent socket's door: `agent_handler` wraps
each RPC's handler. For a durable agent a call is first asked of the journal (by its name in the
syscall table and a hash of its request, serialized deterministically): answered from it while the
replay lasts, else made live and journaled with its reply (or its error) when it is answered, which
is also how blocking calls (recv, wait, sleep, lock.acquire) are journaled. The journal's own rule
is kept as lua/durable.py keeps it: a send's and a spawn's entries go in one unit with their effects
(Kernel.send's on_sent, Kernel.spawn's on_spawned), a receive's entry with the removal of the
message from the durable mailbox, a lock release and a signal under the kernel lock (a signal with
the wakes of the durable waiters it chose), and a file change waits for everything journaled before
it (output commit); an append journals the file's size first and a replay that ends on it cuts the
file back. A condition wait is Lua's three entries (`_cond_wait`).

What a Python program could read that differs from run to run is made the same by the agent's
side (python/sandbox/child.py, llmos.userland): its interpreter runs with PYTHONHASHSEED and
`random` seeded from the journal's seed, and time.time() and sys.now() ask the kernel (`Now`, a
call of the agent socket's `llmos.agent.Durable` service), which journals the time.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import grpc
from google.protobuf import message_factory

from llmos.v1 import kernel_pb2 as pb

from ..api import checks as C
from ..api.authority import PROCESS
from ..api.errors import FailedPrecondition, KernelError
from ..api.identity import CALLER, TOKEN_HEADER
from ..api.syscalls import _await
from ..api.table import BY_RPC
from ..kernel import process as P
from ..kernel.journal import REPLAY_DIVERGENCE, Divergence, ProcessJournal, args_hash
from ..kernel.waiting import AsyncWaiter

if TYPE_CHECKING:
    from ..kernel.kernel import Kernel

DURABLE_SERVICE = "llmos.agent.Durable"  # the agent socket's calls beyond llmos.v1.Kernel (Now)
# Not journaled: the end of the process, and streams that never end (not syscalls of llmos.userland).
_NOT_JOURNALED = frozenset(("Exit", "FollowLog", "Events"))
_FILE_CHANGES = frozenset(("WriteFile", "DeleteFile", "RenameFile", "MakeDir"))
_SLEEP_PREFIX = "sleep-"  # llmos.userland's sleep: a Recv nothing can match (its correlation id is random)
_ERRORS = {cls.code: cls for cls in KernelError.__subclasses__()}
_LIVE = object()  # a call that is not answered from the journal


def _journal_of(kernel: Kernel) -> ProcessJournal | None:
    """The journal of the durable agent making the current call (None: not a durable agent)."""
    caller = CALLER.get()
    return kernel.journals.get(caller.pid) if caller.role == PROCESS else None


def _error(e: KernelError) -> tuple[str, str, str]:
    return ("error", e.code, str(e))


def _raise_if_error(answer: Any) -> None:
    if type(answer) is tuple and answer and answer[0] == "error":
        raise _ERRORS.get(answer[1], KernelError)(answer[2])


def _replayed(kernel: Kernel, journal: ProcessJournal, call: str, args: tuple) -> Any:
    """The journal's answer to a call while the agent replays, else _LIVE. A call that diverges
    ends the agent (CRASHED, replay_divergence, naming the call) and fails."""
    if journal.divergence is None:
        if not journal.replaying:
            return _LIVE
        try:
            return journal.replay(call, args)
        except Divergence:
            with kernel.lock:
                proc = kernel.procs.get(journal.pid)
                if proc is not None:
                    kernel.end_locked(proc, P.CRASHED, REPLAY_DIVERGENCE, error=journal.divergence)
    raise FailedPrecondition(journal.divergence)


def _call_of(rpc: str, requests: list[Any]) -> tuple[str, tuple]:
    """A call's name in the journal (the syscall table's, as Lua's entries are named) and its
    arguments: the requests' deterministic serialization (a Struct's keys in order)."""
    req = requests[0] if requests else None
    if rpc == "Recv" and req.correlation_id.startswith(_SLEEP_PREFIX) and not req.ack:
        return "sleep", (req.timeout_ms,)  # its correlation id is random: not an argument of the call
    if rpc == "Acquire":
        name = "lock_try" if req.HasField("timeout_ms") and req.timeout_ms == 0 else "lock_acquire"
    elif rpc == "Release":
        name = "lock_release"
    else:
        name = BY_RPC[rpc].name
    return name, tuple(r.SerializeToString(deterministic=True) for r in requests)


def _lock_of(req: Any) -> tuple[str, str, int]:
    """What a lock call's entry says of its lock (kernel/journal.py's LOCK_CALLS): (name, kind, permits)."""
    if isinstance(req, pb.AcquireRequest) and req.semaphore:
        return req.name, "semaphore", req.semaphore
    return req.name, "mutex", 1


def agent_handler(kernel: Kernel, method: Any, fn: Callable) -> Callable:
    """`fn`, the agent socket's handler of `method`, with a durable agent's calls journaled."""
    rpc = method.name
    if rpc in _NOT_JOURNALED:
        return fn
    reply_of = message_factory.GetMessageClass(method.output_type).FromString
    if method.server_streaming:
        return _streaming(kernel, rpc, fn, reply_of)
    live = _LIVE_CALLS.get(rpc, _plain)

    async def handle(k: Kernel, req: Any) -> Any:
        journal = _journal_of(k)
        if journal is None:
            return await fn(k, req)
        if rpc == "CondWait":
            return await _cond_wait(k, journal, req)
        requests = [r async for r in req] if method.client_streaming else [req]
        call, args = _call_of(rpc, requests)
        if rpc == "WriteFile" and journal.peek() == "fs.write.intent":
            await _redo_append(k, journal, requests, args)
        answer = _replayed(k, journal, call, args)
        if answer is _LIVE:
            return await live(k, journal, fn, call, args, requests, reply_of)
        _raise_if_error(answer)
        if rpc == "Monitor":
            k.monitor_again(journal.pid, requests[0].target)
        if call in ("lock_acquire", "lock_try"):
            answer = answer["reply"] if type(answer) is dict else answer
        elif call == "lock_release":
            answer = b""
        return reply_of(answer)

    return handle


def _streaming(kernel: Kernel, rpc: str, fn: Callable, reply_of: Callable[[bytes], Any]) -> Callable:
    """A server-streaming call (ReadFile, Infer): journaled as its whole list of replies."""
    async def handle(k: Kernel, req: Any) -> AsyncIterator[Any]:
        journal = _journal_of(k)
        if journal is None:
            async for item in fn(k, req):
                yield item
            return
        call, args = _call_of(rpc, [req])
        answer = _replayed(k, journal, call, args)
        if answer is _LIVE:
            items = []
            try:
                async for item in fn(k, req):
                    items.append(item)
            except KernelError as e:
                journal.record(call, args, _error(e))
                raise
            answer = [item.SerializeToString() for item in items]
            journal.record(call, args, answer)
        _raise_if_error(answer)
        for blob in answer:
            yield reply_of(blob)

    return handle


# -- live calls ---------------------------------------------------------------------------------------
async def _plain(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple, requests: list[Any],
                 reply_of: Callable, effects_of: Callable[[Any], list] | None = None) -> Any:
    """Made, then journaled with its reply (a blocking call: when it is answered), and with
    `effects_of(reply)`, its effects on durable state, in one unit."""
    try:
        reply = await fn(k, requests[0])
    except KernelError as e:
        journal.record(call, args, _error(e))
        raise
    journal.record(call, args, reply.SerializeToString(), effects_of(reply) if effects_of is not None else ())
    return reply


async def _recv(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple, requests: list[Any],
                reply_of: Callable) -> Any:
    """A receive's entry and the removal of its messages (one, or a batch's) from the durable mailbox:
    one unit (with ack too: a durable process's message is received once its receive is journaled)."""
    return await _plain(k, journal, fn, call, args, requests, reply_of, lambda reply: [
        op for m in ([reply.message] if reply.HasField("message") else reply.messages)
        for op in journal.received_id(m.id)])


async def _settle(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple, requests: list[Any],
                  reply_of: Callable) -> Any:
    """Ack or Nack of a message whose lease a restart lost: done with (the journal has its receive),
    as lua/durable.py answers it."""
    try:
        reply = await fn(k, requests[0])
    except FailedPrecondition:
        reply = pb.AckResponse()
    except KernelError as e:
        journal.record(call, args, _error(e))
        raise
    journal.record(call, args, reply.SerializeToString())
    return reply


async def _send(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple, requests: list[Any],
                reply_of: Callable) -> Any:
    """The entry goes in one unit with the message's copy (Kernel.send's on_sent)."""
    digest, journaled = args_hash(args), []

    def on_sent(msg: Any) -> list:
        journaled.append(True)
        return journal.entry_ops(call, digest, pb.SendResponse(message_id=msg.id).SerializeToString())

    try:
        reply = await fn(k, requests[0], on_sent=on_sent)
    except KernelError as e:
        if not journaled:  # refused: nothing was sent
            journal.record(call, args, _error(e))
        raise
    if not journaled:  # an idempotency key's first id: nothing new was sent
        journal.record(call, args, reply.SerializeToString())
    return reply


async def _spawn(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple, requests: list[Any],
                 reply_of: Callable) -> Any:
    """The entry goes in one unit with a durable child's spec (Kernel.spawn's on_spawned)."""
    digest = args_hash(args)

    def on_spawned(pid: int) -> list:
        return journal.entry_ops(call, digest, pb.SpawnResponse(pid=pid).SerializeToString())

    try:
        return await fn(k, requests[0], on_spawned=on_spawned)
    except KernelError as e:
        journal.record(call, args, _error(e))
        raise


async def _acquire(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple, requests: list[Any],
                   reply_of: Callable) -> Any:
    """Journaled with its lock, so that a restart gives the agent back the locks it held."""
    try:
        reply = await fn(k, requests[0])
    except KernelError as e:
        journal.record(call, args, _error(e), lock=_lock_of(requests[0]))
        raise
    blob = reply.SerializeToString()
    journal.record(call, args, {"reply": blob} if reply.acquired else blob, lock=_lock_of(requests[0]))
    return reply


async def _under_lock(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple, requests: list[Any],
                      reply_of: Callable) -> Any:
    """A release or a signal, whose effect others see at once: journaled by its handler under the kernel
    lock (api/syscalls.py's `journaled`), so that no entry of theirs that follows from it comes first in
    the journal; a signal's entry with the wakes of the durable waiters it chose, in one unit."""
    lock = _lock_of(requests[0]) if call == "lock_release" else None

    def journaled(reply: Any, woken: list) -> None:
        answer = True if call == "lock_release" else reply.SerializeToString()  # True: a permit given back
        journal.record(call, args, answer, woken, lock=lock)

    try:
        return await fn(k, requests[0], journaled=journaled)
    except KernelError as e:
        journal.record(call, args, _error(e), lock=lock)
        raise


async def _cond_wait(k: Kernel, journal: ProcessJournal, req: pb.CondWaitRequest) -> pb.CondWaitResponse:
    """sys.cond.wait: Lua's three entries (kernel/journal.py's replay_cond_wait): the mutex given back
    (journaled under the kernel lock, before anyone can take it), the wake (journaled by the signal or
    timeout that chose it: its on_woken) and the answer, holding the mutex again. Replayed to where
    its journal ended, the wait goes on live from there: from the start, waiting again holding
    nothing, or queued for the mutex with the journaled wake's answer."""
    args = (req.SerializeToString(deterministic=True),)
    answer, resume = journal.replay_cond_wait(lambda entry: _replayed(k, journal, entry, args))
    if answer is not _LIVE:
        _raise_if_error(answer)
        return pb.CondWaitResponse.FromString(answer["reply"])
    mutex = (req.lock, "mutex", 1)  # the lock note of the entries after the release
    outcome = "cond_wait" if resume is None else "cond_reacquire"  # the entry a refusal is journaled as
    waiter = AsyncWaiter(asyncio.get_running_loop())
    try:
        name, lock_name, timeout_ms = C.arguments("cond.wait", {
            "name": req.name, "lock": req.lock, "timeout_ms": req.timeout_ms if req.HasField("timeout_ms") else None})
        with k.lock:  # (an agent acts as itself: identity.py)
            waiting = k.target_locked(CALLER.get(), "cond.wait", journal.pid, "waiter")
            priority = C.priority(req.priority) if req.HasField("priority") else waiting.priority
            resume = journal.resume_at_wait(resume)
            if type(resume) is dict:
                held = k.sync.cond_reacquire(waiting.namespace, lock_name, journal.pid, priority, waiter, resume)
            else:
                k.sync.cond_wait(waiting.namespace, name, lock_name, journal.pid, priority, waiter,
                                 None if timeout_ms is None else timeout_ms / 1000,
                                 journal.on_woken(args_hash(args)), holding=resume is None)
                held = None
                if resume is None:
                    journal.record("cond_wait", args, True, lock=mutex, cond=name)
                    outcome = "cond_reacquire"
        if held is None:
            # Cancelled (the agent gone) once it held the mutex again: given back, as a plain wait's.
            held = await _await(k, waiter, "cond_wait",
                                lambda got: k.release_lock(journal.pid, lock_name) if isinstance(got, dict) else None)
        if isinstance(held, KernelError):  # the mutex's name became a semaphore's meanwhile
            raise held
    except KernelError as e:
        journal.record(outcome, args, _error(e), lock=mutex if outcome == "cond_reacquire" else None)
        raise
    reply = pb.CondWaitResponse(signalled=held["signalled"], timed_out=held["timed_out"],
                                previous_holder_died=held.get("previous_holder_died") or 0)
    journal.record("cond_reacquire", args, {"reply": reply.SerializeToString()}, lock=mutex)
    return reply


async def _file_change(k: Kernel, journal: ProcessJournal, fn: Callable, call: str, args: tuple,
                       requests: list[Any], reply_of: Callable) -> Any:
    """Output commit: what this change follows is durable before the tree shows it. An append first
    journals the file's size (an intent a replay that ends on it cuts the file back to), unless its
    intent is the journal's last entry already (_redo_append)."""
    if call == "fs.write":
        first = requests[0] if requests else None
        if first is not None and first.append and not (journal.entries and journal.entries[-1][0] == "fs.write.intent"):
            size = await asyncio.to_thread(k.files.size_before_append, CALLER.get().namespace, first.path)
            if size is not None:
                journal.record("fs.write.intent", args, size)
        requests = [_requests(requests)]  # the handler reads a stream
    await asyncio.to_thread(journal.commit)  # (a wait for the store's writer: not on the loop)
    return await _plain(k, journal, fn, call, args, requests, reply_of)


async def _requests(requests: list[Any]) -> AsyncIterator[Any]:
    for req in requests:
        yield req


async def _redo_append(k: Kernel, journal: ProcessJournal, requests: list[Any], args: tuple) -> None:
    """An append that may have happened or not (its intent is journaled, its result is not): the
    file is cut back to its size before it, and the append is made again, once."""
    size = _replayed(k, journal, "fs.write.intent", args)
    if journal.replaying:
        return  # the append's own entry follows: it was made
    await asyncio.to_thread(k.files.cut_back, CALLER.get().namespace, journal.pid, requests[0].path, size)


_LIVE_CALLS: dict[str, Callable] = {
    "Recv": _recv, "Send": _send, "Ack": _settle, "Nack": _settle, "Spawn": _spawn, "Acquire": _acquire,
    "Release": _under_lock, "CondSignal": _under_lock, "CondBroadcast": _under_lock,
    **{rpc: _file_change for rpc in _FILE_CHANGES},
}


# -- the agent socket's llmos.agent.Durable service -----------------------------------------------
def durable_service(kernel: Kernel, pid_of: Callable[[str], int | None]) -> grpc.GenericRpcHandler:
    """`Now`: the time for a durable agent's time.time() and sys.now(), journaled (ms since the
    epoch, as a decimal string; a non-durable agent's clock is its own)."""
    async def now(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        tokens = [v for key, v in ctx.invocation_metadata() or () if key == TOKEN_HEADER]
        pid = pid_of(tokens[0]) if tokens else None
        journal = kernel.journals.get(pid) if pid is not None else None
        if journal is None:
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "Now is for durable Python agents")
        try:
            answer = _replayed(kernel, journal, "now", ())
        except KernelError as e:
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if answer is _LIVE:
            answer = time.time() * 1000.0
            journal.record("now", (), answer)
        return repr(answer).encode()

    return grpc.method_handlers_generic_handler(DURABLE_SERVICE, {"Now": grpc.unary_unary_rpc_method_handler(now)})

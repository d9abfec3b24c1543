"""The gRPC end of the syscall table (table.py): the thin handler behind every RPC of llmos.v1.Kernel.

Handlers take the kernel and the request, check and convert arguments, call
the kernel, and convert the answer; the calling agent, if any, is CALLER.
Kernel errors become gRPC statuses here and nowhere else. Handlers run on the
server's asyncio loop; a syscall that blocks (Recv, Wait, Infer) awaits a
future, so a thousand blocked clients hold no thread.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value

from . import checks as C
from .table import AGENT_DENIED, AGENT_IDENTITY, BY_RPC
from .errors import InvalidArgument, KernelError, PermissionDenied, ResourceExhausted, Unimplemented
from ..kernel.deadletters import DeadLetter, check_purge
from ..kernel.kernel import RESULT_IN_STORE, Kernel, SpawnSpec
from ..kernel.process import PYTHON
from ..kernel.mailbox import Match, Message
from ..kernel.store import ProcessRecord, now_ms
from ..kernel.waiting import TIMED_OUT, AsyncWaiter

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Kernel"]
EVENT_BACKLOG = 10_000
FILE_CHUNK_BYTES = 1 << 20
DEFAULT_NAMESPACE = "default"  # external clients' namespace, until tokens map clients to namespaces
TOKEN_HEADER = "llmos-token"

# The pid of the Python agent making the current call (None: an external client).
CALLER: contextvars.ContextVar[int | None] = contextvars.ContextVar("caller", default=None)
# The current call's gRPC context.
CALL: contextvars.ContextVar[grpc.aio.ServicerContext] = contextvars.ContextVar("call")

# -- conversions --------------------------------------------------------------------------
def _value(v: Any) -> Any:
    return from_value(v) if v is not None else None


def _enum_name(enum: Any, number: int, field: str) -> str:
    try:
        return enum.Name(number)
    except ValueError:
        raise InvalidArgument(f"{field}: {number} is not a value of {enum.DESCRIPTOR.name}") from None


def message_pb(msg: Message, attempt: int = 0) -> pb.Message:
    """`attempt`: set for a message received with ack (kernel/acks.py)."""
    out = pb.Message(id=msg.id, to=msg.to, tag=msg.tag, data=msg.data, correlation_id=msg.correlation_id,
                     sent_at_ms=msg.sent_at_ms, body=to_value(msg.body), attempt=attempt, redelivered=attempt > 1)
    setattr(out, "from", msg.sender)
    return out


def process_pb(rec: ProcessRecord, blocked_on: str | None = None) -> pb.ProcessInfo:
    info = pb.ProcessInfo(
        pid=rec.pid, name=rec.name or "", parent=rec.parent, kind=pb.ProcessKind.Value(rec.kind),
        state=pb.ProcessState.Value(rec.state), priority=rec.priority, weight=rec.weight,
        limits=pb.Limits(**rec.limits),
        exit_reason=rec.exit_reason or "", error=rec.error or "", started_at_ms=rec.started_at_ms,
        ended_at_ms=rec.ended_at_ms or 0, blocked_on=blocked_on or "", namespace=rec.namespace,
    )
    if rec.usage is not None:
        info.usage.CopyFrom(pb.Usage(**rec.usage))
    if rec.result is RESULT_IN_STORE:
        info.result_left_out = True
    elif rec.ended_at_ms:
        info.result.CopyFrom(to_value(rec.result))
    return info


def _timeout(req: Any) -> float | None:
    """The request's timeout_ms in seconds (unset: None, no limit); see checks.duration_ms."""
    return C.timeout_s(req.timeout_ms, "timeout_ms") if req.HasField("timeout_ms") else None


def _pid(value: int, field: str = "pid") -> int:
    return C.pid(value, field)


async def _await(kernel: Kernel, waiter: AsyncWaiter, syscall: str,
                 on_cancel: Callable[[Any], None] | None = None) -> Any:
    """Wait for a registered waiter; if the client goes away, undo the wait.
    A Python agent waiting gives up its CPU meanwhile."""
    caller = CALLER.get()
    if caller is not None:
        kernel.runtimes[PYTHON].blocking(caller, syscall)
    try:
        return await waiter.future
    except asyncio.CancelledError:
        with kernel.lock:
            taken = waiter.done
            waiter.abandon()
        if taken and on_cancel is not None and waiter.value is not TIMED_OUT:
            on_cancel(waiter.value)
        raise
    finally:
        if caller is not None:
            kernel.runtimes[PYTHON].resumed(caller)


# -- handlers -------------------------------------------------------------------------------
async def sys_spawn(k: Kernel, req: pb.SpawnRequest) -> pb.SpawnResponse:
    which = req.WhichOneof("program")
    if which is None:
        raise InvalidArgument("program is required: set lua (source), python (source) or path")
    spec = SpawnSpec(
        args=_value(req.args) if req.HasField("args") else None, name=req.name or None, priority=req.priority,
        weight=req.weight, limits=C.limits({f.name: v for f, v in req.limits.ListFields()}),
        parent=req.parent, monitor=req.monitor, source_name=req.source_name or None,
        dead_letter=req.dead_letter, max_attempts=req.max_attempts,
    )
    setattr(spec, which, getattr(req, which))
    return pb.SpawnResponse(pid=k.spawn(spec))


async def sys_send(k: Kernel, req: pb.SendRequest) -> pb.SendResponse:
    target = req.WhichOneof("target")
    if target is None or (target == "to" and req.to == 0) or (target == "to_name" and not req.to_name):
        raise InvalidArgument("a receiver is required: set to (a pid) or to_name (a registered name)")
    body = _value(req.body) if req.HasField("body") else None
    message_id = k.send(getattr(req, "from"), getattr(req, target), req.tag, body, req.data, req.correlation_id,
                        req.notify_undelivered, req.idempotency_key)
    return pb.SendResponse(message_id=message_id)


async def sys_recv(k: Kernel, req: pb.RecvRequest) -> pb.RecvResponse:
    pid = _pid(req.pid)
    match = Match(
        getattr(req, "from") if req.HasField("from") else None,
        req.tag if req.HasField("tag") else None,
        req.correlation_id if req.HasField("correlation_id") else None,
    )
    if req.ack:
        return await _recv_leased(k, pid, match, req)
    if req.HasField("lease_ms"):
        raise InvalidArgument("lease_ms is for a Recv with ack")
    waiter = AsyncWaiter(asyncio.get_running_loop())
    msg = k.recv(pid, match, waiter, _timeout(req))
    if msg is None:
        msg = await _await(k, waiter, "recv", lambda taken: k.put_back(pid, taken))
        if msg is TIMED_OUT:
            return pb.RecvResponse(timed_out=True)
    try:
        return pb.RecvResponse(message=message_pb(msg))
    except Exception:  # a message that cannot be answered is a kernel bug, but it is never lost for it
        k.put_back(pid, msg)
        raise


async def _recv_leased(k: Kernel, pid: int, match: Match, req: pb.RecvRequest) -> pb.RecvResponse:
    lease_s = C.timeout_s(req.lease_ms, "lease_ms") if req.HasField("lease_ms") else None
    timeout = _timeout(req)
    waiter = AsyncWaiter(asyncio.get_running_loop())
    with k.lock:
        receiver = k.procs.get(pid) or k.live_locked(pid, "receiver")
        leased = k.acks.recv_locked(receiver, match, waiter, timeout, lease_s)
    if leased is None:
        leased = await _await(k, waiter, "recv", lambda taken: _give_back(k, pid, taken))
        if leased is TIMED_OUT:
            return pb.RecvResponse(timed_out=True)
    try:
        return pb.RecvResponse(message=message_pb(leased.msg, leased.attempt))
    except Exception:  # never lost for a kernel bug: it is delivered again
        _give_back(k, pid, leased)
        raise


def _give_back(k: Kernel, pid: int, leased: Any) -> None:
    with k.lock:
        k.acks.give_back(pid, leased)


async def sys_ack(k: Kernel, req: pb.AckRequest) -> pb.AckResponse:
    pid, message_id = _pid(req.pid), C.message_id(req.message_id)
    with k.lock:
        k.live_locked(pid, "receiver")
        k.acks.ack(pid, message_id)
    return pb.AckResponse()


async def sys_nack(k: Kernel, req: pb.AckRequest) -> pb.AckResponse:
    pid, message_id = _pid(req.pid), C.message_id(req.message_id)
    with k.lock:
        k.live_locked(pid, "receiver")
        k.acks.nack(pid, message_id)
    return pb.AckResponse()


async def sys_wait(k: Kernel, req: pb.WaitRequest) -> pb.WaitResponse:
    waiter = AsyncWaiter(asyncio.get_running_loop())
    rec = k.wait(_pid(req.pid), waiter, _timeout(req))
    if rec is None:
        rec = await _await(k, waiter, "wait")
        if rec is TIMED_OUT:
            return pb.WaitResponse(timed_out=True)
    return pb.WaitResponse(process=process_pb(rec))


async def sys_kill(k: Kernel, req: pb.KillRequest) -> pb.KillResponse:
    return pb.KillResponse(already_ended=not k.kill(_pid(req.pid), req.reason or "killed"))


async def sys_exit(k: Kernel, req: pb.ExitRequest) -> pb.ExitResponse:
    k.exit(_pid(req.pid), _value(req.result) if req.HasField("result") else None)
    return pb.ExitResponse()


async def sys_open_port(k: Kernel, req: pb.OpenPortRequest) -> pb.OpenPortResponse:
    return pb.OpenPortResponse(pid=k.open_port(req.name or None, req.mailbox, req.dead_letter, req.max_attempts))


async def sys_register(k: Kernel, req: pb.RegisterRequest) -> pb.RegisterResponse:
    k.register(_pid(req.pid), req.name)
    return pb.RegisterResponse()


async def sys_monitor(k: Kernel, req: pb.MonitorRequest) -> pb.MonitorResponse:
    k.monitor(_pid(req.watcher, "watcher"), _pid(req.target, "target"))
    return pb.MonitorResponse()


async def sys_set_priority(k: Kernel, req: pb.SetPriorityRequest) -> pb.SetPriorityResponse:
    k.set_priority(_pid(req.pid), req.priority, req.weight, caller=CALLER.get())
    return pb.SetPriorityResponse()


async def sys_read_log(k: Kernel, req: pb.ReadLogRequest) -> pb.ReadLogResponse:
    lines, next_offset, dropped = k.read_log(_pid(req.pid), req.offset)
    return pb.ReadLogResponse(lines=lines, next_offset=next_offset, dropped=dropped)


LIST_PAGE_SIZE = 1000  # processes in a ListProcesses page when the request names no size
MAX_LIST_PAGE_SIZE = 10_000
LIST_PAGE_BYTES = 1 << 20  # a page ends early rather than grow past this (any reply must fit a client)


async def sys_list(k: Kernel, req: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
    states = {_enum_name(pb.ProcessState, s, "states") for s in req.states}
    if req.page_size > MAX_LIST_PAGE_SIZE:
        raise InvalidArgument(f"page_size is at most {MAX_LIST_PAGE_SIZE}")
    size = req.page_size or LIST_PAGE_SIZE
    found = k.list(states, req.name or None, req.parent, req.include_ended, req.after_pid)
    reply, used = pb.ListProcessesResponse(), 0
    for entry in found[:size]:
        info = process_pb(*entry)
        used += info.ByteSize()
        if used > LIST_PAGE_BYTES and reply.processes:
            break
        reply.processes.append(info)
    if len(reply.processes) < len(found):
        reply.next_after_pid = reply.processes[-1].pid
    return reply


# -- the dead-letter queue (kernel/deadletters.py) ----------------------------------------------
def _namespace(k: Kernel) -> str:
    """The caller's namespace: an agent's own, an external client's DEFAULT_NAMESPACE."""
    caller = CALLER.get()
    if caller is None:
        return DEFAULT_NAMESPACE
    with k.lock:
        return k.live_locked(caller, "caller").namespace


def dead_letter_pb(dead: DeadLetter) -> pb.DeadLetter:
    return pb.DeadLetter(id=dead.id, message=message_pb(dead.message), reason=dead.reason, attempts=dead.attempts,
                         receiver=dead.receiver, dead_at_ms=dead.dead_at_ms, detail=dead.detail,
                         namespace=dead.namespace)


async def sys_list_dead_letters(k: Kernel, req: pb.ListDeadLettersRequest) -> pb.ListDeadLettersResponse:
    if req.page_size > MAX_LIST_PAGE_SIZE:
        raise InvalidArgument(f"page_size is at most {MAX_LIST_PAGE_SIZE}")
    size = req.page_size or LIST_PAGE_SIZE
    namespace = _namespace(k)
    receiver = C.pid(req.receiver, "receiver") if req.receiver else 0
    after_id = min(req.after_id, C.MAX_PID)  # no id is above it (and SQLite's integers end at 2^63)
    found = await asyncio.to_thread(k.dead_letters.list, namespace, after_id, size + 1, receiver)
    reply, used = pb.ListDeadLettersResponse(), 0
    for dead in found[:size]:
        entry = dead_letter_pb(dead)
        used += entry.ByteSize()
        if used > LIST_PAGE_BYTES and reply.dead_letters:
            break
        reply.dead_letters.append(entry)
    if len(reply.dead_letters) < len(found):
        reply.next_after_id = reply.dead_letters[-1].id
    with k.lock:
        reply.total, reply.dropped = k.dead_letters.count(namespace), k.dead_letters.dropped.get(namespace, 0)
    return reply


async def sys_get_dead_letter(k: Kernel, req: pb.GetDeadLetterRequest) -> pb.DeadLetter:
    return dead_letter_pb(await asyncio.to_thread(k.dead_letters.get, _namespace(k), req.id))


async def sys_retry_dead_letter(k: Kernel, req: pb.RetryDeadLetterRequest) -> pb.RetryDeadLetterResponse:
    target = req.WhichOneof("target")
    if (target == "to" and req.to == 0) or (target == "to_name" and not req.to_name):
        raise InvalidArgument("to (a pid) or to_name (a registered name) is empty: leave both unset for the "
                              "message's own receiver")
    dead = await asyncio.to_thread(k.dead_letters.get, _namespace(k), req.id)
    with k.lock:
        to = k.resolve(getattr(req, target)) if target else k.live_locked(dead.receiver, "receiver")
        message_id = k.dead_letters.retry_locked(dead, to)
    return pb.RetryDeadLetterResponse(message_id=message_id)


async def sys_purge_dead_letters(k: Kernel, req: pb.PurgeDeadLettersRequest) -> pb.PurgeDeadLettersResponse:
    ids = [C.message_id(i, "ids") for i in req.ids]
    check_purge(ids, req.all, req.before_ms)
    namespace = _namespace(k)
    with k.lock:
        if ids:
            purged = k.dead_letters.forget_locked(namespace, ids)
        else:
            purged = k.dead_letters.purge_locked(namespace, req.before_ms)
    return pb.PurgeDeadLettersResponse(purged=purged)


async def sys_get(k: Kernel, req: pb.GetProcessRequest) -> pb.ProcessInfo:
    return process_pb(*k.get(_pid(req.pid)))


async def sys_events(k: Kernel, req: pb.EventsRequest) -> AsyncIterator[pb.Event]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def listener(kind: str, rec: ProcessRecord) -> None:  # kernel lock held: only hand over
        if not req.pid or rec.pid == req.pid:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, rec, now_ms()))

    with k.lock:
        k.event_listeners.append(listener)
    try:
        # Tells the client that every later event will reach it.
        yield pb.Event(kind="subscribed", at_ms=now_ms())
        while True:
            if queue.qsize() > EVENT_BACKLOG:
                raise ResourceExhausted(f"event stream fell more than {EVENT_BACKLOG} events behind")
            kind, rec, at = await queue.get()
            yield pb.Event(kind=kind, process=process_pb(rec), at_ms=at)
    finally:
        with k.lock:
            k.event_listeners.remove(listener)


# -- files: disk I/O runs in a thread, never on the loop or under the kernel lock --------------
def file_pb(info: Any) -> pb.FileInfo:
    return pb.FileInfo(path=info.path, size=info.size, is_dir=info.is_dir, modified_ms=info.modified_ms)


async def sys_write_file(k: Kernel, requests: AsyncIterator[pb.WriteFileRequest]) -> pb.FileInfo:
    writer = None
    try:
        async for req in requests:
            if writer is None:
                if req.pid:
                    k.get(req.pid)  # NotFound for an unknown pid
                writer = await asyncio.to_thread(k.files.open_writer, DEFAULT_NAMESPACE, req.pid, req.path, req.append)
            if req.data:
                await asyncio.to_thread(writer.write, req.data)
        if writer is None:
            raise InvalidArgument("WriteFile needs at least one message (with the path)")
        # A client that cancels can look like one that finished: grpc.aio ends
        # the request stream either way, and tells the handler of a cancel
        # only later. Any operation on the call fails once it is cancelled,
        # so this one, before the file is committed, keeps a failed write out.
        try:
            await CALL.get().send_initial_metadata(())
        except Exception:  # the call is cancelled: nobody is there to answer
            raise asyncio.CancelledError() from None
        info = await asyncio.to_thread(writer.close)
        writer = None
        return file_pb(info)
    finally:
        if writer is not None:  # the stream failed or was cancelled: nothing appears
            writer.abort()


async def sys_read_file(k: Kernel, req: pb.ReadFileRequest) -> AsyncIterator[pb.FileChunk]:
    reader = await asyncio.to_thread(
        k.files.open_reader, DEFAULT_NAMESPACE, req.path, req.offset, req.length or None, FILE_CHUNK_BYTES,
    )
    try:
        offset = req.offset
        while True:
            chunk = await asyncio.to_thread(next, reader, b"")
            if not chunk:
                break
            yield pb.FileChunk(data=chunk, offset=offset)
            offset += len(chunk)
    finally:
        reader.close()


async def sys_stat_file(k: Kernel, req: pb.FilePath) -> pb.FileInfo:
    return file_pb(await asyncio.to_thread(k.files.stat, DEFAULT_NAMESPACE, req.path))


async def sys_list_files(k: Kernel, req: pb.FilePath) -> pb.ListFilesResponse:
    entries = await asyncio.to_thread(k.files.list, DEFAULT_NAMESPACE, req.path)
    return pb.ListFilesResponse(entries=[file_pb(e) for e in entries])


async def sys_delete_file(k: Kernel, req: pb.FilePath) -> pb.DeleteFileResponse:
    await asyncio.to_thread(k.files.delete, DEFAULT_NAMESPACE, req.path)
    return pb.DeleteFileResponse()


async def sys_rename_file(k: Kernel, req: pb.RenameFileRequest) -> pb.FileInfo:
    return file_pb(await asyncio.to_thread(k.files.rename, DEFAULT_NAMESPACE, req.from_path, req.to_path))


async def sys_make_dir(k: Kernel, req: pb.FilePath) -> pb.FileInfo:
    return file_pb(await asyncio.to_thread(k.files.mkdir, DEFAULT_NAMESPACE, req.path))


# -- locks ----------------------------------------------------------------------------------------
async def sys_acquire(k: Kernel, req: pb.AcquireRequest) -> pb.AcquireResponse:
    pid = _pid(req.pid)
    kind, permits = ("semaphore", req.semaphore) if req.semaphore else ("mutex", 1)
    timeout = _timeout(req)
    waiter = AsyncWaiter(asyncio.get_running_loop())
    with k.lock:
        holder = k.procs.get(pid) or k.live_locked(pid, "holder")
        priority = C.priority(req.priority) if req.HasField("priority") else holder.priority
        if timeout == 0:
            answer = k.sync.try_acquire(holder.namespace, req.name, pid, kind, permits)
            if answer is None:
                return pb.AcquireResponse(timed_out=True)
        else:
            answer = k.sync.acquire(holder.namespace, req.name, pid, priority, waiter, timeout, kind, permits)
    if answer is None:
        answer = await _await(k, waiter, "lock", lambda _: k.release_lock(pid, req.name))
        if answer is TIMED_OUT:
            return pb.AcquireResponse(timed_out=True)
    return pb.AcquireResponse(acquired=True, previous_holder_died=answer.get("previous_holder_died") or 0)


async def sys_release(k: Kernel, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
    k.release_lock(_pid(req.pid), req.name)
    return pb.ReleaseResponse()


async def sys_cond_wait(k: Kernel, req: pb.CondWaitRequest) -> pb.CondWaitResponse:
    pid = _pid(req.pid)
    timeout = _timeout(req)
    waiter = AsyncWaiter(asyncio.get_running_loop())
    with k.lock:
        waiting = k.procs.get(pid) or k.live_locked(pid, "waiter")
        priority = C.priority(req.priority) if req.HasField("priority") else waiting.priority
        k.sync.cond_wait(waiting.namespace, req.name, req.lock, pid, priority, waiter, timeout)
    # A call cancelled after it held the mutex again gives it back; one cancelled before leaves it free.
    answer = await _await(k, waiter, "cond_wait",
                          lambda held: k.release_lock(pid, req.lock) if isinstance(held, dict) else None)
    if isinstance(answer, KernelError):
        raise answer
    return pb.CondWaitResponse(signalled=answer["signalled"], timed_out=answer["timed_out"],
                               previous_holder_died=answer.get("previous_holder_died") or 0)


def _cond_namespace(k: Kernel, pid: int) -> str:
    """A signaller's namespace: its own, or an external client's (pid 0)."""
    return k.live_locked(C.pid(pid), "signaller").namespace if pid else DEFAULT_NAMESPACE


async def sys_cond_signal(k: Kernel, req: pb.CondSignalRequest) -> pb.CondSignalResponse:
    with k.lock:
        return pb.CondSignalResponse(woken=k.sync.cond_signal(_cond_namespace(k, req.pid), req.name))


async def sys_cond_broadcast(k: Kernel, req: pb.CondSignalRequest) -> pb.CondSignalResponse:
    with k.lock:
        return pb.CondSignalResponse(woken=k.sync.cond_broadcast(_cond_namespace(k, req.pid), req.name))


async def sys_infer(k: Kernel, req: pb.InferRequest) -> AsyncIterator[pb.InferChunk]:
    if k.inference is None:
        raise Unimplemented("this server runs no inference engine (start llmosd with --model)")
    caller = CALLER.get()
    if caller is not None:
        k.runtimes[PYTHON].blocking(caller, "infer")
    try:
        async for chunk in k.inference.infer_rpc(req):
            yield chunk
    finally:
        if caller is not None:
            k.runtimes[PYTHON].resumed(caller)


def _inference(k: Kernel) -> Any:
    if k.inference is None:
        raise Unimplemented("this server runs no inference engine (start llmosd with --model)")
    return k.inference


async def sys_create_context(k: Kernel, req: pb.CreateContextRequest) -> pb.ContextInfo:
    caller = CALLER.get()
    if caller is not None:
        k.runtimes[PYTHON].blocking(caller, "infer")
    try:
        return await _inference(k).create_context_rpc(req)
    finally:
        if caller is not None:
            k.runtimes[PYTHON].resumed(caller)


async def sys_fork_context(k: Kernel, req: pb.ForkContextRequest) -> pb.ContextInfo:
    return await _inference(k).fork_context_rpc(req)


async def sys_drop_context(k: Kernel, req: pb.DropContextRequest) -> pb.DropContextResponse:
    _inference(k).drop_context(_pid(req.pid), req.context_id)
    return pb.DropContextResponse()


# The handler of each RPC: exactly the table's `rpc`s (and the .proto's methods).
SYSCALLS: dict[str, Callable[..., Any]] = {
    "Spawn": sys_spawn,
    "Send": sys_send,
    "Recv": sys_recv,
    "Ack": sys_ack,
    "Nack": sys_nack,
    "Wait": sys_wait,
    "Infer": sys_infer,
    "CreateContext": sys_create_context,
    "ForkContext": sys_fork_context,
    "DropContext": sys_drop_context,
    "Kill": sys_kill,
    "Exit": sys_exit,
    "OpenPort": sys_open_port,
    "Register": sys_register,
    "Monitor": sys_monitor,
    "SetPriority": sys_set_priority,
    "ReadLog": sys_read_log,
    "ListProcesses": sys_list,
    "GetProcess": sys_get,
    "Events": sys_events,
    "WriteFile": sys_write_file,
    "ReadFile": sys_read_file,
    "StatFile": sys_stat_file,
    "ListFiles": sys_list_files,
    "DeleteFile": sys_delete_file,
    "RenameFile": sys_rename_file,
    "MakeDir": sys_make_dir,
    "Acquire": sys_acquire,
    "Release": sys_release,
    "CondWait": sys_cond_wait,
    "CondSignal": sys_cond_signal,
    "CondBroadcast": sys_cond_broadcast,
    "ListDeadLetters": sys_list_dead_letters,
    "GetDeadLetter": sys_get_dead_letter,
    "RetryDeadLetter": sys_retry_dead_letter,
    "PurgeDeadLetters": sys_purge_dead_letters,
}


# -- wiring into grpc -------------------------------------------------------------------------
MAX_STATUS_BYTES = 2048  # an error's whole text, in UTF-8: any status must fit in gRPC's trailers


def status_text(text: str) -> str:
    """`text`, cut so that it and the note saying so fit in MAX_STATUS_BYTES of UTF-8."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_STATUS_BYTES:
        return text
    note = f" ... [{len(raw)} bytes, cut]"
    return raw[: MAX_STATUS_BYTES - len(note)].decode("utf-8", "ignore") + note


async def _abort(ctx: grpc.aio.ServicerContext, method: str, err: Exception) -> None:
    """Answer a failed call: a kernel error with its status and (cut) text; anything else is a
    kernel bug, logged, and answered INTERNAL."""
    if isinstance(err, KernelError):
        code, text = getattr(grpc.StatusCode, err.code), str(err)
    else:
        log.exception("%s failed", method, exc_info=err)
        code, text = grpc.StatusCode.INTERNAL, f"kernel error in {method} (logged by the server): {err!r}"
    await ctx.abort(code, status_text(text))


class Identity:
    """Who may make a call. On the agent socket, the caller is the agent whose
    token the call carries, and may act only as itself."""

    def __init__(self, k: Kernel, agents: bool) -> None:
        self.k = k
        self.agents = agents

    def check(self, method: str, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        """Set CALLER for the call and return the request, checked (a stream is
        checked message by message)."""
        if not self.agents:
            CALLER.set(None)
            return req
        tokens = [v for key, v in ctx.invocation_metadata() or () if key == TOKEN_HEADER]
        python = self.k.runtimes.get(PYTHON)
        caller = python.pid_of(tokens[0]) if tokens and python is not None else None
        if caller is None:
            raise PermissionDenied("the agent socket needs the llmos-token of a live Python process")
        CALLER.set(caller)
        if method in AGENT_DENIED:
            raise PermissionDenied(AGENT_DENIED[method])
        field = AGENT_IDENTITY.get(method)
        if field is None:
            return req
        if hasattr(req, "__aiter__"):
            return self._check_stream(req, field, caller)
        _act_as(req, field, caller)
        return req

    async def _check_stream(self, requests: AsyncIterator[Any], field: str, caller: int) -> AsyncIterator[Any]:
        async for req in requests:
            _act_as(req, field, caller)
            yield req


def _act_as(req: Any, field: str, caller: int) -> None:
    given = getattr(req, field)
    if given == 0:
        setattr(req, field, caller)
    elif given != caller:
        raise PermissionDenied(f"an agent acts only as itself: {field} must be {caller}, not {given}")


def _decode(request: type[ProtoMessage], raw: bytes) -> ProtoMessage:
    """A request from its wire bytes. gRPC would answer UNKNOWN (and log a traceback) for bytes
    that do not decode, so the handlers decode: malformed protobuf, invalid UTF-8 in a string
    field, nesting past the parser's depth limit are INVALID_ARGUMENT."""
    try:
        return request.FromString(raw)
    except DecodeError as e:
        raise InvalidArgument(f"the request does not decode as {request.DESCRIPTOR.full_name}: {e}") from None


async def _decode_stream(request: type[ProtoMessage], raws: AsyncIterator[bytes]) -> AsyncIterator[ProtoMessage]:
    async for raw in raws:
        yield _decode(request, raw)


def _unary(identity: Identity, method: str, request: type[ProtoMessage], fn: Callable[..., Awaitable[Any]]) -> Callable:
    async def handle(raw: Any, ctx: grpc.aio.ServicerContext) -> Any:
        CALL.set(ctx)
        try:
            req = _decode_stream(request, raw) if hasattr(raw, "__aiter__") else _decode(request, raw)
            return await fn(identity.k, identity.check(method, req, ctx))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort(ctx, method, e)

    return handle


def _stream(identity: Identity, method: str, request: type[ProtoMessage], fn: Callable[..., AsyncIterator[Any]]) -> Callable:
    async def handle(raw: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(identity.k, identity.check(method, _decode(request, raw), ctx)):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort(ctx, method, e)

    return handle


def kernel_service(k: Kernel, agents: bool = False) -> grpc.GenericRpcHandler:
    """The llmos.v1.Kernel service as a gRPC handler, built from SYSCALLS.
    With `agents`, calls must carry an agent's token and act only as it."""
    identity = Identity(k, agents)
    declared = {m.name for m in SERVICE.methods}
    if not declared == set(SYSCALLS) == set(BY_RPC):
        raise RuntimeError(f"syscall table, handlers and .proto disagree: {sorted(declared ^ set(SYSCALLS) | declared ^ set(BY_RPC))}")
    handlers = {}
    for method in SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kwargs = dict(response_serializer=response.SerializeToString)  # requests: see _decode
        fn = SYSCALLS[method.name]
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_stream(identity, method.name, request, fn), **kwargs)
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(_unary(identity, method.name, request, fn), **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(identity, method.name, request, fn), **kwargs)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

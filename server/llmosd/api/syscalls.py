"""The gRPC end of the syscall table (table.py): the thin handler behind every RPC of llmos.v1.Kernel.

Handlers take the kernel and the request, check and convert arguments, call
the kernel, and convert the answer; the caller is CALLER (identity.py).
What every door does around a handler (decoding, statuses, metrics, audit) is doors.py's. Handlers run on the
server's asyncio loop; a syscall that blocks (Recv, Wait, Infer) awaits a
future, so a thousand blocked clients hold no thread.

Why one file: it is the table's RPC end, one short handler per RPC in the order of the .proto, and
SYSCALLS at its end is checked against the table and the .proto as one set (doors.kernel_service).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from typing import Any, AsyncIterator, Callable

import grpc

from llmos.v1 import kernel_pb2 as pb
from llmos.values import fill_value, from_value

from . import checks as C
from .authority import PROCESS, Caller
from .identity import CALLER
from .errors import InvalidArgument, KernelError, PermissionDenied, ResourceExhausted, Unimplemented
from .dead_letter_syscalls import (sys_get_dead_letter, sys_list_dead_letters, sys_purge_dead_letters,
                                   sys_retry_dead_letter)
from .replies import THREAD_BYTES, add_messages, built, fill_message, fill_page, off_loop, page_size
from .tokens import digest
from ..kernel.kernel import RESULT_IN_STORE, Kernel, SpawnSpec, value_fits
from ..kernel.process import PYTHON
from ..kernel.mailbox import ANY, Match
from ..kernel.store import ProcessRecord, now_ms
from ..kernel.waiting import TIMED_OUT, AsyncWaiter

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Kernel"]
EVENT_BACKLOG = 10_000
FILE_CHUNK_BYTES = 1 << 20
MAX_BATCH = 1000  # messages in one SendBatch, Recv (max_messages), Ack or Nack (message_ids)
BATCH_OPTIONS = ("tag", "data", "correlation_id", "notify_undelivered", "idempotency_key")  # a BatchMessage's
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


async def _process_reply(rec: ProcessRecord, blocked_on: str | None = None,
                         info: pb.ProcessInfo | None = None) -> pb.ProcessInfo:
    """process_pb, for a reply (into `info`, a field of it, if given): an ended process's result may be
    as big as a message (see THREAD_BYTES)."""
    if rec.ended_at_ms and rec.result is not RESULT_IN_STORE and not value_fits(rec.result, THREAD_BYTES):
        return await off_loop(process_pb, rec, blocked_on, info)
    return process_pb(rec, blocked_on, info)


def process_pb(rec: ProcessRecord, blocked_on: str | None = None, info: pb.ProcessInfo | None = None) -> pb.ProcessInfo:
    """`rec` as a ProcessInfo: set in `info` if given (a field of a reply: built in place, as
    replies.fill_message says why), else a new one."""
    if info is None:
        info = pb.ProcessInfo()
    info.pid, info.name, info.parent = rec.pid, rec.name or "", rec.parent
    info.kind, info.state = pb.ProcessKind.Value(rec.kind), pb.ProcessState.Value(rec.state)
    info.priority, info.weight, info.namespace = rec.priority, rec.weight, rec.namespace
    info.exit_reason, info.error = rec.exit_reason or "", rec.error or ""
    info.started_at_ms, info.ended_at_ms, info.blocked_on = rec.started_at_ms, rec.ended_at_ms or 0, blocked_on or ""
    info.limits.CopyFrom(pb.Limits(**rec.limits))
    if rec.usage is not None:
        info.usage.CopyFrom(pb.Usage(**rec.usage))
    if rec.result is RESULT_IN_STORE:
        info.result_left_out = True
    elif rec.ended_at_ms:
        fill_value(info.result, rec.result)
    return info


def _set(req: Any, field: str) -> Any:
    """An optional field's value, None when unset."""
    return getattr(req, field) if req.HasField(field) else None


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


async def _await(kernel: Kernel, waiter: AsyncWaiter, syscall: str,
                 on_cancel: Callable[[Any], None] | None = None) -> Any:
    """Wait for a registered waiter; if the client goes away, undo the wait.
    A Python agent waiting gives up its CPU meanwhile."""
    caller = _agent()
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


def _agent() -> int | None:
    """The pid of the Python agent making the current call (None: an external client)."""
    caller = CALLER.get()
    return caller.pid if caller.role == PROCESS else None


def _port_caller(k: Kernel, pid: int, secret: str) -> Caller:
    """The caller, lent a port's opener identity if it presents the port's secret."""
    caller = CALLER.get()
    if not secret:
        return caller
    with k.lock:
        port = k.live_locked(C.pid(pid), "port", caller)
        if not port.secret or port.secret != digest(secret):
            raise PermissionDenied(f"that is not pid {pid}'s port secret")
        return Caller(caller.namespace, caller.role, key=port.opener)


# -- handlers -------------------------------------------------------------------------------
async def sys_spawn(k: Kernel, req: pb.SpawnRequest,
                    on_spawned: Callable[[int], list] | None = None) -> pb.SpawnResponse:
    """`on_spawned`: a durable agent's journal entry of it (python/durable.py, Kernel.spawn)."""
    which = req.WhichOneof("program")
    if which is None:
        raise InvalidArgument("program is required: set lua (source), python (source) or path")
    spec = SpawnSpec(
        args=_value(req.args) if req.HasField("args") else None, name=req.name or None, priority=req.priority,
        weight=req.weight, limits=C.limits({f.name: v for f, v in req.limits.ListFields()}),
        parent=req.parent, monitor=req.monitor, source_name=req.source_name or None,
        dead_letter=req.dead_letter, max_attempts=req.max_attempts, durable=req.durable,
    )
    setattr(spec, which, getattr(req, which))
    return pb.SpawnResponse(pid=k.spawn(spec, CALLER.get(), on_spawned))


async def sys_send(k: Kernel, req: pb.SendRequest, on_sent: Callable[[Any], list] | None = None) -> pb.SendResponse:
    """`on_sent`: a durable agent's journal entry of it (python/durable.py, Kernel.send)."""
    target = req.WhichOneof("target")
    if target is None or (target == "to" and req.to == 0) or (target == "to_name" and not req.to_name):
        raise InvalidArgument("a receiver is required: set to (a pid) or to_name (a registered name)")
    # The options set (an unset field is its default, which needs no check; these fields have no presence,
    # so set is not the default: read directly, which costs less than ListFields; a loop, not a
    # comprehension: no frame of its own).
    given = {}
    for key in _SEND_OPTIONS:
        if value := getattr(req, key):
            given[key] = value
    to, body, options = C.arguments("send", {
        "to": getattr(req, target), "body": _value(req.body) if req.HasField("body") else None,
        "options": given or None})
    message_id = k.send(getattr(req, "from"), to, options.get("tag", ""), body, options.get("data", b""),
                        options.get("correlation_id", ""), CALLER.get(), options.get("notify_undelivered", False),
                        options.get("idempotency_key", ""), on_sent)
    return pb.SendResponse(message_id=message_id)


_SEND_OPTIONS = frozenset(("tag", "data", "correlation_id", "notify_undelivered", "idempotency_key"))
_RECV_OPTIONS = frozenset(("from", "tag", "correlation_id", "timeout_ms", "lease_ms"))


def _batch_size(n: int, field: str) -> int:
    """A batch's size (SendBatch's messages, Recv's max_messages, Ack's message_ids): 1..MAX_BATCH."""
    if not 1 <= n <= MAX_BATCH:
        raise InvalidArgument(f"{field}: {n}; a batch holds 1 to {MAX_BATCH} messages")
    return n


async def sys_send_batch(k: Kernel, req: pb.SendBatchRequest) -> pb.SendBatchResponse:
    target = req.WhichOneof("target")
    if target is None or (target == "to" and req.to == 0) or (target == "to_name" and not req.to_name):
        raise InvalidArgument("a receiver is required: set to (a pid) or to_name (a registered name)")
    _batch_size(len(req.messages), "messages")
    (to,) = C.arguments("send_batch", {"to": getattr(req, target)})
    batch = []
    checked: dict[tuple, tuple] = {}  # each distinct set of options is checked once, as a Send's
    for i, m in enumerate(req.messages):
        given = (m.tag, m.data, m.correlation_id, m.notify_undelivered, m.idempotency_key)
        options = checked.get(given)
        if options is None:
            (options,) = C.arguments("send", {"to": to, "options": dict(zip(BATCH_OPTIONS, given))},
                                     f"messages[{i}]: ")[2:]
            options = checked[given] = tuple(options.get(key, given[n]) for n, key in enumerate(BATCH_OPTIONS))
        tag, data, correlation_id, notify_undelivered, idempotency_key = options
        batch.append((tag, _value(m.body) if m.HasField("body") else None, data, correlation_id,
                      notify_undelivered, idempotency_key))
    return pb.SendBatchResponse(message_ids=k.send_batch(getattr(req, "from"), to, batch, CALLER.get()))


async def sys_recv(k: Kernel, req: pb.RecvRequest) -> pb.RecvResponse:
    pid = C.pid(req.pid)
    caller = _port_caller(k, pid, req.port_secret)
    given = {}  # the options set (a loop, not a comprehension: no frame of its own)
    for key in _RECV_OPTIONS:
        if req.HasField(key):
            given[key] = getattr(req, key)
    (options,) = C.arguments("recv", {"options": given or None})
    match = Match(options.get("from"), options.get("tag"), options.get("correlation_id")) if (
        "from" in options or "tag" in options or "correlation_id" in options) else ANY
    most = _batch_size(req.max_messages, "max_messages") if req.max_messages else 0
    if req.ack:
        return await _recv_leased(k, pid, match, req, caller, most)
    if req.HasField("lease_ms"):
        raise InvalidArgument("lease_ms is for a Recv with ack")
    if most:
        return await _recv_many(k, pid, match, _seconds(options.get("timeout_ms")), most, caller)
    waiter = AsyncWaiter(asyncio.get_running_loop())
    msg = k.recv(pid, match, waiter, _seconds(options.get("timeout_ms")), caller)
    if msg is None:
        msg = await _await(k, waiter, "recv", lambda taken: k.put_back(pid, taken))
        if msg is TIMED_OUT:
            return pb.RecvResponse(timed_out=True)
    try:
        reply = pb.RecvResponse()
        await built(msg.size, fill_message, reply.message, msg)
        return reply
    except Exception:  # a message that cannot be answered is a kernel bug, but it is never lost for it
        k.put_back(pid, msg)
        raise


async def _recv_many(k: Kernel, pid: int, match: Match, timeout: float | None, most: int,
                     caller: Caller) -> pb.RecvResponse:
    """Recv with max_messages, without ack."""
    def take(receiver: Any, waiter: AsyncWaiter, budget: int) -> list | None:
        taken = k.recv_many_locked(receiver, match, most, budget)
        if taken:
            return taken
        first = k.recv_locked(pid, match, waiter, timeout, caller)  # nothing waiting: registers the waiter
        return None if first is None else [first]

    return await _recv_batch(k, pid, caller, most, take,
                             lambda proc, n, budget: k.recv_many_locked(proc, match, n, budget),
                             k.put_back, lambda msg: (msg, 0))


async def _recv_leased(k: Kernel, pid: int, match: Match, req: pb.RecvRequest, caller: Caller,
                       most: int) -> pb.RecvResponse:
    (options,) = C.arguments("recv", {"options": {"timeout_ms": _set(req, "timeout_ms"),
                                                  "lease_ms": _set(req, "lease_ms")}})
    lease_s, timeout = _seconds(options.get("lease_ms")), _seconds(options.get("timeout_ms"))
    if most:
        return await _recv_leased_many(k, pid, match, timeout, lease_s, most, caller)
    waiter = AsyncWaiter(asyncio.get_running_loop())
    with k.lock:
        receiver = k.target_locked(caller, "recv", pid, "receiver")
        leased = k.acks.recv_locked(receiver, match, waiter, timeout, lease_s)
    if leased is None:
        leased = await _await(k, waiter, "recv", lambda taken: _give_back(k, pid, taken))
        if leased is TIMED_OUT:
            return pb.RecvResponse(timed_out=True)
    try:
        reply = pb.RecvResponse()
        await built(leased.msg.size, fill_message, reply.message, leased.msg, leased.attempt)
        return reply
    except Exception:  # never lost for a kernel bug: it is delivered again
        _give_back(k, pid, leased)
        raise


async def _recv_leased_many(k: Kernel, pid: int, match: Match, timeout: float | None, lease_s: float | None,
                            most: int, caller: Caller) -> pb.RecvResponse:
    """Recv with ack and max_messages: each message taken is leased."""
    return await _recv_batch(
        k, pid, caller, most,
        lambda receiver, waiter, budget: k.acks.recv_many_locked(receiver, match, waiter, timeout, lease_s, most, budget),
        lambda proc, n, budget: k.acks.more_locked(proc, match, lease_s, n, budget),
        functools.partial(_give_back, k), lambda leased: (leased.msg, leased.attempt))


async def _recv_batch(k: Kernel, pid: int, caller: Caller, most: int,
                      take: Callable[[Any, AsyncWaiter, int], list | None], more: Callable[[Any, int, int], list],
                      give_back: Callable[[int, Any], None], entry: Callable[[Any], tuple[Any, int]]) -> pb.RecvResponse:
    """A batch receive (max_messages = `most`), with or without ack: `take(receiver, waiter, budget)`
    (kernel lock held) takes what is waiting, or registers `waiter` for the first match and returns
    None; that one awaited, `more(receiver, n, budget)` adds those waiting by then. A reply stops
    within --max-message-bytes (`budget`); `entry(taken)` is its (message, attempt). What cannot be
    answered is given back (`give_back(pid, taken)`): never lost for a kernel bug."""
    budget = k.config.max_message_bytes
    waiter = AsyncWaiter(asyncio.get_running_loop())
    with k.lock:
        taken = take(k.target_locked(caller, "recv", pid, "receiver"), waiter, budget)
    if taken is None:
        first = await _await(k, waiter, "recv", lambda got: give_back(pid, got))
        if first is TIMED_OUT:
            return pb.RecvResponse(timed_out=True)
        taken = [first]
        if most > 1:
            with k.lock:
                proc = k.procs.get(pid)
                if proc is not None:
                    taken += more(proc, most - 1, budget - entry(first)[0].size)
    try:
        reply = pb.RecvResponse()
        entries = [entry(one) for one in taken]
        await built(sum(msg.size for msg, _ in entries), add_messages, reply.messages, entries)
        return reply
    except Exception:
        for one in taken:
            give_back(pid, one)
        raise


def _give_back(k: Kernel, pid: int, leased: Any) -> None:
    with k.lock:
        k.acks.give_back(pid, leased)


async def sys_ack(k: Kernel, req: pb.AckRequest) -> pb.AckResponse:
    return _settle(k, req, "ack", k.acks.ack, k.acks.ack_many)


async def sys_nack(k: Kernel, req: pb.AckRequest) -> pb.AckResponse:
    return _settle(k, req, "nack", k.acks.nack, k.acks.nack_many)


def _settle(k: Kernel, req: pb.AckRequest, syscall: str, settle: Callable[[int, int], None],
            settle_many: Callable[[int, list[int]], list[int]]) -> pb.AckResponse:
    """Ack or Nack: the receiver's lease on a message (message_id) or on each of many (message_ids) ends."""
    pid = C.pid(req.pid)
    if req.message_ids:
        if req.message_id:
            raise InvalidArgument("give message_id (one message) or message_ids (many), not both")
        _batch_size(len(req.message_ids), "message_ids")
        ids = list(req.message_ids)
        for extreme in (min(ids), max(ids)):  # the rule is a range: the extremes pass, every id does
            C.arguments(syscall, {"message_id": extreme}, f"message_ids[{ids.index(extreme)}]: ")
        with k.lock:
            k.target_locked(CALLER.get(), syscall, pid, "receiver")
            not_leased = settle_many(pid, ids)
        return pb.AckResponse(settled=len(ids) - len(not_leased), not_leased=not_leased)
    (message_id,) = C.arguments(syscall, {"message_id": req.message_id})
    with k.lock:
        k.target_locked(CALLER.get(), syscall, pid, "receiver")
        settle(pid, message_id)
    return pb.AckResponse()


async def sys_wait(k: Kernel, req: pb.WaitRequest) -> pb.WaitResponse:
    waiter = AsyncWaiter(asyncio.get_running_loop())
    pid, timeout_ms = C.arguments("wait", {"pid": req.pid, "timeout_ms": _set(req, "timeout_ms")})
    rec = k.wait(pid, waiter, _seconds(timeout_ms), CALLER.get())
    if rec is None:
        rec = await _await(k, waiter, "wait")
        if rec is TIMED_OUT:
            return pb.WaitResponse(timed_out=True)
    reply = pb.WaitResponse()
    await _process_reply(rec, info=reply.process)
    return reply


async def sys_kill(k: Kernel, req: pb.KillRequest) -> pb.KillResponse:
    pid, reason = C.arguments("kill", {"pid": req.pid, "reason": req.reason or None})
    return pb.KillResponse(already_ended=not k.kill(pid, reason or "killed", CALLER.get()))


async def sys_exit(k: Kernel, req: pb.ExitRequest) -> pb.ExitResponse:
    k.exit(C.pid(req.pid), _value(req.result) if req.HasField("result") else None,
           _port_caller(k, req.pid, req.port_secret))
    return pb.ExitResponse()


async def sys_open_port(k: Kernel, req: pb.OpenPortRequest) -> pb.OpenPortResponse:
    pid, secret = k.open_port(req.name or None, req.mailbox, CALLER.get(), req.dead_letter, req.max_attempts)
    return pb.OpenPortResponse(pid=pid, secret=secret)


async def sys_register(k: Kernel, req: pb.RegisterRequest) -> pb.RegisterResponse:
    k.register(C.pid(req.pid), *C.arguments("register", {"name": req.name}), CALLER.get())
    return pb.RegisterResponse()


async def sys_monitor(k: Kernel, req: pb.MonitorRequest) -> pb.MonitorResponse:
    k.monitor(C.pid(req.watcher, "watcher"), *C.arguments("monitor", {"target": req.target}), CALLER.get())
    return pb.MonitorResponse()


async def sys_set_priority(k: Kernel, req: pb.SetPriorityRequest) -> pb.SetPriorityResponse:
    pid, priority, weight = C.arguments("set_priority", {"pid": req.pid, "priority": req.priority,
                                                         "weight": req.weight or None})
    k.set_priority(pid, priority, weight or 0, CALLER.get())
    return pb.SetPriorityResponse()


def _log_reply(k: Kernel, pid: int, offset: int, tail: int, since_ms: int, caller: Caller) -> pb.ReadLogResponse:
    entries, next_offset, dropped, ended = k.read_log(pid, offset, caller)
    if since_ms > 0:  # a line of unknown time (0) is kept: it may be recent
        entries = [e for e in entries if e[0] == 0 or e[0] >= since_ms]
    if tail:
        entries = entries[-tail:]
    return pb.ReadLogResponse(lines=[line for _, line in entries], times_ms=[at for at, _ in entries],
                              next_offset=next_offset, dropped=dropped, ended=ended)


async def sys_read_log(k: Kernel, req: pb.ReadLogRequest) -> pb.ReadLogResponse:
    return _log_reply(k, C.pid(req.pid), req.offset, req.tail, req.since_ms, CALLER.get())


AGENT_LOG_RECHECK_S = 0.5  # a Python agent's lines go to its output file, not through the kernel: re-read


async def sys_follow_log(k: Kernel, req: pb.ReadLogRequest) -> AsyncIterator[pb.ReadLogResponse]:
    """ReadLog, then a reply with the new lines each time the kernel says the log grew, until the
    process has ended and its last lines are sent."""
    pid, caller = C.pid(req.pid), CALLER.get()
    loop = asyncio.get_running_loop()
    grew = asyncio.Event()
    stop = k.follow_log(pid, lambda: loop.call_soon_threadsafe(grew.set))  # before reading: no line is missed
    try:
        reply = _log_reply(k, pid, req.offset, req.tail, req.since_ms, caller)
        yield reply
        while not reply.ended:
            with k.lock:
                proc = k.procs.get(pid)
                agent = proc is not None and proc.kind == PYTHON
            try:
                await asyncio.wait_for(grew.wait(), AGENT_LOG_RECHECK_S if agent else None)
            except TimeoutError:
                pass
            grew.clear()
            reply = _log_reply(k, pid, reply.next_offset, 0, req.since_ms, caller)
            if reply.lines or reply.ended:
                yield reply
    finally:
        stop()


async def sys_list(k: Kernel, req: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
    states = {_enum_name(pb.ProcessState, s, "states") for s in req.states}
    size = page_size(req)
    found = k.list(states, req.name or None, req.parent, req.include_ended, req.after_pid, CALLER.get())
    reply = pb.ListProcessesResponse()
    if fill_page(found, size, lambda entry: process_pb(*entry), reply.processes):
        reply.next_after_pid = reply.processes[-1].pid
    return reply


async def sys_get(k: Kernel, req: pb.GetProcessRequest) -> pb.ProcessInfo:
    (pid,) = C.arguments("info", {"pid": req.pid})
    info = await _process_reply(*k.get(pid, CALLER.get()))
    monitors, monitored_by = k.monitor_links(pid)
    info.monitors.extend(monitors)
    info.monitored_by.extend(monitored_by)
    return info


async def sys_events(k: Kernel, req: pb.EventsRequest) -> AsyncIterator[pb.Event]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    caller = CALLER.get()

    def listener(kind: str, rec: ProcessRecord) -> None:  # kernel lock held: only hand over
        if (not req.pid or rec.pid == req.pid) and caller.sees(rec.namespace):
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
    writer, caller = None, CALLER.get()
    try:
        async for req in requests:
            if writer is None:
                if req.pid:
                    with k.lock:
                        k.target_locked(caller, "fs.write", req.pid)  # NotFound for an unknown pid
                writer = await asyncio.to_thread(k.files.open_writer, caller.namespace, req.pid, req.path, req.append)
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
        k.files.open_reader, CALLER.get().namespace, req.path, req.offset, req.length or None, FILE_CHUNK_BYTES,
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
    return file_pb(await asyncio.to_thread(k.files.stat, CALLER.get().namespace, req.path))


async def sys_list_files(k: Kernel, req: pb.FilePath) -> pb.ListFilesResponse:
    entries = await asyncio.to_thread(k.files.list, CALLER.get().namespace, req.path)
    return pb.ListFilesResponse(entries=[file_pb(e) for e in entries])


async def sys_delete_file(k: Kernel, req: pb.FilePath) -> pb.DeleteFileResponse:
    await asyncio.to_thread(k.files.delete, CALLER.get().namespace, req.path)
    return pb.DeleteFileResponse()


async def sys_rename_file(k: Kernel, req: pb.RenameFileRequest) -> pb.FileInfo:
    return file_pb(await asyncio.to_thread(k.files.rename, CALLER.get().namespace, req.from_path, req.to_path))


async def sys_make_dir(k: Kernel, req: pb.FilePath) -> pb.FileInfo:
    return file_pb(await asyncio.to_thread(k.files.mkdir, CALLER.get().namespace, req.path))


# -- locks ----------------------------------------------------------------------------------------
async def sys_acquire(k: Kernel, req: pb.AcquireRequest) -> pb.AcquireResponse:
    pid = C.pid(req.pid)
    name, options = C.arguments("lock.acquire", {"name": req.name, "options": {
        "semaphore": req.semaphore or None, "timeout_ms": _set(req, "timeout_ms")}})
    kind, permits = ("semaphore", options["semaphore"]) if "semaphore" in options else ("mutex", 1)
    timeout = _seconds(options.get("timeout_ms"))
    waiter = AsyncWaiter(asyncio.get_running_loop())
    with k.lock:
        holder = k.target_locked(CALLER.get(), "lock.acquire", pid, "holder")
        priority = C.priority(req.priority) if req.HasField("priority") else holder.priority
        if timeout == 0:
            answer = k.sync.try_acquire(holder.namespace, name, pid, kind, permits)
            if answer is None:
                return pb.AcquireResponse(timed_out=True)
        else:
            answer = k.sync.acquire(holder.namespace, name, pid, priority, waiter, timeout, kind, permits)
    if answer is None:
        answer = await _await(k, waiter, "lock", lambda _: k.release_lock(pid, req.name))
        if answer is TIMED_OUT:
            return pb.AcquireResponse(timed_out=True)
    return pb.AcquireResponse(acquired=True, previous_holder_died=answer.get("previous_holder_died") or 0)


# A durable agent's journal entry of a call whose effect others see at once (a release, a signal):
# called under the kernel lock once the effect is made, with the reply and the journal ops of the
# wakes it made (python/durable.py), so that no entry that follows from it comes first in the journal.
Journaled = Callable[[Any, list], None]


async def sys_release(k: Kernel, req: pb.ReleaseRequest, journaled: Journaled | None = None) -> pb.ReleaseResponse:
    reply = pb.ReleaseResponse()
    k.release_lock(C.pid(req.pid), *C.arguments("lock.release", {"name": req.name}), CALLER.get(),
                   None if journaled is None else lambda: journaled(reply, []))
    return reply


async def sys_cond_wait(k: Kernel, req: pb.CondWaitRequest) -> pb.CondWaitResponse:
    pid = C.pid(req.pid)
    name, lock, timeout_ms = C.arguments("cond.wait", {"name": req.name, "lock": req.lock,
                                                       "timeout_ms": _set(req, "timeout_ms")})
    waiter = AsyncWaiter(asyncio.get_running_loop())
    with k.lock:
        waiting = k.target_locked(CALLER.get(), "cond.wait", pid, "waiter")
        priority = C.priority(req.priority) if req.HasField("priority") else waiting.priority
        k.sync.cond_wait(waiting.namespace, name, lock, pid, priority, waiter, _seconds(timeout_ms))
    # A call cancelled after it held the mutex again gives it back; one cancelled before leaves it free.
    answer = await _await(k, waiter, "cond_wait",
                          lambda held: k.release_lock(pid, req.lock) if isinstance(held, dict) else None)
    if isinstance(answer, KernelError):
        raise answer
    return pb.CondWaitResponse(signalled=answer["signalled"], timed_out=answer["timed_out"],
                               previous_holder_died=answer.get("previous_holder_died") or 0)


def _cond_namespace(k: Kernel, pid: int, syscall: str) -> str:
    """A signaller's namespace: its own, or an external client's (pid 0)."""
    caller = CALLER.get()
    return k.target_locked(caller, syscall, C.pid(pid), "signaller").namespace if pid else caller.namespace


async def sys_cond_signal(k: Kernel, req: pb.CondSignalRequest,
                          journaled: Journaled | None = None) -> pb.CondSignalResponse:
    return _cond_wake(k, req, "cond.signal", k.sync.cond_signal, journaled)


async def sys_cond_broadcast(k: Kernel, req: pb.CondSignalRequest,
                             journaled: Journaled | None = None) -> pb.CondSignalResponse:
    return _cond_wake(k, req, "cond.broadcast", k.sync.cond_broadcast, journaled)


def _cond_wake(k: Kernel, req: pb.CondSignalRequest, syscall: str, wake: Callable[..., int],
               journaled: Journaled | None) -> pb.CondSignalResponse:
    # A durable signaller's entry takes the wakes of the durable waiters it chose into its unit.
    woken: list | None = None if journaled is None else []
    with k.lock:
        reply = pb.CondSignalResponse(woken=wake(_cond_namespace(k, req.pid, syscall),
                                                 *C.arguments(syscall, {"name": req.name}), woken))
        if journaled is not None:
            journaled(reply, woken)
    return reply


async def sys_infer(k: Kernel, req: pb.InferRequest) -> AsyncIterator[pb.InferChunk]:
    if req.pid:  # the rule first, as every syscall's: another namespace's pid is NOT_FOUND, engine or not
        with k.lock:
            k.target_locked(CALLER.get(), "infer", req.pid)
    if k.inference is None:
        raise Unimplemented("this server runs no inference engine (start llmosd with --model)")
    caller = _agent()
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


def _context_owner(k: Kernel, syscall: str, pid: int) -> None:
    """The caller may act on the process that owns (or is to own) a context (the table's rule)."""
    with k.lock:
        k.target_locked(CALLER.get(), syscall, C.pid(pid))


async def sys_create_context(k: Kernel, req: pb.CreateContextRequest) -> pb.ContextInfo:
    _context_owner(k, "context.create", req.pid)
    caller = _agent()
    if caller is not None:
        k.runtimes[PYTHON].blocking(caller, "infer")
    try:
        return await _inference(k).create_context_rpc(req)
    finally:
        if caller is not None:
            k.runtimes[PYTHON].resumed(caller)


async def sys_fork_context(k: Kernel, req: pb.ForkContextRequest) -> pb.ContextInfo:
    _context_owner(k, "context.fork", req.pid)
    return await _inference(k).fork_context_rpc(req)


async def sys_drop_context(k: Kernel, req: pb.DropContextRequest) -> pb.DropContextResponse:
    _context_owner(k, "context.drop", req.pid)
    _inference(k).drop_context(C.pid(req.pid), req.context_id)
    return pb.DropContextResponse()


# -- tokens (admin only: the table's rule) -----------------------------------------------------
async def sys_create_token(k: Kernel, req: pb.CreateTokenRequest) -> pb.CreateTokenResponse:
    token_id, token = k.tokens.create(req.namespace, req.role, req.label)
    return pb.CreateTokenResponse(id=token_id, token=token)


async def sys_list_tokens(k: Kernel, req: pb.ListTokensRequest) -> pb.ListTokensResponse:
    return pb.ListTokensResponse(tokens=[
        pb.TokenInfo(id=i, namespace=ns, role=role, label=label, created_at_ms=at)
        for i, ns, role, label, at in k.tokens.list()
    ])


async def sys_revoke_token(k: Kernel, req: pb.RevokeTokenRequest) -> pb.RevokeTokenResponse:
    return pb.RevokeTokenResponse(revoked=k.tokens.revoke(req.id))


async def sys_get_namespace(k: Kernel, req: pb.GetNamespaceRequest) -> pb.NamespaceInfo:
    caller = CALLER.get()
    return _namespace_info(k.namespace_use(req.name, caller), caller.role)


async def sys_set_namespace(k: Kernel, req: pb.SetNamespaceRequest) -> pb.NamespaceInfo:
    quotas = {f.name: value for f, value in req.quotas.ListFields()}
    k.namespaces.set(req.name, req.weight, quotas)
    caller = CALLER.get()
    return _namespace_info(k.namespace_use(req.name, caller), caller.role)


def _namespace_info(use: dict[str, Any], caller_role: str) -> pb.NamespaceInfo:
    nested = {key: pb.NamespaceQuotas(**use.pop(key)) for key in ("quotas", "use", "reserved")}
    return pb.NamespaceInfo(**use, **nested, caller_role=caller_role)


MAX_AUDIT_PAGE = 10_000


async def sys_read_audit(k: Kernel, req: pb.ReadAuditRequest) -> pb.ReadAuditResponse:
    if req.limit > MAX_AUDIT_PAGE:
        raise InvalidArgument(f"limit is at most {MAX_AUDIT_PAGE}")
    before = C.pid(req.before_id, "before_id") if req.before_id else 0
    rows = await asyncio.to_thread(k.audit.read, req.limit or 100, before)
    return pb.ReadAuditResponse(entries=[
        pb.AuditEntry(id=i, at_ms=at, namespace=ns, who=who, method=m, target=t, outcome=o)
        for i, at, ns, who, m, t, o in rows
    ])


# The handler of each RPC: exactly the table's `rpc`s (and the .proto's methods).
SYSCALLS: dict[str, Callable[..., Any]] = {
    "Spawn": sys_spawn,
    "Send": sys_send,
    "SendBatch": sys_send_batch,
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
    "FollowLog": sys_follow_log,
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
    "CreateToken": sys_create_token,
    "ListTokens": sys_list_tokens,
    "RevokeToken": sys_revoke_token,
    "GetNamespace": sys_get_namespace,
    "SetNamespace": sys_set_namespace,
    "ReadAudit": sys_read_audit,
}

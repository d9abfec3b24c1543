"""The gRPC end of the namespace's dead-letter queue (kernel/deadletters.py): the handlers of
ListDeadLetters, GetDeadLetter, RetryDeadLetter and PurgeDeadLetters, in api/syscalls.py's SYSCALLS.
A client sees its own namespace's queue (its token's)."""
from __future__ import annotations

import asyncio

from llmos.v1 import kernel_pb2 as pb

from . import checks as C
from .errors import InvalidArgument
from .identity import CALLER
from .replies import fill_page, message_pb, page_size
from ..kernel.deadletters import DeadLetter
from ..kernel.kernel import Kernel


def dead_letter_pb(d: DeadLetter) -> pb.DeadLetter:
    return pb.DeadLetter(id=d.id, message=message_pb(d.message), reason=d.reason, attempts=d.attempts,
                         receiver=d.receiver, dead_at_ms=d.dead_at_ms, detail=d.detail, namespace=d.namespace)


async def sys_list_dead_letters(k: Kernel, req: pb.ListDeadLettersRequest) -> pb.ListDeadLettersResponse:
    size, namespace = page_size(req), CALLER.get().namespace
    receiver = C.pid(req.receiver, "receiver") if req.receiver else 0
    after_id = min(req.after_id, C.MAX_PID)  # no id is above it (and SQLite's integers end at 2^63)
    found = await asyncio.to_thread(k.dead_letters.list, namespace, after_id, size + 1, receiver)
    reply = pb.ListDeadLettersResponse()
    if fill_page(found, size, dead_letter_pb, reply.dead_letters):
        reply.next_after_id = reply.dead_letters[-1].id
    with k.lock:
        reply.total, reply.dropped = k.dead_letters.count(namespace), k.dead_letters.dropped.get(namespace, 0)
    return reply


async def sys_get_dead_letter(k: Kernel, req: pb.GetDeadLetterRequest) -> pb.DeadLetter:
    return dead_letter_pb(await asyncio.to_thread(k.dead_letters.get, CALLER.get().namespace, req.id))


async def sys_retry_dead_letter(k: Kernel, req: pb.RetryDeadLetterRequest) -> pb.RetryDeadLetterResponse:
    target = req.WhichOneof("target")
    if (target == "to" and req.to == 0) or (target == "to_name" and not req.to_name):
        raise InvalidArgument("to or to_name is empty: leave both unset for the message's own receiver")
    caller = CALLER.get()
    dead = await asyncio.to_thread(k.dead_letters.get, caller.namespace, req.id)
    with k.lock:
        to = k.resolve(getattr(req, target), caller) if target else k.live_locked(dead.receiver, "receiver", caller)
        message_id = k.dead_letters.retry_locked(dead, to)
    return pb.RetryDeadLetterResponse(message_id=message_id)


async def sys_purge_dead_letters(k: Kernel, req: pb.PurgeDeadLettersRequest) -> pb.PurgeDeadLettersResponse:
    ids = [C.message_id(i, "ids") for i in req.ids]
    with k.lock:
        return pb.PurgeDeadLettersResponse(purged=k.dead_letters.purge_locked(CALLER.get().namespace, ids, req.all,
                                                                              req.before_ms))

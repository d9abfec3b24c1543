"""What several syscall handlers answer with: a kernel message as the proto's Message (Recv, the
dead-letter queue), and list pages bounded in count and in bytes (ListProcesses, ListDeadLetters)."""
from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from llmos.v1 import kernel_pb2 as pb
from llmos.values import fill_value

from .errors import InvalidArgument
from ..kernel.mailbox import Message

T = TypeVar("T")

# Values of this many encoded bytes or more are converted in a thread (`off_loop`): an HTTP body's
# JSON (http.py, openai_api.py), a request to a syscall that does not block (doors.call_syscall), a reply's
# messages or result (`built`). Python converts about 10 MiB of small items a second, on the event
# loop that answers every other call: a 4 MiB message sent or received held it 0.4 s, 2 MB of
# JSON 1.2 s.
THREAD_BYTES = 64 << 10


# One thread does them all: they hold the GIL anyway, so more threads would convert no faster, and
# each would grow a malloc arena of its own.
_CONVERTER = ThreadPoolExecutor(1, thread_name_prefix="convert", initializer=lambda: setattr(_here, "converter", True))
_here = threading.local()


async def off_loop(build: Callable[..., T], *args: Any) -> T:
    """`build(*args)` in the converting thread (see THREAD_BYTES), with this call's context."""
    if getattr(_here, "converter", False):  # already there (a loop of its own: doors.call_syscall)
        return build(*args)
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_CONVERTER, lambda: context.run(build, *args))


async def built(size: int, build: Callable[..., T], *args: Any) -> T:
    """`build(*args)`, which converts `size` bytes of values: in the converting thread if that is
    THREAD_BYTES or more (see there), else here."""
    return await off_loop(build, *args) if size >= THREAD_BYTES else build(*args)


def fill_message(out: pb.Message, msg: Message, attempt: int = 0) -> None:
    """Set `out` (a Message field of a reply being built) to `msg`; `attempt`: set for a message
    received with ack (kernel/acks.py). Built in place: copying a message into a reply is a deep
    copy (upb encodes and decodes it), one C call that holds the GIL, 55 ms for 3.6 MB."""
    out.id, out.to, out.tag, out.data = msg.id, msg.to, msg.tag, msg.data
    out.correlation_id, out.sent_at_ms = msg.correlation_id, msg.sent_at_ms
    out.attempt, out.redelivered = attempt, attempt > 1
    setattr(out, "from", msg.sender)
    fill_value(out.body, msg.body)


def message_pb(msg: Message, attempt: int = 0) -> pb.Message:
    out = pb.Message()
    fill_message(out, msg, attempt)
    return out


def add_messages(messages: Any, taken: list[tuple[Message, int]]) -> None:
    """Append (message, attempt) pairs to a repeated Message field (a batch receive's reply)."""
    for msg, attempt in taken:
        fill_message(messages.add(), msg, attempt)


LIST_PAGE_SIZE = 1000  # entries in a page when the request names no size
MAX_LIST_PAGE_SIZE = 10_000
LIST_PAGE_BYTES = 1 << 20  # a page ends early rather than grow past this (any reply must fit a client)


def page_size(req: Any) -> int:
    if req.page_size > MAX_LIST_PAGE_SIZE:
        raise InvalidArgument(f"page_size is at most {MAX_LIST_PAGE_SIZE}")
    return req.page_size or LIST_PAGE_SIZE


def fill_page(found: list, size: int, convert: Callable[[Any], Any], page: Any) -> bool:
    """Append `found[:size]` to `page` (a repeated field), converted, up to LIST_PAGE_BYTES: whether any was left."""
    used = 0
    for entry in found[:size]:
        item = convert(entry)
        used += item.ByteSize()
        if used > LIST_PAGE_BYTES and page:
            break
        page.append(item)
    return len(page) < len(found)

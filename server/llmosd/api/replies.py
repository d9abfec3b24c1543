"""What several syscall handlers answer with: a kernel message as the proto's Message (Recv, the
dead-letter queue), and list pages bounded in count and in bytes (ListProcesses, ListDeadLetters)."""
from __future__ import annotations

from typing import Any, Callable

from llmos.v1 import kernel_pb2 as pb
from llmos.values import fill_value, to_value

from .errors import InvalidArgument
from ..kernel.mailbox import Message


def message_pb(msg: Message, attempt: int = 0) -> pb.Message:
    """`attempt`: set for a message received with ack (kernel/acks.py)."""
    out = pb.Message(id=msg.id, to=msg.to, tag=msg.tag, data=msg.data, correlation_id=msg.correlation_id,
                     sent_at_ms=msg.sent_at_ms, body=to_value(msg.body), attempt=attempt, redelivered=attempt > 1)
    setattr(out, "from", msg.sender)
    return out


def add_messages(messages: Any, taken: list[tuple[Message, int]]) -> None:
    """Append (message, attempt) pairs to a repeated Message field, as message_pb makes each (built in
    place: a batch receive's reply holds hundreds, and copying each one in costs as much again)."""
    add = messages.add
    for msg, attempt in taken:
        out = add(id=msg.id, to=msg.to, tag=msg.tag, data=msg.data, correlation_id=msg.correlation_id,
                  sent_at_ms=msg.sent_at_ms, attempt=attempt, redelivered=attempt > 1, **{"from": msg.sender})
        fill_value(out.body, msg.body)


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

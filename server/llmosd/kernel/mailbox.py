"""Mailboxes with Erlang-style selective receive.

A mailbox keeps messages in arrival order. `take` removes the oldest message
matching a filter and leaves the others where they are. A receiver that
finds nothing registers a waiter; `deliver` hands a new message straight to
the first waiting receiver it matches, or queues it. All methods are called
with the kernel lock held.

They are written in C (kernel/mailbox.c), as Lua processes send and receive
through them without entering Python (see lua/fast_paths.c):
  - Message(id, sender, to, tag, body, data, correlation_id, sent_at_ms),
    immutable; body is a JSON-shaped Python value.
  - Match(sender=None, tag=None, correlation_id=None), a receive filter whose
    None fields match anything; ANY matches every message.
  - Mailbox(owner, limit, core): deliver(msg, limited=True), take(match),
    put_back(msg), wait(waiter, match), check_room(msg), check_room_for(count, size), close(),
    len().
"""
from __future__ import annotations

from ..native import _kernel

Message = _kernel.Message
Match = _kernel.Match
Mailbox = _kernel.Mailbox
ANY = _kernel.ANY

__all__ = ["ANY", "Mailbox", "Match", "Message"]

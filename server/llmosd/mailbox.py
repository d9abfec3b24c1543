"""Mailboxes with Erlang-style selective receive.

A mailbox keeps messages in arrival order. `take` removes the oldest message
matching a filter and leaves the others where they are. A receiver that
finds nothing registers a waiter; `deliver` hands a new message straight to
the first waiting receiver it matches, or queues it. All methods are called
with the kernel lock held.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from .errors import ResourceExhausted
from .waiting import Waiter


@dataclass(slots=True)
class Message:
    id: int
    sender: int
    to: int
    tag: str
    body: Any  # JSON-shaped Python value
    data: bytes
    correlation_id: str
    sent_at_ms: int


@dataclass(slots=True, frozen=True)
class Match:
    """A receive filter; None fields match anything."""

    sender: int | None = None
    tag: str | None = None
    correlation_id: str | None = None

    def accepts(self, msg: Message) -> bool:
        return (
            (self.sender is None or msg.sender == self.sender)
            and (self.tag is None or msg.tag == self.tag)
            and (self.correlation_id is None or msg.correlation_id == self.correlation_id)
        )


ANY = Match()


class Mailbox:
    __slots__ = ("owner", "limit", "messages", "receivers")

    def __init__(self, owner: int, limit: int) -> None:
        self.owner = owner
        self.limit = limit
        self.messages: deque[Message] = deque()
        self.receivers: list[tuple[Waiter, Match]] = []

    def __len__(self) -> int:
        return len(self.messages)

    def check_room(self) -> None:
        if len(self.messages) >= self.limit:
            raise ResourceExhausted(
                f"mailbox of pid {self.owner} is full ({self.limit} messages waiting); "
                "the receiver is not keeping up, retry later"
            )

    def deliver(self, msg: Message, limited: bool = True) -> bool:
        """Hand `msg` to a waiting receiver (True) or queue it (False).
        Unless `limited` is False, a full mailbox refuses it (ResourceExhausted)."""
        for i, (waiter, match) in enumerate(self.receivers):
            if match is ANY or match.accepts(msg):
                del self.receivers[i]
                waiter.queue = None
                waiter.complete(msg)
                return True
        if limited and len(self.messages) >= self.limit:
            self.check_room()
        self.messages.append(msg)
        return False

    def take(self, match: Match) -> Message | None:
        messages = self.messages
        if match is ANY:
            return messages.popleft() if messages else None
        for i, msg in enumerate(messages):
            if match.accepts(msg):
                del messages[i]
                return msg
        return None

    def put_back(self, msg: Message) -> None:
        """Return a taken message that could not be handed over, keeping id order."""
        for i, other in enumerate(self.messages):
            if other.id > msg.id:
                self.messages.insert(i, msg)
                return
        self.messages.append(msg)

    def wait(self, waiter: Waiter, match: Match) -> None:
        waiter.register(self.receivers, (waiter, match))

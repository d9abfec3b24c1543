"""Conversation contexts: chats whose KV cache the engine keeps between requests.

- create: the messages (and tools) are rendered and prefilled once; the context keeps their token
  ids and KV blocks.
- continue (Request.context=h, messages = the new turn): the prompt is the context's tokens
  followed by the new text the chat template renders for history + turn. The request adopts the
  context's blocks, so only the turn is prefilled; when it ends, the context holds the turn and
  the answer (as sampled, less a final EOS) and takes the blocks back. A cancelled or failed
  request leaves the context as it was. Where the template's text for history + turn does not
  extend the context's text (a template that rewrites earlier turns; an answer cut by a stop
  string), the prompt is the whole chat tokenized anew and only the KV of the common prefix is kept.
- fork: a new context with the same tokens shares every block by reference count; the first
  write into a shared, partly filled last block copies it (BlockManager.grow).
- drop: frees its blocks (a request running on it is cancelled first).

One request at a time continues a context (another one gets ContextBusy; fork it to explore
alternatives). A context belongs to its owner: another owner's handle is UnknownContext.

Memory. A context's kv_bytes are the bytes of the blocks its tokens fill (a shared block counts in
each context that holds it). An owner's contexts hold at most its limit (Engine.set_kv_limit):
creating, forking or continuing one past it (counting the turn and max_tokens) is KVLimitExceeded.
When a step needs blocks and none are free, idle contexts give theirs up before any running
sequence does: lowest priority first (a context's priority is that of its latest request), least
recently used first within a priority. An evicted context keeps its tokens; its next request
recomputes it, transparently (its full blocks often come back from the prefix cache).

Threads: registry changes (create, fork, drop, claiming a context for a request) happen in the
caller's thread under the engine's lock; block moves happen on the engine thread only (fork and
drop queue theirs as operations that run before the next step's arrivals).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .block_manager import BlockManager
from .sequence import ContextBusy, KVLimitExceeded, Sequence, UnknownContext
from .tokenizer import Tokenizer
from .tools import render


@dataclass(eq=False)
class Context:
    id: int
    owner: int
    priority: int
    messages: list[dict[str, str]]
    tools: list[dict[str, Any]] | None
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in its blocks
    last_used: float = 0.0
    claimed: bool = False  # a request is creating or continuing it
    request: Sequence | None = None  # that request, once submitted
    dropped: bool = False


@dataclass
class ContextInfo:
    id: int
    tokens: int
    kv_bytes: int  # what its tokens take in the cache
    resident_tokens: int  # tokens whose K/V are in the cache now (fewer after an eviction)
    busy: bool


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Contexts:
    def __init__(self, tokenizer: Tokenizer, blocks: BlockManager, block_bytes: int, lock: threading.Condition) -> None:
        self.tokenizer, self.blocks, self.block_bytes, self.lock = tokenizer, blocks, block_bytes, lock
        self.items: dict[int, Context] = {}
        self.limits: dict[int, int] = {}  # owner -> bytes its contexts may hold
        self._ids = itertools.count(1)

    # ---- the caller's thread, engine lock held ---------------------------------------------

    def kv_bytes(self, num_tokens: int) -> int:
        return self.blocks.blocks_for(num_tokens) * self.block_bytes

    def get(self, handle: Any, owner: int) -> Context:
        ctx = self.items.get(handle) if isinstance(handle, int) else None
        if ctx is None or ctx.owner != owner:
            raise UnknownContext(f"no context {handle!r} for owner {owner}")
        return ctx

    def check_limit(self, owner: int, num_tokens: int, replacing: Context | None = None) -> None:
        """KVLimitExceeded unless the owner's contexts, with one of num_tokens (in place of
        `replacing`), fit its limit."""
        limit = self.limits.get(owner)
        if limit is None:
            return
        held = sum(self.kv_bytes(len(c.token_ids)) for c in self.items.values() if c.owner == owner and c is not replacing)
        total = held + self.kv_bytes(num_tokens)
        if total > limit:
            raise KVLimitExceeded(f"owner {owner}'s contexts would hold {total} bytes of KV cache, over its limit of {limit}")

    def new(
        self, owner: int, priority: int, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None,
        token_ids: list[int],
    ) -> Context:
        self.check_limit(owner, len(token_ids))
        ctx = Context(next(self._ids), owner, priority, list(messages), tools, list(token_ids), last_used=time.monotonic())
        self.items[ctx.id] = ctx
        return ctx

    def claim(self, handle: Any, owner: int) -> Context:
        """Reserve a context for one request; ContextBusy if another holds it."""
        ctx = self.get(handle, owner)
        if ctx.claimed:
            raise ContextBusy(f"context {ctx.id} is in use by another request")
        ctx.claimed = True
        return ctx

    def turn(self, ctx: Context, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of history + turn that extend the context's tokens where the template allows
        (runs unlocked: a claimed context's tokens and messages do not change)."""
        tok = self.tokenizer
        full = render(tok, ctx.messages + messages, ctx.tools)
        full_text = tok.decode(full, skip_special_tokens=False)
        held_text = tok.decode(ctx.token_ids, skip_special_tokens=False)
        if not full_text.startswith(held_text):
            return full
        return ctx.token_ids + tok.encode(full_text[len(held_text) :], add_special_tokens=False)

    def fork(self, handle: Any, owner: int) -> tuple[Context, Context]:
        """A new context with the source's tokens; the caller queues share() for the engine thread."""
        source = self.get(handle, owner)
        if source.claimed:
            raise ContextBusy(f"context {source.id} is in use by a request; fork it when that ends")
        return source, self.new(owner, source.priority, source.messages, source.tools, source.token_ids)

    def drop(self, ctx: Context) -> None:
        del self.items[ctx.id]
        ctx.dropped = True

    def info(self, ctx: Context) -> ContextInfo:
        return ContextInfo(ctx.id, len(ctx.token_ids), self.kv_bytes(len(ctx.token_ids)), ctx.num_computed, ctx.claimed)

    # ---- the engine thread -----------------------------------------------------------------

    def idle(self) -> list[Context]:
        """Contexts no request is using, in eviction order: lowest priority, least recently used."""
        with self.lock:
            idle = [c for c in self.items.values() if not c.claimed and c.block_table]
        return sorted(idle, key=lambda c: (c.priority, c.last_used))

    def adopt(self, seq: Sequence) -> None:
        """The request takes its context's blocks, as far as they hold its prompt's prefix."""
        ctx = seq.context
        seq.block_table, seq.block_hashes, seq.num_computed = ctx.block_table, ctx.block_hashes, ctx.num_computed
        ctx.block_table, ctx.block_hashes, ctx.num_computed = [], [], 0
        self.blocks.truncate(seq, common_prefix(ctx.token_ids[: seq.num_computed], seq.token_ids))

    def settle(self, seq: Sequence, reason: str, answer: str, eos_token_ids: frozenset[int]) -> None:
        """A request on the context ended: the context takes the blocks back, with the turn and the
        answer if it ended well, as it was otherwise (or frees them if it was dropped meanwhile)."""
        ctx = seq.context
        ctx.block_table, ctx.block_hashes, ctx.num_computed = seq.block_table, seq.block_hashes, seq.num_computed
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
        if not seq.prefill_only and reason in ("stop", "length"):
            ends_with_eos = seq.num_generated > 0 and seq.token_ids[-1] in eos_token_ids
            ctx.token_ids = seq.token_ids[:-1] if ends_with_eos else list(seq.token_ids)
            ctx.messages = ctx.messages + list(seq.request.messages or []) + [{"role": "assistant", "content": answer}]
        self.blocks.truncate(ctx, common_prefix(seq.token_ids[: ctx.num_computed], ctx.token_ids))
        ctx.priority, ctx.last_used = seq.request.priority, time.monotonic()
        if ctx.dropped:
            self.blocks.release(ctx)  # type: ignore[arg-type]
        ctx.request, ctx.claimed = None, False

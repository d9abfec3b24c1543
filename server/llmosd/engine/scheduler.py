"""Iteration-level scheduling with continuous batching and preemption.

Every step the live sequences are ordered by (effective priority desc, ticket asc) and taken in
that order while they fit: at most `max_batch` sequences and `max_step_tokens` tokens (a decode
is one token; a prefill takes a chunk of what is left of the budget). A sequence that needs KV
blocks may take them from sequences *below* it in the order, which lose their cache and are
recomputed when they run again; a sequence left out keeps its blocks otherwise.

- Priority first: a more important prefill runs without less important work in its step. A
  high-priority arrival does not even wait for the step in flight: the engine pauses that step
  between two layers and schedules an interrupt step (`schedule(above=..., busy=...)`) of the
  more important sequences only, leaving the paused step's sequences and their blocks alone.
- Namespaces share a priority by tokens served, as the kernel's run queue shares CPU (cgroup v2's
  hierarchical cpu.weight): each namespace's tokens computed are counted at its weight
  (`served`: tokens / weight), and within a priority the order interleaves namespaces, the k-th
  ready sequence of a namespace (in ticket order) counting as served + k / weight. So two
  namespaces of equal weight with requests waiting get equal tokens per step whatever their
  numbers of requests; a namespace back from idle starts level with the least served one.
- Round robin within a namespace and priority: a sequence that has generated `token_quantum` tokens since it
  last got a ticket takes a new one, behind everything already waiting.
- No starvation: each `aging_steps` steps a ready sequence waits raise its effective priority by
  one until its next quantum ends; within a priority, tickets only grow.
- Idle conversation contexts (contexts.py) give up their blocks before any sequence does, in the
  order `idle_contexts()` returns them (lowest priority first, then least recently used).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Collection, Iterable, Sequence as Seq

from .block_manager import BlockManager
from .sequence import Sequence


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_batch: int, max_step_tokens: int, token_quantum: int, aging_steps: int,
        idle_contexts: Callable[[], Seq[object]] = list,
    ) -> None:
        self.blocks = blocks
        self.idle_contexts = idle_contexts
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.token_quantum = token_quantum
        self.aging_steps = aging_steps
        self.seqs: list[Sequence] = []
        self.served: dict[str, float] = {}  # namespace -> tokens computed / its weight
        self._tickets = itertools.count()
        self.preemptions = 0  # a running sequence left out of a step
        self.evictions = 0  # a sequence's blocks taken for a more important one (it recomputes)
        self.context_evictions = 0  # an idle context's blocks taken (its next request recomputes it)
        self.prompt_tokens_computed = 0
        self.tokens_computed = 0
        self.prefix_cache_hits = 0  # sequences admitted with part of their prompt in the cache
        self.prefix_cache_hit_tokens = 0

    def next_ticket(self) -> int:
        return next(self._tickets)

    def add(self, seq: Sequence) -> None:
        namespace = seq.request.namespace
        active = {s.request.namespace for s in self.seqs}
        if namespace not in active and active:
            # Back from idle: level with the least served namespace, not owed what it did not ask for.
            level = min(self.served.get(ns, 0.0) for ns in active)
            self.served[namespace] = max(self.served.get(namespace, 0.0), level)
        self.seqs.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished sequence and free its blocks at once."""
        self.blocks.release(seq)
        self.seqs.remove(seq)

    def schedule(self, above: float = -math.inf, busy: Collection[Sequence] = ()) -> list[tuple[Sequence, int]]:
        """Choose this step's sequences and how many of their pending tokens each processes.

        An interrupt step takes only sequences more important than `above` and leaves `busy` ones
        (those of the paused step) out: they are neither chosen nor robbed of blocks."""
        order = self._order(s for s in self.seqs if s not in busy)
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_step_tokens
        floor = None  # once a prefill is in, less important sequences sit this step out
        computing: set[bytes] = set()  # full blocks this step's prefills complete
        for i, seq in enumerate(order):
            if len(batch) == self.max_batch or budget == 0 or seq.effective_priority <= above:
                break
            if floor is not None and seq.effective_priority < floor:
                break
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            upcoming = self.blocks.new_block_hashes(seq, len(seq.token_ids))
            if upcoming and upcoming[0] in computing:
                # Its next block is being computed for another sequence right now: wait a step
                # and take it from the cache instead of computing and storing it twice.
                continue
            n = self._fit(seq, min(len(seq.token_ids) - seq.num_computed, budget), order[i + 1 :])
            if n == 0:
                continue
            if seq.cached_tokens is None:
                seq.cached_tokens = seq.num_computed  # what the prefix cache gave it on admission
                self.prefix_cache_hits += seq.cached_tokens > 0
                self.prefix_cache_hit_tokens += seq.cached_tokens
            computing.update(self.blocks.new_block_hashes(seq, seq.num_computed + n))
            batch.append((seq, n))
            budget -= n
            if n > 1 or seq.num_computed + n < len(seq.token_ids):
                floor = seq.effective_priority
        chosen = {s for s, _ in batch}
        for seq in self.seqs:
            if seq in chosen or seq in busy:
                continue
            if seq.scheduled:
                self.preemptions += 1
            seq.scheduled = False
            seq.waited += 1
            if seq.waited % self.aging_steps == 0:
                seq.boost += 1
        return batch

    def _order(self, ready: Iterable[Sequence]) -> list[Sequence]:
        """Priority first; within it, namespaces interleaved by tokens served (then tickets)."""
        by_ticket = sorted(ready, key=lambda s: s.ticket)
        ahead: dict[tuple[int, str], int] = {}  # (priority, namespace) -> its sequences keyed so far

        def key(seq: Sequence) -> tuple[int, float, int]:
            request, priority = seq.request, seq.effective_priority
            slot = (priority, request.namespace)
            rank = ahead.get(slot, 0)
            ahead[slot] = rank + 1
            return -priority, self.served.get(request.namespace, 0.0) + rank / request.namespace_weight, seq.ticket

        return sorted(by_ticket, key=key)  # keys are made in ticket order: ranks follow tickets

    def _fit(self, seq: Sequence, n: int, below: list[Sequence]) -> int:
        """How many of n tokens get KV blocks, taking blocks from `below` (lowest first) if needed."""
        blocks = self.blocks
        need = blocks.needed(seq, seq.num_computed + n)
        if need > blocks.num_free:
            for context in self.idle_contexts():
                if blocks.num_free >= need:
                    break
                if blocks.evictable(context):  # type: ignore[arg-type]
                    blocks.release(context)  # type: ignore[arg-type]
                    self.context_evictions += 1
        if need > blocks.num_free:
            victims = [v for v in reversed(below) if v.block_table]
            reachable = blocks.num_free + sum(blocks.evictable(v) for v in victims)
            target = min(need, reachable)
            for victim in victims:
                if blocks.num_free >= target:
                    break
                if blocks.evictable(victim):
                    blocks.release(victim)
                    self.evictions += 1
            # A prefill that does not fit whole runs the chunk that does.
            room = len(seq.block_table) + blocks.num_free - blocks.copy_needed(seq)
            n = min(n, room * blocks.block_size - seq.num_computed)
            if n <= 0:
                return 0
        blocks.grow(seq, seq.num_computed + n)
        return n

    def complete(self, seq: Sequence, n: int, sampled: bool) -> None:
        """Account a successful forward of n tokens (and a sampled token if `sampled`)."""
        prompt_part = max(0, min(seq.num_computed + n, seq.num_prompt) - seq.num_computed)
        self.prompt_tokens_computed += prompt_part
        self.tokens_computed += n
        request = seq.request
        self.served[request.namespace] = self.served.get(request.namespace, 0.0) + n / request.namespace_weight
        seq.num_computed += n
        self.blocks.commit(seq)
        seq.scheduled = True
        seq.waited = 0
        if sampled:
            seq.slice_tokens += 1
            if seq.slice_tokens >= self.token_quantum:
                seq.ticket, seq.slice_tokens, seq.boost = self.next_ticket(), 0, 0

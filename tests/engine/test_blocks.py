"""Block manager: per-owner accounting, prefix sharing by reference count, reuse of cached blocks;
the scheduler's interrupt steps."""
from __future__ import annotations

import torch

from llmosd.engine.block_manager import BlockManager
from llmosd.engine.scheduler import Scheduler
from llmosd.engine.sequence import Request, Sequence


def _seq(tokens: list[int], owner: int = 1, priority: int = 0) -> Sequence:
    return Sequence(
        id=0, request=Request(prompt_ids=tokens, owner=owner, priority=priority), token_ids=list(tokens), num_prompt=len(tokens),
        max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, generator=torch.Generator(), output=None,
        on_event=lambda e: None, ticket=0,
    )


def _run(bm: BlockManager, seq: Sequence) -> int:
    """Admit a sequence as the scheduler does and mark its prompt computed; return the cache hit."""
    hit = bm.match_prefix(seq)
    assert bm.grow(seq, len(seq.token_ids))
    seq.num_computed = len(seq.token_ids)
    bm.commit(seq)
    return hit


def test_owner_accounting_and_free() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = _seq(list(range(10)), owner=7), _seq(list(range(100, 105)), owner=8)
    _run(bm, a)
    _run(bm, b)
    assert (bm.used_by(7), bm.used_by(8), bm.num_free) == (3, 2, 5)
    bm.release(a)
    assert (bm.used_by(7), bm.num_free) == (0, 8)
    assert not bm.grow(_seq(list(range(40))), 40)  # 10 blocks needed, 8 free: nothing taken
    assert bm.num_free == 8


def test_prefix_blocks_are_shared_by_reference_count() -> None:
    bm = BlockManager(num_blocks=12, block_size=4)
    prefix = list(range(50, 62))  # three full blocks
    a, b = _seq(prefix + [1, 2, 3], owner=1), _seq(prefix + [9, 9], owner=2)
    assert _run(bm, a) == 0
    assert _run(bm, b) == 12  # the whole shared prefix comes from the cache
    assert a.block_table[:3] == b.block_table[:3] and a.block_table[3] != b.block_table[3]
    assert [bm.ref[x] for x in a.block_table[:3]] == [2, 2, 2]
    assert bm.num_used == 5  # 3 shared + 1 tail each
    assert bm.used_by(1) == 4 and bm.used_by(2) == 4
    bm.release(a)
    assert [bm.ref[x] for x in b.block_table[:3]] == [1, 1, 1] and bm.num_used == 4
    bm.release(b)
    assert bm.num_used == 0
    # Freed blocks keep their hashes: a later request with the prefix takes them back.
    c = _seq(prefix + [4], owner=3)
    assert _run(bm, c) == 12
    # A different block at the start breaks the chain: equal later blocks are not matched.
    d = _seq([0, 0, 0, 0] + prefix[4:] + [4], owner=3)
    assert _run(bm, d) == 0


def test_fully_cached_prompt_keeps_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    _run(bm, _seq(tokens))
    again = _seq(tokens)
    assert bm.match_prefix(again) == 4  # the last block is recomputed: its last token needs logits


def test_reuse_forgets_overwritten_prefixes() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    a = _seq(list(range(5)))
    _run(bm, a)
    bm.release(a)
    b = _seq(list(range(20, 25)))
    _run(bm, b)  # takes both blocks, the cached prefix of a among them
    bm.release(b)
    assert bm.match_prefix(_seq(list(range(5)))) == 0


def test_interrupt_step_leaves_the_paused_batch_alone() -> None:
    """An interrupt step runs only the more important sequences and takes no blocks from the
    paused step's sequences, which a regular step would evict for a more important prefill."""
    bm = BlockManager(num_blocks=4, block_size=4)
    sch = Scheduler(bm, max_batch=8, max_step_tokens=64, token_quantum=100, aging_steps=100)
    low, high = _seq(list(range(8))), _seq(list(range(50, 62)), priority=5)
    sch.add(low)
    assert sch.schedule() == [(low, 8)]  # the step in flight: 2 of the 4 blocks
    sch.add(high)
    assert sch.schedule(above=0, busy={low}) == [(high, 8)]  # a chunk in the 2 free blocks
    assert len(low.block_table) == 2 and (sch.evictions, sch.preemptions) == (0, 0)
    bm.release(high)
    assert sch.schedule() == [(high, 12)] and sch.evictions == 1  # a regular step evicts low


def test_fork_shares_all_blocks_and_copies_the_partial_one_on_write() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    source = _seq(list(range(10)), owner=3)  # two full blocks and a partly filled one
    _run(bm, source)
    fork = _seq(list(range(10)), owner=3)
    bm.share(source, fork)
    assert fork.block_table == source.block_table and fork.num_computed == 10
    assert [bm.ref[b] for b in source.block_table] == [2, 2, 2] and bm.used_by(3) == 3
    assert bm.needed(fork, 11) == 1  # its next token goes into the shared partial block: a copy
    tail = source.block_table[2]
    assert bm.grow(fork, 11)
    assert fork.block_table[:2] == source.block_table[:2] and fork.block_table[2] != tail
    assert bm.copies == [(tail, fork.block_table[2])] and bm.ref[tail] == 1
    assert bm.needed(source, 11) == 0  # alone in it now: writes in place
    # Full blocks are never copied: a fork at a block boundary grows into a fresh block.
    aligned = _seq(list(range(8)), owner=3)
    aligned.block_table, aligned.num_computed = [], 0
    bm.share(_prefix(source, 8), aligned)
    assert bm.needed(aligned, 9) == 1 and bm.copy_needed(aligned) == 0


def _prefix(seq: Sequence, n: int) -> Sequence:
    view = _seq(seq.token_ids[:n], owner=seq.owner)
    view.block_table, view.num_computed = seq.block_table[: n // 4], n
    return view


def test_truncate_keeps_a_prefix_and_never_rewrites_a_cached_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(list(range(11)))
    _run(bm, seq)  # blocks 0-1 full (cached), block 2 holds 3 tokens
    table = list(seq.block_table)
    bm.truncate(seq, 10)  # the cut falls in the uncached partial block: it is kept
    assert (seq.block_table, seq.num_computed) == (table, 10)
    bm.truncate(seq, 6)  # the cut falls in a cached full block: it is left to the cache, recomputed
    assert (seq.block_table, seq.num_computed, len(seq.block_hashes)) == (table[:1], 4, 1)
    assert bm.num_used == 1 and bm.hash[table[1]] is not None

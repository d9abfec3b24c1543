"""Block accounting for the paged KV cache: block tables, owners, and prefix caching.

A full block is identified by a hash chained over every token before and in it, so equal hashes
mean equal prefixes. Sequences whose prompts share full blocks share those blocks by reference
count: the prefix is neither recomputed nor stored twice. A block whose count drops to zero goes
to the free list but keeps its hash, so a later request with the same prefix can take it back
until the block is handed out for something else (least recently freed first).

A forked context (contexts.py) shares all of its source's blocks, the partly filled last one
too. Full blocks are never written again; the first write into a shared partly filled block
copies it (copy on write): grow() takes a fresh block and queues (source, copy) in `copies`,
which the engine applies to the KV tensors before the forward pass.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict

from .sequence import Sequence


def chain_hash(prev: bytes, tokens: list[int]) -> bytes:
    """Hash of a full block given the hash of the blocks before it."""
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Hands out block ids; knows each block's reference count, hash and the owners using it."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.hash: list[bytes | None] = [None] * num_blocks
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.owners: dict[int, Counter[int]] = {}
        self.copies: list[tuple[int, int]] = []  # (source, copy) block pairs to copy before the next forward

    @property
    def num_free(self) -> int:
        return len(self.free)

    def used_by(self, owner: int) -> int:
        """Distinct blocks the owner's sequences hold (a block shared by two owners counts for both)."""
        return len(self.owners.get(owner, ()))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, seq: Sequence, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1
        self.owners.setdefault(seq.owner, Counter())[block] += 1
        seq.block_table.append(block)

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks the cached blocks of its longest cached prefix; return its length.

        The last token is never taken from the cache: its logits are needed."""
        assert not seq.block_table
        bs, prev = self.block_size, b""
        for i in range((len(seq.token_ids) - 1) // bs):
            chunk = seq.token_ids[i * bs : (i + 1) * bs]
            h = chain_hash(prev, chunk)
            block = self.by_hash.get(h)
            if block is None or self.tokens[block] != tuple(chunk):
                break
            self._take(seq, block)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed = len(seq.block_table) * bs
        return seq.num_computed

    def new_block_hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Hashes of the full blocks the sequence completes by processing up to num_tokens tokens
        (beyond those already registered). The last token never counts: it is not cacheable."""
        bs = self.block_size
        out, prev = [], seq.block_hashes[-1] if seq.block_hashes else b""
        for i in range(len(seq.block_hashes), min(num_tokens, len(seq.token_ids) - 1) // bs):
            prev = chain_hash(prev, seq.token_ids[i * bs : (i + 1) * bs])
            out.append(prev)
        return out

    def copy_needed(self, seq: Sequence) -> int:
        """1 if the next token goes into a partly filled block that another holder shares."""
        bs, n = self.block_size, seq.num_computed
        return int(n % bs != 0 and len(seq.block_table) > n // bs and self.ref[seq.block_table[n // bs]] > 1)

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        """Free blocks grow(seq, num_tokens) takes."""
        return self.blocks_for(num_tokens) - len(seq.block_table) + self.copy_needed(seq)

    def _fresh(self, seq: Sequence) -> None:
        block = next(iter(self.free))
        old = self.hash[block]
        if old is not None:  # the cached prefix it held is forgotten now
            if self.by_hash.get(old) == block:
                del self.by_hash[old]
            self.hash[block] = self.tokens[block] = None
        self._take(seq, block)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Add blocks so the table covers num_tokens tokens, copying a shared partly filled last
        block first; False (and nothing taken) if too few are free."""
        need = self.needed(seq, num_tokens)
        if need > len(self.free):
            return False
        if self.copy_needed(seq):
            shared = seq.block_table.pop()  # the last block: the ones after it are not filled yet
            self._drop(seq.owner, [shared])
            self._fresh(seq)
            self.copies.append((shared, seq.block_table[-1]))
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            self._fresh(seq)
        return True

    def share(self, source: Sequence, holder: Sequence) -> None:
        """Give a holder without blocks every block of source (a fork), and its computed tokens."""
        assert not holder.block_table
        for block in source.block_table:
            self._take(holder, block)
        holder.block_hashes = list(source.block_hashes)
        holder.num_computed = source.num_computed

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            chunk = seq.token_ids[i * bs : (i + 1) * bs]
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else b"", chunk)
            block = seq.block_table[i]
            if h not in self.by_hash and self.hash[block] is None:
                self.by_hash[h], self.hash[block], self.tokens[block] = block, h, tuple(chunk)
            seq.block_hashes.append(h)

    def _drop(self, owner: int, blocks: list[int]) -> None:
        counts = self.owners[owner]
        # Last blocks first, so that shared prefixes stay cached longest.
        for block in reversed(blocks):
            self.ref[block] -= 1
            counts[block] -= 1
            if not counts[block]:
                del counts[block]
            if self.ref[block] == 0:
                self.free[block] = None
                if self.hash[block] is None:  # nothing worth keeping: hand it out first
                    self.free.move_to_end(block, last=False)
        if not counts:
            del self.owners[owner]

    def release(self, seq: Sequence) -> None:
        """Drop all of the sequence's blocks; its K/V must be recomputed if it runs again."""
        self.truncate(seq, 0)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep the K/V of the first num_tokens computed tokens only (fewer when the cut falls in
        a block of the prefix cache: it stays there as it is, and the tokens are recomputed)."""
        bs = self.block_size
        keep = min(num_tokens, seq.num_computed)
        kept_blocks = keep // bs
        if keep % bs and self.hash[seq.block_table[kept_blocks]] is None:
            kept_blocks += 1  # a partly kept block nobody else can look up: later tokens overwrite it
        else:
            keep = kept_blocks * bs
        if len(seq.block_table) > kept_blocks:
            self._drop(seq.owner, seq.block_table[kept_blocks:])
            del seq.block_table[kept_blocks:]
        del seq.block_hashes[keep // bs :]
        seq.num_computed = keep

    def evictable(self, seq: Sequence) -> int:
        """Blocks that releasing this sequence would free."""
        return sum(1 for b in seq.block_table if self.ref[b] == 1)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

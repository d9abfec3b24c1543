"""One attention function over the paged KV cache, with two backends chosen at start-up.

The model runs on a *packed* batch: the new tokens of every scheduled sequence concatenated
(batch 1). Sequence i contributes q_lens[i] new tokens and, after they are written to the cache,
has kv_lens[i] keys: the new tokens attend causally to everything before them ("causal with
offset", bottom-right aligned). Sequences with one new token (decodes) come first.

- CUDA: `xformers.ops.memory_efficient_attention` over the whole packed batch, GQA through the
  5-D BMGHK layout (q as [1, T, kv_heads, group, D], k/v expanded with stride 0 over the group,
  the same head mapping as HF's repeat_kv). Packed prefill with nothing cached uses
  BlockDiagonalCausalMask on the fresh keys; otherwise the cache blocks are gathered into a padded
  layout for BlockDiagonalCausalWithOffsetPaddedKeysMask. (The Paged* biases would avoid the
  gather, but only run on fa3, or fa2/triton with page sizes of 256/64, and not in fp32.)
- CPU: in float32, all decodes in one call of a C kernel that reads the blocks where they lie
  (`_cpu_kernels.c`); without it, or in half precision, torch `scaled_dot_product_attention` on
  the decodes' blocks gathered with one index (a key-length mask per sequence, none when all
  lengths agree). Each prefill runs on its own through SDPA. Never a dense mask over the whole
  packed batch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from . import cpu_kernels

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit: built once per step, shared by every layer."""

    q_lens: list[int]  # new tokens per sequence, in packed order (decodes first)
    kv_lens: list[int]  # keys per sequence after this step's tokens are cached
    positions: torch.Tensor  # [T] position of each new token
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] physical block ids, padded with 0
    block_size: int
    num_decodes: int  # leading sequences with one new token
    prepared: dict[str, Any] = field(default_factory=dict)  # backend state shared by the layers


def build_metadata(
    q_lens: list[int], kv_lens: list[int], block_tables: list[list[int]], block_size: int, device: torch.device
) -> AttentionMetadata:
    """Positions, cache slots and a padded block table for a packed batch."""
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
    q = torch.tensor(q_lens, dtype=torch.long)
    kv = torch.tensor(kv_lens, dtype=torch.long)
    seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens)), q)
    starts = torch.cumsum(q, 0) - q
    positions = torch.arange(int(q.sum())) - starts[seq_of_token] + (kv - q)[seq_of_token]
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    num_decodes = 0
    while num_decodes < len(q_lens) and q_lens[num_decodes] == 1:
        num_decodes += 1
    return AttentionMetadata(
        q_lens=list(q_lens),
        kv_lens=list(kv_lens),
        positions=positions.to(device),
        slot_mapping=slots.to(device),
        block_tables=tables.to(device),
        block_size=block_size,
        num_decodes=num_decodes,
    )


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build per-step state (masks, biases) once, before the layers run."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Cache k/v ([T, kv_heads, D]) and return attention of q ([T, heads, D]) as [T, heads * D]."""


def write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's keys and values in their cache slots (cache: [blocks, block_size, kv_heads, D])."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, max_blocks * block_size, kv_heads, D], one index op."""
    g = cache[tables]
    return g.view(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


class TorchSDPABackend:
    """CPU attention: decodes batched (the C kernel, or SDPA over gathered blocks), prefills one
    sequence at a time through SDPA."""

    name = "torch-sdpa"

    def __init__(self, paged_kernel: bool = False) -> None:
        """paged_kernel: decode with cpu_kernels.paged_decode (float32 CPU caches only) when it is built."""
        self.paged_kernel = paged_kernel and cpu_kernels.available
        if self.paged_kernel:
            self.name = "paged-decode+torch-sdpa"
        # The decode gather reuses one buffer per cache across layers and steps: a fresh
        # allocation per layer costs page faults that showed up as a third of attention time.
        self._scratch: dict[str, torch.Tensor] = {}

    def _gather(self, name: str, cache: torch.Tensor, blocks: torch.Tensor, seqs: int) -> torch.Tensor:
        """The listed blocks ([seqs * width] ids) of cache as [seqs, width * block_size, kv_heads, D]."""
        shape = (blocks.numel(), *cache.shape[1:])
        numel = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = self._scratch[name] = torch.empty(numel, dtype=cache.dtype, device=cache.device)
        out = torch.index_select(cache, 0, blocks, out=buf[:numel].view(shape))
        return out.view(seqs, -1, *cache.shape[2:])

    def prepare(self, meta: AttentionMetadata) -> None:
        nd = meta.num_decodes
        if not nd:
            return
        lens = meta.kv_lens[:nd]
        if self.paged_kernel:
            meta.prepared["decode_lens"] = torch.tensor(lens, dtype=torch.long)
            return
        width = -(-max(lens) // meta.block_size)
        meta.prepared["decode_blocks"] = meta.block_tables[:nd, :width].flatten()
        if min(lens) == max(lens):
            # Equal lengths (lock-step decoding): slice the keys, no mask at all.
            meta.prepared["decode_len"] = lens[0]
            meta.prepared["decode_mask"] = None
        else:
            keys = torch.arange(width * meta.block_size, device=meta.positions.device)
            kv = torch.tensor(lens, device=keys.device)
            meta.prepared["decode_len"] = width * meta.block_size
            meta.prepared["decode_mask"] = (keys[None, :] < kv[:, None])[:, None, None, :]

    def __call__(self, q, k, v, k_cache, v_cache, meta, scale):
        write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        t, heads, d = q.shape
        kv_heads = k.shape[1]
        nd = meta.num_decodes
        out = torch.empty_like(q) if nd < t else None
        if nd:
            p = meta.prepared
            if self.paged_kernel:
                o = cpu_kernels.paged_decode(q[:nd], k_cache, v_cache, meta.block_tables, p["decode_lens"], scale)
            else:
                n = p["decode_len"]
                keys = self._gather("k", k_cache, p["decode_blocks"], nd)[:, :n].transpose(1, 2)
                vals = self._gather("v", v_cache, p["decode_blocks"], nd)[:, :n].transpose(1, 2)
                # One query per sequence: the group's query heads become the query rows of their KV head.
                qd = q[:nd].view(nd, kv_heads, heads // kv_heads, d)
                o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=p["decode_mask"], scale=scale)
            if out is None:  # a decode-only step: no prefill output to place beside it
                return o.reshape(t, heads * d)
            out[:nd] = o.reshape(nd, heads, d)
        start = nd
        for i in range(nd, len(meta.q_lens)):
            ql, kl = meta.q_lens[i], meta.kv_lens[i]
            qi = q[start : start + ql].transpose(0, 1).unsqueeze(0)
            if kl == ql:  # nothing cached before these tokens: plain causal attention on the fresh keys
                ki, vi, mask = k[start : start + ql], v[start : start + ql], None
            else:
                nb = -(-kl // meta.block_size)
                ki = gather_blocks(k_cache, meta.block_tables[i : i + 1, :nb])[0, :kl]
                vi = gather_blocks(v_cache, meta.block_tables[i : i + 1, :nb])[0, :kl]
                mask = torch.ones(ql, kl, dtype=torch.bool, device=q.device).tril(kl - ql)
            o = F.scaled_dot_product_attention(
                qi,
                ki.transpose(0, 1).unsqueeze(0),
                vi.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[start : start + ql] = o[0].transpose(0, 1)
            start += ql
        return out.view(t, heads * d)


class XformersBackend:
    """xformers memory_efficient_attention over the packed batch (CUDA)."""

    name = "xformers"

    def __init__(self, device: torch.device) -> None:
        from xformers.ops import fmha, memory_efficient_attention

        self._fmha = fmha
        self._attend = memory_efficient_attention
        # Importing succeeds even when the kernels do not match this torch/CUDA; a tiny call tells.
        x = torch.zeros(1, 2, 1, 1, 8, device=device, dtype=torch.float16)
        memory_efficient_attention(x, x, x)

    def prepare(self, meta: AttentionMetadata) -> None:
        bias_types = self._fmha.attn_bias
        device = meta.positions.device
        if meta.q_lens == meta.kv_lens:
            meta.prepared["bias"] = bias_types.BlockDiagonalCausalMask.from_seqlens(meta.q_lens, device=device)
            meta.prepared["tables"] = None
        else:
            width = -(-max(meta.kv_lens) // meta.block_size)
            meta.prepared["tables"] = meta.block_tables[:, :width]
            meta.prepared["bias"] = bias_types.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen=meta.q_lens, kv_padding=width * meta.block_size, kv_seqlen=meta.kv_lens, device=device
            )

    def __call__(self, q, k, v, k_cache, v_cache, meta, scale):
        write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        t, heads, d = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        tables = meta.prepared["tables"]
        if tables is None:
            keys, vals = k.unsqueeze(0), v.unsqueeze(0)
        else:
            keys = gather_blocks(k_cache, tables).flatten(0, 1).unsqueeze(0)
            vals = gather_blocks(v_cache, tables).flatten(0, 1).unsqueeze(0)
        n = keys.shape[1]
        o = self._attend(
            q.view(1, t, kv_heads, group, d),
            keys.unsqueeze(3).expand(1, n, kv_heads, group, d),
            vals.unsqueeze(3).expand(1, n, kv_heads, group, d),
            attn_bias=meta.prepared["bias"],
            scale=scale,
        )
        return o.reshape(t, heads * d)


def select_backend(device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """xformers on CUDA (torch SDPA if xformers cannot load there), the CPU backend on CPU; logged."""
    backend: AttentionBackend
    if device.type == "cuda":
        try:
            backend = XformersBackend(device)
        except Exception as exc:  # no xformers, or a build that does not match this torch/CUDA
            log.warning("xformers unavailable on %s (%s); attention falls back to torch SDPA", device, exc)
            backend = TorchSDPABackend()
    else:
        backend = TorchSDPABackend(paged_kernel=dtype == torch.float32)
    log.info("attention backend: %s on %s", backend.name, device)
    return backend

"""The attention backends against a per-sequence reference and xformers' bias semantics.

The CPU backend's tests run everywhere; only those of xformers (its biases as the oracle of what
the CUDA backend computes, and the CUDA backend itself) skip without xformers or a GPU."""
from __future__ import annotations

import pytest
import torch

from llmosd.engine.attention import TorchSDPABackend, XformersBackend, build_metadata, gather_blocks

BS, HEADS, KV_HEADS, D, BLOCKS = 4, 6, 2, 8, 40
SCALE = D**-0.5

# (new tokens, keys after the step) per sequence; decodes first, as the runner packs them.
MIXES = {
    "decode": [(1, 9), (1, 1), (1, 16), (1, 13)],
    "decode-equal": [(1, 11), (1, 11), (1, 11)],
    "prefill": [(7, 7), (4, 4), (9, 9)],
    "prefill-behind-cache": [(5, 13), (3, 3), (8, 16), (1, 6)],
    "mixed": [(1, 10), (1, 3), (6, 6), (2, 14), (5, 5)],
}


def _setup(lens: list[tuple[int, int]], device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Random per-sequence keys/values stored in randomly placed blocks; the new tokens' q/k/v packed."""
    g = torch.Generator().manual_seed(len(lens) * 31 + sum(q for q, _ in lens))
    perm = torch.randperm(BLOCKS, generator=g).tolist()
    k_cache = torch.randn(BLOCKS, BS, KV_HEADS, D, generator=g)
    v_cache = torch.randn(BLOCKS, BS, KV_HEADS, D, generator=g)
    tables, seqs, q, k, v = [], [], [], [], []
    for ql, kl in lens:
        nb = -(-kl // BS)
        table = [perm.pop() for _ in range(nb)]
        keys, vals = torch.randn(kl, KV_HEADS, D, generator=g), torch.randn(kl, KV_HEADS, D, generator=g)
        for p in range(kl - ql):  # the cached part is in the cache already
            k_cache[table[p // BS], p % BS], v_cache[table[p // BS], p % BS] = keys[p], vals[p]
        tables.append(table)
        seqs.append((keys, vals))
        q.append(torch.randn(ql, HEADS, D, generator=g))
        k.append(keys[kl - ql :])
        v.append(vals[kl - ql :])
    meta = build_metadata([a for a, _ in lens], [b for _, b in lens], tables, BS, torch.device(device))
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return meta, to(torch.cat(q)), to(torch.cat(k)), to(torch.cat(v)), to(k_cache), to(v_cache), seqs


def _reference(lens, q, seqs) -> torch.Tensor:
    """Plain per-sequence attention: query r of a sequence with ql new of kl keys sees keys <= kl - ql + r."""
    out, start = [], 0
    for (ql, kl), (keys, vals) in zip(lens, seqs):
        qi = q[start : start + ql].float()
        ki = keys.repeat_interleave(HEADS // KV_HEADS, dim=1)  # HF repeat_kv head mapping
        vi = vals.repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * SCALE
        allowed = torch.ones(ql, kl, dtype=torch.bool).tril(kl - ql)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, vi).reshape(ql, HEADS * D))
        start += ql
    return torch.cat(out)


def _dense_with_mask(q, keys, vals, mask) -> torch.Tensor:
    """Attention of packed q over keys [N, kv_heads, D] with an additive [T, N] mask."""
    ki = keys.repeat_interleave(HEADS // KV_HEADS, dim=1)
    vi = vals.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, ki) * SCALE + mask
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi).reshape(q.shape[0], -1)


# The CPU backend decodes with the C kernel (float32) or with SDPA over gathered blocks.
DECODE_PATHS = pytest.mark.parametrize("paged_kernel", [False, True], ids=["gather-sdpa", "paged-kernel"])


@DECODE_PATHS
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_cpu_backend_matches_reference(mix: str, paged_kernel: bool) -> None:
    lens = MIXES[mix]
    meta, q, k, v, k_cache, v_cache, seqs = _setup(lens)
    backend = TorchSDPABackend(paged_kernel)
    backend.prepare(meta)
    out = backend(q, k, v, k_cache, v_cache, meta, SCALE)
    torch.testing.assert_close(out, _reference(lens, q, seqs), atol=1e-5, rtol=1e-5)


@DECODE_PATHS
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_cpu_backend_matches_xformers_bias_semantics(mix: str, paged_kernel: bool) -> None:
    """The xformers biases the CUDA path uses, materialised, as the oracle."""
    attn_bias = pytest.importorskip("xformers.ops.fmha", reason="xformers (the CUDA backend's library) is not installed").attn_bias
    lens = MIXES[mix]
    q_lens, kv_lens = [a for a, _ in lens], [b for _, b in lens]
    meta, q, k, v, k_cache, v_cache, _ = _setup(lens)
    backend = TorchSDPABackend(paged_kernel)
    backend.prepare(meta)
    out = backend(q, k, v, k_cache, v_cache, meta, SCALE)  # also writes the new keys to the cache
    t = sum(q_lens)
    # Padded-keys layout (what the CUDA backend gathers into).
    width = meta.block_tables.shape[1]
    bias = attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=q_lens, kv_padding=width * BS, kv_seqlen=kv_lens, device=torch.device("cpu")
    )
    keys = gather_blocks(k_cache, meta.block_tables).flatten(0, 1)
    vals = gather_blocks(v_cache, meta.block_tables).flatten(0, 1)
    mask = bias.materialize((t, keys.shape[0]))
    torch.testing.assert_close(out, _dense_with_mask(q, keys, vals, mask), atol=1e-5, rtol=1e-5)
    # Paged layout: the whole physical cache with the paged bias.
    paged = attn_bias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=q_lens, kv_seqlen=kv_lens, block_tables=meta.block_tables.to(torch.int32), page_size=BS,
        device=torch.device("cpu"),
    )
    mask = paged.materialize((t, keys.shape[0]))  # shape of the logical padded layout; returns the physical one
    n = mask.shape[-1]
    phys_k, phys_v = k_cache.view(-1, KV_HEADS, D)[:n], v_cache.view(-1, KV_HEADS, D)[:n]
    torch.testing.assert_close(out, _dense_with_mask(q, phys_k, phys_v, mask), atol=1e-5, rtol=1e-5)
    if q_lens == kv_lens:  # fresh packed prefill: BlockDiagonalCausalMask over the new keys alone
        mask = attn_bias.BlockDiagonalCausalMask.from_seqlens(q_lens, device=torch.device("cpu")).materialize((t, t))
        torch.testing.assert_close(out, _dense_with_mask(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the xformers backend needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_xformers_backend_matches_cpu(mix: str, dtype: torch.dtype) -> None:
    pytest.importorskip("xformers.ops.fmha", reason="xformers is not installed")
    lens = MIXES[mix]
    meta, q, k, v, k_cache, v_cache, seqs = _setup(lens, "cuda", dtype)
    backend = XformersBackend(torch.device("cuda"))
    backend.prepare(meta)
    out = backend(q, k, v, k_cache, v_cache, meta, SCALE).float().cpu()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, _reference(lens, q.float().cpu(), seqs), atol=tol, rtol=tol)

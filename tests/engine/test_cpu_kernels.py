"""The engine's float32 CPU kernels (_cpu_kernels.c) against torch and a float64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmosd.engine.cpu_kernels import available, paged_decode, rms_norm, silu_mul

# The kernels' build is optional (a compiler without OpenMP still installs llmosd, whose engine
# then uses torch alone), but installing llmosd needs a compiler anyway: a missing build is a bug.
assert available, "llmosd.engine._cpu_kernels was not built"


@pytest.mark.parametrize(
    "block_size, heads, kv_heads, dim",
    [(16, 9, 3, 64), (4, 8, 8, 20), (8, 4, 1, 128), (1, 2, 2, 3)],  # head dims that are not whole vectors too
)
def test_paged_decode_kernel_matches_reference(block_size: int, heads: int, kv_heads: int, dim: int) -> None:
    g = torch.Generator().manual_seed(block_size * heads + dim)
    lens = [1, 5, block_size, block_size + 1, 3 * block_size + 2, 200]
    width = max(-(-n // block_size) for n in lens)
    blocks = 2 * width * len(lens)
    k_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=g) * 3  # wide scores: a peaked softmax
    v_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=g)
    tables = torch.randperm(blocks, generator=g)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads + kv_heads, dim, generator=g)[:, :heads]  # rows apart, as the model slices q
    out = paged_decode(q, k_cache, v_cache, tables, torch.tensor(lens), dim**-0.5)
    for i, n in enumerate(lens):
        slots = torch.tensor([int(tables[i, t // block_size]) * block_size + t % block_size for t in range(n)])
        keys = k_cache.view(-1, kv_heads, dim)[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        vals = v_cache.view(-1, kv_heads, dim)[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        probs = (torch.einsum("hd,khd->hk", q[i].double(), keys) * dim**-0.5).softmax(-1)
        torch.testing.assert_close(out[i].double(), torch.einsum("hk,khd->hd", probs, vals), atol=2e-6, rtol=1e-5)


def test_paged_decode_kernel_refuses_bad_input() -> None:
    cache = torch.zeros(4, 2, 1, 8)
    q, tables = torch.zeros(1, 1, 8), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="fit its block table"):
        paged_decode(q, cache, cache, tables, torch.tensor([5]), 1.0)  # 5 keys, room for 4
    with pytest.raises(ValueError, match="at least one"):
        paged_decode(q, cache, cache, tables, torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="float32"):
        paged_decode(q.double(), cache, cache, tables, torch.tensor([1]), 1.0)


@pytest.mark.parametrize("dim", [576, 20, 3])  # whole vectors, and tails
def test_rms_norm_matches_torch(dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(9, dim + 5, generator=g)[:, :dim] * 4  # rows apart
    weight = torch.randn(dim, generator=g)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), F.rms_norm(x, (dim,), weight, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inter", [1536, 20, 3])
def test_silu_mul_matches_torch(inter: int) -> None:
    g = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(5, 2 * inter, generator=g) * 6
    gate_up[0, :4] = torch.tensor([-100.0, -87.5, 0.0, 100.0])  # past exp's range, and zero
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_kernels_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="float32"):
        rms_norm(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="matching weight"):
        rms_norm(torch.zeros(2, 4), torch.zeros(5), 1e-5)
    with pytest.raises(ValueError, match="even width"):
        silu_mul(torch.zeros(2, 5))

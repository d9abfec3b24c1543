"""The engine's float32 CPU kernels (`_cpu_kernels.c`), behind the checks that keep them memory-safe.

The C module's build is optional (it needs OpenMP); `available` says whether it was built, and
without it the engine uses torch ops alone. Each function takes and returns tensors.
"""
from __future__ import annotations

import torch

try:
    from . import _cpu_kernels as _c
except ImportError:  # not built (a compiler without OpenMP)
    _c = None

available = _c is not None


def _float32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one query per sequence (q: [seqs, heads, D], rows may lie apart) over its
    lens[i] cached keys, read from the blocks tables[i] lists (float32 on CPU; see _cpu_kernels.c).
    The block ids are trusted: they come from the engine's own block manager."""
    seqs, heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if not (
        _float32_cpu(q, k_cache, v_cache)
        and tables.dtype == lens.dtype == torch.long and tables.device.type == lens.device.type == "cpu"
        and q.stride(2) == 1 and q.stride(1) == d and k_cache.is_contiguous() and v_cache.is_contiguous()
        and k_cache.shape == v_cache.shape and k_cache.shape[3] == d and tables.stride(1) == 1 and lens.is_contiguous()
        and tables.shape[0] >= seqs and lens.shape[0] >= seqs and heads % kv_heads == 0
    ):
        raise ValueError("paged_decode: float32 CPU tensors of matching shapes")
    out = torch.empty(seqs, heads, d, dtype=q.dtype)
    _c.decode(
        out.data_ptr(), q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_size,
        tables.data_ptr(), tables.stride(0), tables.shape[1], lens.data_ptr(), seqs, heads, kv_heads, d, scale,
        torch.get_num_threads(),
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x ([rows, dim]; they may lie apart), times weight ([dim])."""
    rows, dim = x.shape
    if not (_float32_cpu(x, weight) and x.stride(1) == 1 and weight.shape == (dim,) and weight.is_contiguous()):
        raise ValueError("rms_norm: float32 CPU rows and a matching weight")
    out = torch.empty(rows, dim)
    _c.rms_norm(out.data_ptr(), x.data_ptr(), weight.data_ptr(), rows, dim, x.stride(0), eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for rows of gate_up ([rows, 2 * inter]) that hold gate then up."""
    rows, width = gate_up.shape
    if not (_float32_cpu(gate_up) and gate_up.is_contiguous() and width % 2 == 0):
        raise ValueError("silu_mul: contiguous float32 CPU rows of even width")
    out = torch.empty(rows, width // 2)
    _c.silu_mul(out.data_ptr(), gate_up.data_ptr(), rows, width // 2)
    return out

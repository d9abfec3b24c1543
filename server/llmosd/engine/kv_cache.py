"""The paged KV cache tensors: one pool of fixed-size blocks per layer, sized from a byte budget."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens in every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


@dataclass
class KVCache:
    """k, v: [layers, blocks, block_size, kv_heads, head_dim]; block b of layer l is k[l, b]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, memory_bytes: int, block_size: int, device: torch.device, dtype: torch.dtype
    ) -> "KVCache":
        """As many blocks as fit in memory_bytes (at least one)."""
        blocks = memory_bytes // bytes_per_block(cfg, block_size, dtype)
        if blocks < 1:
            raise ValueError(f"kv_memory_bytes={memory_bytes} holds no block of {block_size} tokens for this model")
        shape = (cfg.num_layers, blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K/V of block src into block dst, for each (src, dst), in every layer."""
        for src, dst in pairs:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

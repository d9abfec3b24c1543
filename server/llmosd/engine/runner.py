"""One forward pass of a scheduled batch: pack the tokens, build the attention metadata, run the model."""
from __future__ import annotations

from typing import Callable

import torch

from .attention import AttentionBackend, build_metadata
from .kv_cache import KVCache
from .model import CausalLM
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, backend: AttentionBackend) -> None:
        self.model, self.kv, self.backend = model, kv, backend

    @torch.inference_mode()
    def run(
        self, batch: list[tuple[Sequence, int]], between_layers: Callable[[], None] | None = None
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Process n pending tokens of each sequence; return the sequences whose pending tokens are
        now all processed (they get a next token) with their fp32 logits, one row each.
        between_layers: see CausalLM.forward."""
        # Decodes first: the CPU backend batches that leading group in one attention call.
        batch = sorted(batch, key=lambda item: item[1] > 1)
        ids: list[int] = []
        q_lens, kv_lens, tables, rows, ready = [], [], [], [], []
        for seq, n in batch:
            ids += seq.token_ids[seq.num_computed : seq.num_computed + n]
            q_lens.append(n)
            kv_lens.append(seq.num_computed + n)
            tables.append(seq.block_table)
            if seq.num_computed + n == len(seq.token_ids):
                rows.append(len(ids) - 1)
                ready.append(seq)
        device = self.model.device
        meta = build_metadata(q_lens, kv_lens, tables, self.kv.block_size, device)
        self.backend.prepare(meta)
        logits = self.model(
            torch.tensor(ids, device=device), meta, self.kv, self.backend,
            torch.tensor(rows, dtype=torch.long, device=device), between_layers,
        )
        return ready, logits

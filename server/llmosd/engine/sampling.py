"""Choosing the next token (greedy, temperature, top-k, top-p with a per-request generator) and
turning tokens into output text that stops at stop strings."""
from __future__ import annotations

import torch

from .tokenizer import IncrementalDetokenizer


def sample(logits: torch.Tensor, params: list[tuple[float, float, int, torch.Generator]]) -> list[int]:
    """One token per row of fp32 logits [B, V]; params[i] = (temperature, top_p, top_k, generator).

    Each row is sampled with its own request's generator on CPU, so a request's tokens depend on
    its seed and logits only, not on which other requests share the batch."""
    logits = logits.cpu()
    out = logits.argmax(dim=-1).tolist()  # greedy rows are done here
    for i, (temperature, top_p, top_k, generator) in enumerate(params):
        if temperature == 0:
            continue
        row = logits[i] / temperature
        if 0 < top_k < row.numel():
            row = row.masked_fill(row < torch.topk(row, top_k).values[-1], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
        out[i] = int(torch.multinomial(probs, 1, generator=generator))
    return out


class OutputText:
    """The text of one request's output: detokenised incrementally, cut at the first stop string.

    While stop strings are set, the last (longest stop - 1) characters are held back, because they
    might be the start of a stop string that the next token completes."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop: list[str]) -> None:
        self.detokenizer = detokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text to emit now, whether a stop string ended the output)."""
        start = max(0, len(self.text) - self.hold)
        self.text += self.detokenizer.push(token_id)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            delta, self.sent = self.text[self.sent : end], end
            self.text = self.text[:end]
            return delta, True
        safe = max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : safe], safe
        return delta, False

    def flush(self) -> str:
        """The held-back rest, at the end of a request that did not hit a stop string."""
        self.text += self.detokenizer.flush()
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta

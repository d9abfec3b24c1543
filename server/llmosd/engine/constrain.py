"""Structured generation: outputs that match a JSON schema, a regex or a grammar.

llguidance compiles a request's constraint when it is submitted (a typical schema: ~2 ms) and
gives the sequence a matcher. Each step, the sampled rows that carry a matcher get its bitmask of
allowed tokens and every other logit is set to -inf before sampling, so constrained and free
sequences share the batch. A constrained sequence ends ("stop") when it samples EOS, which the
mask allows only where the grammar accepts, or as soon as the grammar allows nothing more;
max_tokens reached first ends it with "length", its output an unfinished match.

llguidance rather than xgrammar, measured on 2 cores with SmolLM2's 49,152-token vocabulary:
schema compile 1.5-2 ms vs 27-67 ms, a step's masks for 16 sequences 0.13-0.22 ms vs 0.04-0.30
ms (both far below a decode step), no dependencies vs torch, transformers and triton, and
error messages fit for the caller.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import numpy as np
import torch

from .sequence import InvalidRequest, Sequence
from .tokenizer import ByteTokenizer, Tokenizer

# JSON written as json.dumps writes it: fixed separators and no free whitespace, whose unbounded
# runs would let a weak model wander. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> str | None:
        """Consume a sampled token; the library's error if the grammar refuses it."""
        if self.matcher.consume_token(token):
            return None
        return self.matcher.get_error() or f"token {token} is outside the grammar"

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more (the output is a whole match)."""
        return self.matcher.is_stopped()


def _byte_vocabulary(tokenizer: ByteTokenizer) -> llguidance.TokenizerWrapper:
    """The built-in byte tokenizer as llguidance sees a tokenizer: each token's bytes."""

    class Vocabulary:
        eos_token_id = tokenizer.eos_token_ids[0]
        bos_token_id = tokenizer.bos_token_id
        tokens = [bytes([i]) for i in range(256)] + [s.encode() for s in tokenizer.SPECIALS]
        special_token_ids = list(range(256, tokenizer.vocab_size))

        def __call__(self, text: bytes) -> list[int]:
            return list(text)

    return llguidance.TokenizerWrapper(Vocabulary())


def _bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """Rows of allowed-token bits, 32 tokens an int32 (llguidance's layout), all allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


class Grammars:
    """Compiles constraints for one model's vocabulary and masks logits with them.

    compile() runs in the submitting thread; masks are filled on the engine thread only."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._source, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._vocabulary: llguidance.LLTokenizer | None = None
        self._bitmask = _bitmask(1, vocab_size)
        self._executor = llguidance.LLExecutor(num_threads=torch.get_num_threads())  # fills rows in parallel

    def _tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on first use (~0.2 s for 49k tokens)."""
        with self._lock:
            if self._vocabulary is None:
                source = self._source
                if isinstance(source, ByteTokenizer):
                    base: Any = _byte_vocabulary(source)
                elif hasattr(source, "backend"):  # a `tokenizers` tokenizer: its JSON has everything
                    base = source.backend.to_str()
                else:
                    raise InvalidRequest("this model's tokenizer does not support constrained generation")
                try:
                    self._vocabulary = llguidance.LLTokenizer(base, n_vocab=self.vocab_size, eos_token=self._eos)
                except Exception as exc:  # a tokenizer llguidance cannot read: the request cannot be served
                    raise InvalidRequest(f"constrained generation is unavailable for this model's tokenizer: {exc}") from None
            return self._vocabulary

    def compile(
        self, json_schema: Any = None, regex: Any = None, grammar: Any = None, lark: str | None = None
    ) -> Constraint | None:
        """A matcher for the one constraint given (None if none); InvalidRequest with the library's
        message for a bad one. `lark` is a grammar the engine built itself (tool calls)."""
        named = (("json_schema", json_schema), ("regex", regex), ("grammar", grammar), ("tools", lark))
        given = [(k, v) for k, v in named if v is not None]
        if not given:
            return None
        if len(given) > 1:
            raise InvalidRequest(f"give at most one constraint, got {', '.join(k for k, _ in given)}")
        kind, value = given[0]
        try:
            if kind == "json_schema":
                schema = json.loads(value) if isinstance(value, str) else value
                if not isinstance(schema, dict):
                    raise InvalidRequest("json_schema must be a JSON object (a dict or its text)")
                source = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            elif kind == "tools":
                source = llguidance.LLMatcher.grammar_from_lark(value)
            elif not isinstance(value, str) or not value:
                raise InvalidRequest(f"{kind} must be non-empty text")
            elif kind == "regex":
                source = llguidance.LLMatcher.grammar_from_regex(value)
            else:
                source = llguidance.grammar_from("gbnf", value)  # GBNF, or Lark as it is
        except (ValueError, TypeError) as exc:  # bad JSON text, a GBNF conversion error
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(f"{kind}: {exc}") from None
        matcher = llguidance.LLMatcher(self._tokenizer(), source, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"{kind}: {matcher.get_error()}")
        return Constraint(matcher)

    @torch.inference_mode()
    def mask(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Set to -inf, in place, the logits of tokens each constrained row's grammar forbids.
        logits: [len(seqs), >= vocab_size], row i sampled for seqs[i]."""
        rows = [i for i, seq in enumerate(seqs) if seq.constraint is not None]
        if not rows:
            return
        if self._bitmask.shape[0] < len(rows):
            self._bitmask = _bitmask(len(rows), self.vocab_size)
        bitmask = self._bitmask[: len(rows)]
        # What llguidance.torch.fill_next_token_bitmask_par does; that module is not imported, as its
        # import compiles a kernel with torch.compile, which imports dynamo and inductor (1.5-4 s of
        # the server's start) for a kernel this engine does not use.
        self._executor.unsafe_compute_mask_ptr(
            [(seqs[i].constraint.matcher, j) for j, i in enumerate(rows)], bitmask.data_ptr(), bitmask.shape[1] * 4,
            len(rows),
        )
        bits = np.unpackbits((~bitmask).numpy().view(np.uint8), axis=1, bitorder="little")  # 1: forbidden
        forbidden = torch.from_numpy(bits[:, : logits.shape[1]].view(np.bool_)).to(logits.device)
        if forbidden.shape[1] < logits.shape[1]:  # logits past the vocabulary (padding rows of lm_head)
            forbidden = torch.nn.functional.pad(forbidden, (0, logits.shape[1] - forbidden.shape[1]), value=True)
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(forbidden, float("-inf"))

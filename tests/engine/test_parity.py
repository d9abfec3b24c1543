"""Parity with Hugging Face transformers on random tiny checkpoints (fp32)."""
from __future__ import annotations

import pathlib

import pytest
import torch

from llmosd.engine import Engine, EngineConfig, Request, load_model
from llmosd.engine.attention import TorchSDPABackend, build_metadata
from llmosd.engine.kv_cache import KVCache
from make_checkpoint import write_checkpoint

transformers = pytest.importorskip("transformers")

CASES = {
    # GQA (4 query heads on 2 KV heads), untied head, head_dim 24 != hidden / heads.
    "llama-gqa-untied": dict(arch="llama", overrides={"head_dim": 24}),
    # Tied embeddings and llama3 RoPE scaling (small original length so all three bands occur).
    "llama-tied-llama3": dict(
        arch="llama",
        overrides={
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2-bias": dict(arch="qwen2", overrides={"num_key_value_heads": 1}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    case = CASES[request.param]
    return write_checkpoint(tmp_path_factory.mktemp(request.param), arch=case["arch"], seed=11, overrides=case["overrides"])


def _hf(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompt(n: int, vocab: int, seed: int = 5) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits_in_chunks(path: pathlib.Path, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits of every prompt position, computed chunk by chunk on the paged cache (later chunks
    attend to earlier ones through the cache), with blocks deliberately out of order."""
    loaded = load_model(str(path))
    kv = KVCache.allocate(loaded.config, 2 << 20, 16, torch.device("cpu"), torch.float32)
    blocks = -(-len(ids) // 16)
    table = list(range(kv.num_blocks - 1, kv.num_blocks - 1 - blocks, -1))
    backend, out, done = TorchSDPABackend(), [], 0
    for n in chunks:
        meta = build_metadata([n], [done + n], [table], 16, torch.device("cpu"))
        backend.prepare(meta)
        out.append(loaded.model(torch.tensor(ids[done : done + n]), meta, kv, backend, torch.arange(n)))
        done += n
    return torch.cat(out)


def test_logits_match_transformers(checkpoint: pathlib.Path) -> None:
    ids = _prompt(45, 512)
    expected = _hf(checkpoint)(torch.tensor([ids])).logits[0]
    whole = _logits_in_chunks(checkpoint, ids, [45])
    chunked = _logits_in_chunks(checkpoint, ids, [16, 13, 1, 15])
    torch.testing.assert_close(whole, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(checkpoint: pathlib.Path) -> None:
    ids = _prompt(21, 512, seed=9)
    expected = _hf(checkpoint).generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
    engine = Engine(EngineConfig(model=str(checkpoint), kv_memory_bytes=1 << 20))
    out = engine.generate(Request(prompt_ids=ids, max_tokens=32, temperature=0.0))
    assert out.token_ids == expected
    assert len(expected) == 32 or expected[-1] in engine.eos_token_ids

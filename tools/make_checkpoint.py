#!/usr/bin/env python3
"""Write a random-initialised checkpoint of a named shape in the Hugging Face layout.

    python tools/make_checkpoint.py OUT_DIR [--shape tiny|smollm-135m] [--arch llama|qwen2]
        [--seed 0] [--shards 1] [--dtype float32|bfloat16|float16]

OUT_DIR gets config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards and
model.safetensors.index.json), tokenizer.json and tokenizer_config.json (ChatML chat template) and
generation_config.json. The tokenizer is a byte-level BPE trained here on generated text and
padded to the vocabulary size with tokens that encoding never produces. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmosd.engine.config import ModelConfig
from llmosd.engine.loader import DTYPES, random_state_dict
from llmosd.engine.tokenizer import CHATML_TEMPLATE

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "smollm-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}
ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TRAINED_VOCAB = 4096  # BPE merges learnt from the generated text; the rest is padding


def _corpus(seed: int, lines: int = 3000) -> Iterator[str]:
    """Seeded pseudo-English with digits and punctuation: enough for BPE to learn common merges."""
    rng = random.Random(seed)
    syllables = ["the", "an", "ing", "er", "on", "re", "at", "st", "en", "al", "or", "ti", "es", "ou", "ag", "ent"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    for _ in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        yield sentence.capitalize() + rng.choice([".", "!", "?", ",", ": 42.", " (1984)."])


def build_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE of exactly vocab_size tokens, the special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, TRAINED_VOCAB), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet, show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # Pad with 3-character byte strings no merge produces: they decode, encoding never emits them.
    n = 0
    while len(vocab) < vocab_size:
        piece = "".join(alphabet[(n // 256**i) % 256] for i in range(3))
        n += 1
        if piece not in vocab:
            vocab[piece] = len(vocab)
    return Tokenizer.from_str(json.dumps(data))


def hf_config(shape: str, arch: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json contents for a named shape and architecture (overrides win)."""
    architecture, model_type = ARCHS[arch]
    cfg: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": None,
        **SHAPES[shape],
    }
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    cfg.update(overrides or {})
    return cfg


def write_checkpoint(
    out: str | pathlib.Path,
    shape: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    shards: int = 1,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write the checkpoint directory and return its path."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(shape, arch, overrides)
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 2, "do_sample": False}, indent=2)
    )
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in random_state_dict(ModelConfig.from_dict(cfg), seed).items()}
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for i in range(shards):
            part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    build_tokenizer(cfg["vocab_size"], seed).save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[2],
        "pad_token": SPECIAL_TOKENS[0],
        "add_bos_token": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = ap.parse_args(argv)
    path = write_checkpoint(args.out, args.shape, args.arch, args.seed, args.shards, args.dtype)
    print(f"wrote {args.shape} ({args.arch}, {args.dtype}, {max(args.shards, 1)} shard(s)) to {path}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())

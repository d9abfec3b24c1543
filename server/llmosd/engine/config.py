"""Model and engine configuration: what a Hugging Face config.json says, and how the engine runs."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, normalised from the several spellings HF configs use."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...} or None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        """Build from the parsed config.json (and generation_config.json, whose EOS ids win)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "<none>")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model architecture {arch!r}: the engine runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        # transformers 5 writes rope_parameters (with rope_theta inside); older configs rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling: dict[str, Any] | None = None
        if rope_type not in ("default", None):
            if rope_type not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope_scaling type {rope_type!r}: the engine supports llama3 and linear")
            scaling = {**rope, "rope_type": rope_type}
            if rope_type == "llama3":
                scaling.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
        qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(cfg.get("attention_bias", False))
        gen = generation_config or {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            # Qwen2 always has q/k/v bias and no o_proj bias; Llama's attention_bias covers all four.
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
        )

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> "ModelConfig":
        """Read config.json and, if present, generation_config.json from a checkpoint directory."""
        path = pathlib.Path(path)
        cfg = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
        return cls.from_dict(cfg, gen)


@dataclass
class EngineConfig:
    """How the engine runs. `model` is "tiny" (built in) or a checkpoint directory."""

    model: str = "tiny"
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    kv_memory_bytes: int = 256 << 20
    block_size: int = 16
    max_batch: int = 32  # sequences per step
    max_step_tokens: int = 1024  # tokens (prefill chunks + decodes) per step
    token_quantum: int = 256  # tokens a sequence may process before yielding to an equal-priority waiter
    aging_steps: int = 512  # waiting steps that raise a sequence's effective priority by one
    max_context: int | None = None  # cap on the model's context length
    num_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's default
    seed: int = 0  # weights of the built-in tiny model

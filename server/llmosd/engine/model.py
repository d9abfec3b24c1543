"""The Llama-family decoder (Llama, Mistral, Qwen2) on packed token batches and a paged KV cache.

q/k/v and gate/up projections are fused into one matmul each (fewer, larger ops: what matters on
CPU); `load_weights` splits HF's separate tensors into them. On CPU in fp32, `pack_for_cpu` then
moves every matmul weight into oneDNN's blocked layout, and RMSNorm and SiLU-and-multiply run as C
kernels (cpu_kernels.py). Numerics follow transformers: RMSNorm in fp32 cast back before the weight,
RoPE tables computed in fp32 exactly as HF does.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .attention import AttentionBackend, AttentionMetadata
from .config import ModelConfig
from .kv_cache import KVCache


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies with the config's scaling (default, linear, llama3), as transformers computes them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


# Rows the packed layout is tuned for: a decode batch. Any row count works; this one is fastest for
# 1-32 rows on AVX2 (measured), where decoding spends its time.
PACK_ROWS_HINT = 16


class PackedLinear(nn.Module):
    """A linear layer whose weight is in oneDNN's blocked layout (CPU only; the dense one is freed).

    Decoding multiplies a few rows by weights streamed from memory; MKL's sgemm behind F.linear
    reaches half the speed of oneDNN on prepacked weights there (SmolLM-135M, 16 rows: 130 -> 60 ms
    per step of matmuls). This is the kernel torch.compile's CPU freezing pass uses."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `CausalLM.pack_for_cpu` applies: fp32 on a CPU build with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))
        self.eps = eps
        self.cpu_kernel = False  # set by CausalLM.pack_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in fp32 and cast back before the weight, as transformers does.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/signed_sin: [T, 1, D]. HF Llama's rotate-half convention,
    x * cos + cat(-x2, x1) * sin, in three ops: rolling x by half a head gives (x2, x1), and
    signed_sin is (-sin, sin) (the two halves of sin are equal)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)
        self.scale = self.head_dim**-0.5

    def forward(self, h, cos, sin, k_cache, v_cache, meta: AttentionMetadata, backend: AttentionBackend):
        t = h.shape[0]
        qkv = self.qkv_proj(h)
        # Rotate q and k together: one set of elementwise ops instead of two.
        qk = apply_rope(qkv[:, : self.split[0] + self.split[1]].view(t, self.heads + self.kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = qkv[:, self.split[0] + self.split[1] :].view(t, self.kv_heads, self.head_dim)
        return self.o_proj(backend(q, k, v, k_cache, v_cache, meta, self.scale))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype)
        self.cpu_kernel = False  # set by CausalLM.pack_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.cpu_kernel:
            return self.down_proj(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # in place: no new [T, inter] tensors


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def forward(self, h, cos, sin, k_cache, v_cache, meta, backend):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, k_cache, v_cache, meta, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; weights come from `load_weights`."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):  # no throw-away random init: every weight is loaded
            # Given its weight, the embedding skips its init (normal_ on meta imports torch._dynamo: 1-3 s).
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
            self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        # Real storage for every parameter; not to_empty(), whose empty_like on meta imports sympy (0.5-1 s).
        for module in self.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device))
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), rope_inv_freq(cfg))
        emb = torch.cat((freqs, freqs), dim=-1).to(device)
        half = emb.shape[-1] // 2
        self.cos = emb.cos().to(dtype)
        self.signed_sin = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1).to(dtype)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        backend: AttentionBackend,
        logits_indices: torch.Tensor,
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Run the packed tokens ([T]) through the model; fp32 logits of the rows in logits_indices.
        between_layers() is called after each layer: it may run other forwards (an interrupt)."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.cos[meta.positions].unsqueeze(1), self.signed_sin[meta.positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, kv.k[i], kv.v[i], meta, backend)
            if between_layers is not None:
                between_layers()
        h = self.norm(h[logits_indices])
        logits = F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
        return logits.float()

    def pack_for_cpu(self) -> None:
        """Replace every matmul weight by its oneDNN-packed copy (see PackedLinear), and switch the
        norms and MLP activations to the C kernels if they are built. A tied head gets a packed copy
        of the embedding, which stays dense for the lookups."""
        for layer in self.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                linear = getattr(parent, name)
                setattr(parent, name, PackedLinear(linear.weight, linear.bias))
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.lm_head = PackedLinear(head, None)
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP)):
                module.cpu_kernel = cpu_kernels.available

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in (fusing q/k/v and gate/up); every parameter must be provided once."""
        params = dict(self.named_parameters())
        q, kv = self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim
        inter = self.cfg.intermediate_size
        fused = {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, inter),
        }
        expected = {n: p.shape[0] if any(f in n for f in ("qkv_proj", "gate_up_proj")) else 1 for n, p in params.items()}
        filled: dict[str, int] = {}
        for name, tensor in tensors:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints store the RoPE table; it is computed here
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            local = name.removeprefix("model.")
            part = local.split(".")
            target, lo, size = local, 0, None
            if len(part) >= 2 and part[-2] in fused:
                proj, lo, size = fused[part[-2]]
                target = ".".join(part[:-2] + [proj, part[-1]])
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.cfg.architecture}")
            param = params[target].data
            dest = param if size is None else param[lo : lo + size]
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            filled[target] = filled.get(target, 0) + (1 if size is None else size)
        missing = [n for n in params if filled.get(n, 0) != expected[n]]
        if missing:
            raise ValueError(f"checkpoint lacks tensors for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")

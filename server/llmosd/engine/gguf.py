"""Reading a GGUF file (llama.cpp's format): config, weights and tokenizer in one file.

The header is parsed here, with the `gguf` package's constants (its GGUFReader builds a numpy
view per array element: 2 s for a 49k-token vocabulary, then most of the real model's load).
Weights are dequantized to the serving dtype in vectorised torch for the common types (F32, F16,
BF16, Q8_0, Q4_0, Q4_1: ~10x faster than gguf's numpy reference), by gguf's own `dequantize` for
the rest. llama.cpp's converter interleaves the rows of Llama's q/k projections for its RoPE;
`tensors` undoes that, so the model sees Hugging Face's layout and names. The tokenizer is rebuilt
from the metadata with `tokenizers`, splitting text as the model's own tokenizer.json does
(llama.cpp's regexes, by tokenizer.ggml.pre), and the chat template is the file's.
"""
from __future__ import annotations

import logging
import math
import pathlib
import struct
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from .config import ModelConfig

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # Mistral files say "llama"

# GGUF tensor names -> Hugging Face names.
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# llama.cpp's text splitting per `tokenizer.ggml.pre` (llama-vocab.cpp), before byte-level BPE.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (digits one by one first, as these models' own tokenizer.json does; the regex) per pre-tokenizer name.
PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {
    **{name: (False, GPT2_SPLIT) for name in ("default", "gpt2", "gpt-2")},
    **{name: (True, GPT2_SPLIT) for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: (False, LLAMA3_SPLIT) for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")},
    **{name: (False, QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen")},
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def is_gguf(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# GGUF value types (gguf.GGUFValueType): struct formats of the scalars; 8 is a string, 9 an array.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists the innermost dimension first)
    qtype: int  # gguf.GGMLQuantizationType
    start: int  # byte offsets in the file
    end: int


def read_header(buf: memoryview) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata and tensor table of a GGUF file (v2 or v3, little-endian) held in buf."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    pos = 4  # after the magic

    def unpack(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = unpack("<Q")
        pos += n
        return str(buf[pos - n : pos], "utf-8")

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == STRING:
            return string()
        if kind != ARRAY:
            return unpack(SCALARS[kind])
        item, count = unpack("<I"), unpack("<Q")
        if item in (STRING, ARRAY):
            return [value(item) for _ in range(count)]
        array = np.frombuffer(buf, np.dtype(SCALARS[item]), count, pos)
        pos += array.nbytes
        return array.tolist()

    if bytes(buf[:4]) != MAGIC or unpack("<I") not in (2, 3):
        raise ValueError("not a GGUF file of version 2 or 3 (little-endian)")
    tensor_count, kv_count = unpack("<Q"), unpack("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = string()
        metadata[key] = value(unpack("<I"))
    table = []
    for _ in range(tensor_count):
        name, dims = string(), unpack("<I")
        shape = tuple(reversed(struct.unpack_from(f"<{dims}Q", buf, pos)))
        pos += 8 * dims
        qtype, offset = GGMLQuantizationType(unpack("<I")), unpack("<Q")
        block, size = GGML_QUANT_SIZES[qtype]
        table.append((name, shape, qtype, offset, math.prod(shape) // block * size))
    align = int(metadata.get("general.alignment", 32))
    if align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment {align} is not a power of two")
    data = -(-pos // align) * align
    tensors = [TensorInfo(name, shape, q, data + off, data + off + n) for name, shape, q, off, n in table]
    if any(t.end > len(buf) for t in tensors):
        raise ValueError("the GGUF file is truncated: its tensors run past its end")
    return metadata, tensors


def _dequantize(raw: torch.Tensor, qtype: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 values of a tensor's bytes (raw: uint8) of GGML type qtype."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        out = raw.view(torch.float32)
    elif qtype in (Q.F16, Q.BF16):
        out = raw.view(torch.float16 if qtype == Q.F16 else torch.bfloat16).float()
    elif qtype == Q.Q8_0:  # blocks of 32: f16 scale, 32 int8
        blocks = raw.view(-1, 34)
        out = blocks[:, 2:].view(torch.int8).float() * blocks[:, :2].view(torch.float16).float()
    elif qtype in (Q.Q4_0, Q.Q4_1):  # blocks of 32: f16 scale (Q4_1: and min), 16 bytes of nibbles, low ones first
        head = 2 if qtype == Q.Q4_0 else 4
        blocks = raw.view(-1, head + 16)
        nibbles = blocks[:, head:]
        q = torch.cat((nibbles & 15, nibbles >> 4), dim=1).float()
        scale = blocks[:, :2].view(torch.float16).float()
        if qtype == Q.Q4_0:
            out = q.sub_(8).mul_(scale)
        else:
            out = q.mul_(scale).add_(blocks[:, 2:4].view(torch.float16).float())
    else:
        out = torch.from_numpy(quants.dequantize(raw.numpy(), qtype))
    return out.reshape(shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp convert's `permute` of q/k rows (per head: halves -> interleaved pairs)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFModel:
    """A parsed GGUF file: metadata, the model's config, its weights under HF names, its tokenizer."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.data = torch.from_numpy(np.fromfile(self.path, dtype=np.uint8))  # one read: ~100 MB for the real model
        try:
            self.metadata, self.tensor_infos = read_header(memoryview(self.data.numpy()))
        except (struct.error, KeyError, ValueError) as e:  # a value type, tensor type or length that cannot be
            raise ValueError(f"{self.path.name} is not a readable GGUF file: {e}") from None
        arch = self.metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}: the engine runs {', '.join(ARCHITECTURES)}")
        self.arch = arch

    def _get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(f"{self.arch}.{key}", default)
        if value is None:
            raise ValueError(f"{self.path.name} lacks metadata {self.arch}.{key}")
        return value

    def config(self) -> ModelConfig:
        """The config, normalised by ModelConfig.from_dict like a config.json."""
        meta, names = self.metadata, {t.name for t in self.tensor_infos}
        heads, hidden = int(self._get("attention.head_count")), int(self._get("embedding_length"))
        rope: dict[str, Any] | None = None
        scaling = self._get("rope.scaling.type", "none")
        if scaling == "linear":
            rope = {"rope_type": "linear", "factor": float(self._get("rope.scaling.factor"))}
        elif scaling != "none":
            raise ValueError(f"unsupported GGUF rope scaling {scaling!r}: the engine supports linear")
        if "rope_freqs.weight" in names:  # Llama 3.1 files bake their RoPE scaling into this tensor
            raise ValueError("GGUF files with a rope_freqs tensor (Llama 3.1 RoPE scaling) are not supported")
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        return ModelConfig.from_dict({
            "architectures": [ARCHITECTURES[self.arch]],
            "vocab_size": int(self._get("vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))),
            "hidden_size": hidden,
            "intermediate_size": int(self._get("feed_forward_length")),
            "num_hidden_layers": int(self._get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._get("attention.head_count_kv", heads)),
            "head_dim": int(self._get("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(self._get("context_length")),
            "rms_norm_eps": float(self._get("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._get("rope.freq_base", 10000.0)),
            "rope_scaling": rope,
            "attention_bias": self.arch == "llama" and "blk.0.attn_q.bias" in names,
            "tie_word_embeddings": "output.weight" not in names,
            "eos_token_id": list(dict.fromkeys(eos)),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        })

    def tensors(self, cfg: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight, dequantized to dtype, under its Hugging Face name; progress is logged."""
        total, step = len(self.tensor_infos), max(1, len(self.tensor_infos) // 4)
        for done, info in enumerate(self.tensor_infos, 1):
            base, kind = info.name.rsplit(".", 1)
            parts = base.split(".", 2)
            if base in GLOBAL_TENSORS:
                name = f"{GLOBAL_TENSORS[base]}.{kind}"
            elif parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
                name = f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{kind}"
            else:
                raise ValueError(f"GGUF tensor {info.name!r} has no place in {cfg.architecture}")
            tensor = _dequantize(self.data[info.start : info.end], info.qtype, info.shape)
            if self.arch == "llama" and parts[-1] in ("attn_q", "attn_k"):
                tensor = _unpermute(tensor, cfg.num_heads if parts[-1] == "attn_q" else cfg.num_kv_heads)
            if done % step == 0 or done == total:
                log.info("%s: dequantized %d/%d tensors", self.path.name, done, total)
            yield name, tensor.to(dtype)

    def tokenizer(self, eos_token_ids: tuple[int, ...]):
        """The file's byte-level BPE tokenizer and chat template (an HFTokenizer)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        from .tokenizer import HFTokenizer

        meta = self.metadata
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer {kind!r}: the engine reads byte-level BPE ('gpt2')")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: known are {', '.join(sorted(PRE_TOKENIZERS))}")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        digits, regex = PRE_TOKENIZERS[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True)] * digits
            + [pre_tokenizers.Split(Regex(regex), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        # Control tokens are special (skipped when decoding); user-defined ones are matched whole too.
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
        token = lambda key: tokens[meta[key]] if key in meta else ""  # noqa: E731
        bos = token("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])]
            )
        return HFTokenizer(tok, meta.get("tokenizer.chat_template"), bos, token("tokenizer.ggml.eos_token_id"), eos_token_ids)

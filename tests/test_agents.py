"""Structured generation, tool calls and conversation contexts through the kernel (gRPC, Lua,
Python agents), and the agent library's examples on the real model.

The syscall tests run on the built-in tiny model (its text is gibberish, but constraints make
its output valid all the same). The real-model tests (SmolLM2-135M, --model smollm2) check
structure only: files written, valid JSON, every tool call valid for its tool, every worker
ended normally; never the model's wording.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Iterator

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.v1 import kernel_pb2 as pb
from llmos.v1 import kernel_pb2_grpc
from llmos.values import from_value, to_value
from llmosd_process import LlmosdServer
from statuses import status_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
USERLAND = ROOT / "userland"
CHOICE = {"type": "object", "properties": {"choice": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
          "required": ["choice", "sure"], "additionalProperties": False}
UNIT_TOOL = {"name": "set_unit", "description": "Set the temperature unit",
             "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"],
                            "additionalProperties": False}}
USER = [{"role": "user", "content": "Hello"}]


def infer(stub: Any, **kw: Any) -> pb.InferChunk:
    sampling = kw.pop("sampling", {"max_tokens": 64, "temperature": 0})
    chunks = list(stub.Infer(pb.InferRequest(sampling=pb.SamplingParams(**sampling), **kw), timeout=120))
    return chunks[-1]


def chat(messages: list[dict[str, str]]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(**m) for m in messages]


def tool_pb(tool: dict[str, Any]) -> pb.Tool:
    return pb.Tool(name=tool["name"], description=tool["description"], parameters=to_value(tool["parameters"]))


def run_lua(stub: Any, source: str, **kw: Any) -> pb.ProcessInfo:
    pid = stub.Spawn(pb.SpawnRequest(lua=source, **kw)).pid
    return stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=120_000)).process


# -- structured generation and tool calls (tiny model) --------------------------------------------
def test_constrained_outputs_match_over_grpc(stub: Any) -> None:
    for seed in range(3):
        out = infer(stub, messages=chat(USER), json_schema=to_value(CHOICE),
                    sampling={"max_tokens": 64, "temperature": 1, "seed": seed})
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), CHOICE)
    out = infer(stub, prompt="Digits:", regex="[0-9]{3}")
    assert re.fullmatch("[0-9]{3}", out.text) and out.finish_reason == "stop"


def test_tool_calls_validate_against_their_tool(stub: Any) -> None:
    out = infer(stub, messages=chat(USER), tools=[tool_pb(UNIT_TOOL)], tool_choice="set_unit",
                sampling={"max_tokens": 128, "temperature": 0})  # bytes: the tiny model's tokens
    assert out.finish_reason == "stop" and len(out.tool_calls) == 1
    call = out.tool_calls[0]
    assert call.name == "set_unit" and call.id
    jsonschema.validate(from_value(call.arguments), UNIT_TOOL["parameters"])


@pytest.mark.parametrize("request_fields, message", [
    ({"json_schema": to_value({"type": "bogus"})}, "json_schema"),
    ({"regex": "("}, "regex"),
    ({"grammar": "start: ("}, "grammar"),
    ({"regex": "a", "grammar": 'start: "a"'}, "at most one constraint"),
    ({"tools": [pb.Tool(name="a b")]}, "name"),
    ({"tools": [tool_pb(UNIT_TOOL)], "tool_choice": "other"}, "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"messages": chat([{"role": "robot", "content": "x"}])}, "role"),
    ({"messages": chat([{"role": "user", "content": "x", "name": "n"}])}, "only a message of role tool"),
])
def test_bad_constraints_tools_and_chats_are_invalid_argument(stub: Any, request_fields: dict, message: str) -> None:
    fields = {"messages": chat(USER), **request_fields}
    code, details = status_of(lambda: infer(stub, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert infer(stub, prompt="still serving").finish_reason in ("stop", "length")


def test_a_tool_result_is_a_chat_message(stub: Any) -> None:
    messages = USER + [{"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"},
                       {"role": "tool", "name": "set_unit", "content": '{"ok": true}'}]
    assert infer(stub, messages=chat(messages)).finish_reason in ("stop", "length")


# -- conversation contexts ----------------------------------------------------------------------------
def test_contexts_over_grpc_belong_to_their_process(stub: Any) -> None:
    owner, other = stub.OpenPort(pb.OpenPortRequest()).pid, stub.OpenPort(pb.OpenPortRequest()).pid
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi " * 40}]
    ctx = stub.CreateContext(pb.CreateContextRequest(pid=owner, messages=chat(history)))
    assert ctx.context_id and ctx.tokens > 40 and ctx.kv_bytes > 0
    assert stub.GetProcess(pb.GetProcessRequest(pid=owner)).usage.kv_bytes == ctx.kv_bytes
    turn = infer(stub, pid=owner, context_id=ctx.context_id, messages=chat([{"role": "user", "content": "More"}]),
                 sampling={"max_tokens": 8, "temperature": 0})
    assert turn.usage.prompt_tokens > ctx.tokens
    assert turn.usage.prompt_tokens - turn.usage.cached_tokens < ctx.tokens  # the history is not prefilled again
    fork = stub.ForkContext(pb.ForkContextRequest(pid=owner, context_id=ctx.context_id))
    assert fork.context_id != ctx.context_id and fork.tokens > ctx.tokens  # the turn and its answer are in it
    for call in (lambda: stub.ForkContext(pb.ForkContextRequest(pid=other, context_id=ctx.context_id)),
                 lambda: infer(stub, pid=other, context_id=ctx.context_id, messages=chat(USER)),
                 lambda: stub.DropContext(pb.DropContextRequest(pid=other, context_id=ctx.context_id))):
        assert status_of(call)[0] == grpc.StatusCode.NOT_FOUND  # another process's handle names nothing
    stub.DropContext(pb.DropContextRequest(pid=owner, context_id=fork.context_id))
    assert status_of(lambda: stub.DropContext(pb.DropContextRequest(pid=owner, context_id=fork.context_id)))[0] \
        == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: stub.CreateContext(pb.CreateContextRequest(messages=chat(USER))))[0] \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: infer(stub, context_id=ctx.context_id, messages=chat(USER)))[0] \
        == grpc.StatusCode.INVALID_ARGUMENT  # no process: no owner
    stub.Exit(pb.ExitRequest(pid=owner))  # a port ends; so do its contexts
    assert status_of(lambda: stub.ForkContext(pb.ForkContextRequest(pid=owner, context_id=ctx.context_id)))[0] \
        == grpc.StatusCode.FAILED_PRECONDITION  # as any call naming an ended process


LUA_CONTEXTS = """
local h = sys.context.create{messages = {{role = "system", content = "You are terse."}},
                             tools = {{name = "set_unit", description = "Set the unit",
                                       parameters = {type = "object", properties = {unit = {enum = {"c", "f"}}},
                                                     required = {"unit"}}}}}
local r = sys.infer{context = h, messages = {{role = "user", content = "Celsius"}}, tool_choice = "set_unit",
                    max_tokens = 128, temperature = 0}
local f = sys.context.fork(h)
local held = sys.info().usage.kv_bytes
sys.context.drop(f)
local j = sys.infer{messages = {{role = "user", content = "Yes?"}}, max_tokens = 64, temperature = 0,
                    json_schema = {type = "object", properties = {choice = {enum = {"yes", "no"}}},
                                   required = {"choice"}, additionalProperties = false}}
local errors = {}
for i, call in ipairs{
  function() return sys.context.drop(f) end,
  function() return sys.context.fork(2^60) end,
  function() return sys.context.fork(-1) end,
  function() return sys.context.create{messages = {{role = "user", content = "x"}}, bogus = 1} end,
  function() return sys.infer{context = h, prompt = "x"} end,
  function() return sys.infer{prompt = "x", json_schema = {type = "bogus"}} end,
} do
  local ok, err = pcall(call)
  errors[i] = ok and "accepted" or err
end
return {calls = r.tool_calls, handle = h, held = held, json = j.json, text = j.text, finish = j.finish_reason,
        errors = errors}
"""


def test_lua_contexts_tools_and_structured_outputs(stub: Any) -> None:
    info = run_lua(stub, LUA_CONTEXTS)
    assert info.state == pb.EXITED, info.error
    out = from_value(info.result)
    assert len(out["calls"]) == 1 and out["calls"][0]["name"] == "set_unit"
    jsonschema.validate(out["calls"][0]["arguments"], UNIT_TOOL["parameters"])
    assert out["held"] > 0 and out["finish"] == "stop", out
    assert out["json"] == json.loads(out["text"])
    expected = ["no context", "no context", "must be a context handle", "unknown option(s) bogus",
                "gives its new turn as messages", "json_schema: "]
    for error, part in zip(out["errors"], expected, strict=True):
        assert part in error, (part, error)


def test_kv_limit_caps_contexts_and_children_get_at_most_the_parents(stub: Any) -> None:
    capped = run_lua(stub, 'return {pcall(sys.context.create, {messages = {{role = "user", content = "hi"}}})}',
                     limits=pb.Limits(kv_bytes=1))
    ok, error = from_value(capped.result)
    assert ok is False and "over its limit of 1" in error
    assert capped.limits.kv_bytes == 1
    child = run_lua(stub, "return {pcall(sys.spawn, {lua = 'return 1', limits = {kv_bytes = 2}})}",
                    limits=pb.Limits(kv_bytes=1))
    ok, error = from_value(child.result)
    assert ok is False and "kv_bytes 2 > 1" in error


PYTHON_CONTEXTS = """
import llmos
from llmos.userland import sys

h = sys.context.create([{"role": "system", "content": "You are terse."}])
first = sys.infer(context=h, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
fork = sys.context.fork(h)
sys.context.drop(fork)
try:
    sys.context.drop(fork)
    dropped_twice = "accepted"
except llmos.NotFound as e:
    dropped_twice = "NotFound"
answer = sys.infer(messages=[{"role": "user", "content": "Yes?"}], json_schema=SCHEMA, max_tokens=64, temperature=0)
try:
    sys.context.create([{"role": "user", "content": "x"}], bogus=1)
    unknown = "accepted"
except llmos.InvalidArgument as e:
    unknown = str(e)
sys.exit({"handles": [h, fork], "first": first["finish_reason"], "dropped_twice": dropped_twice,
          "json": answer["json"], "text": answer["text"], "unknown": unknown})
"""


def test_python_agent_contexts_and_structured_outputs(stub: Any) -> None:
    source = f"SCHEMA = {CHOICE!r}\n{PYTHON_CONTEXTS}"
    pid = stub.Spawn(pb.SpawnRequest(python=source)).pid
    info = stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=120_000)).process
    assert info.state == pb.EXITED, info.error
    out = from_value(info.result)
    assert out["handles"][0] != out["handles"][1] and out["first"] in ("stop", "length")
    assert out["dropped_twice"] == "NotFound"
    assert out["json"] == json.loads(out["text"]) and jsonschema.validate(out["json"], CHOICE) is None
    assert "unknown option 'bogus'" in out["unknown"]


LUA_AGENT = r"""
local agent = require "agent"
local seen = {}
local unit = {name = "set_unit", description = "Set the temperature unit",
              parameters = {type = "object", properties = {unit = {enum = {"c", "f"}}}, required = {"unit"},
                            additionalProperties = false},
              run = function(a) seen[#seen + 1] = a.unit; return {unit = a.unit} end}
local a = agent.new{tools = {unit}, first_tool_choice = "required", max_steps = 2,
                    max_tokens = 80, memory = "memory/lua-agent-test.json"}
local first, second = a:run("Use Celsius"), a:run("Again")
local value = {1, 2.5, "a\"b\\c\n\u{e9}", {x = true, y = {}}, setmetatable({}, agent.json.array_mt)}
return {first = first, second = second, seen = seen, memory = sys.fs.read("memory/lua-agent-test.json"),
        decided = agent.decide("Yes or no?", {"yes", "no"}, {max_tokens = 1000}),  -- bytes: up to 4 a character
        round_trip = agent.json.encode(agent.json.decode(agent.json.encode(value))) == agent.json.encode(value),
        encoded = agent.json.encode(value)}
"""


def test_lua_agent_loop_calls_valid_tools_and_remembers(stub: Any) -> None:
    info = run_lua(stub, LUA_AGENT)
    assert info.state == pb.EXITED, info.error
    out = from_value(info.result)
    schemas = {"set_unit": UNIT_TOOL["parameters"]}  # bounded arguments: the tiny model's calls always end
    for run in (out["first"], out["second"]):
        assert run["calls"] and run["steps"] == 2 and run["stopped"] in ("answer", "length"), run
        for call in run["calls"]:
            jsonschema.validate(call["arguments"], schemas[call["name"]])
    assert len(out["seen"]) == sum(c["name"] == "set_unit" for r in (out["first"], out["second"]) for c in r["calls"])
    assert [note["task"] for note in json.loads(out["memory"])][-2:] == ["Use Celsius", "Again"]
    assert out["decided"]["choice"] in ("yes", "no") and isinstance(out["decided"]["reason"], str)
    assert out["round_trip"] and json.loads(out["encoded"]) == [1, 2.5, 'a"b\\c\né', {"x": True, "y": {}}, []]


# -- the real model: loading, the agent library's examples, the README's quick start ---------------------
class RealServer:
    def __init__(self, server: LlmosdServer, health_seen: list[str]) -> None:
        self.server, self.health_seen = server, health_seen
        self.channel = server.channel()
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """A server on SmolLM2-135M, and the health statuses it gave from its start until SERVING."""
    server = LlmosdServer(tmp_path_factory.mktemp("real") / "data", "--model", "smollm2", "--cpus", "2",
                          userland_root=USERLAND)
    server.start()
    health = health_pb2_grpc.HealthStub(server.channel())
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while not seen or seen[-1] != "SERVING":
        assert time.monotonic() < deadline, f"not SERVING after 120 s: {seen}"
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
        time.sleep(0.02)
    real = RealServer(server, seen)
    yield real
    real.channel.close()
    server.stop()


def test_health_is_serving_only_once_the_model_has_loaded(real: RealServer) -> None:
    assert real.health_seen[0] == "NOT_SERVING"  # the model takes seconds to load; health answers at once
    log = real.server.log_path.read_text()
    assert "loading the inference engine" in log and "dequantized 272/272 tensors" in log
    assert log.index("inference engine ready in") < log.index("health: SERVING")


def _put(stub_target: str, path: str, data: bytes) -> None:
    import llmos

    with llmos.Client(stub_target) as k:
        k.write_file(path, data)


def test_planner_workers_end_normally_and_write_a_json_report(real: RealServer) -> None:
    target = real.server.target
    for name, text in {"a.txt": "The Loire is the longest river in France.",
                       "b.txt": "Rust is a programming language focused on memory safety."}.items():
        _put(target, f"plan/{name}", text.encode())
    info = real.stub.Wait(pb.WaitRequest(
        pid=real.stub.Spawn(pb.SpawnRequest(path="lua/planner.lua", args=to_value({"dir": "plan"}))).pid,
        timeout_ms=300_000)).process
    assert info.state == pb.EXITED, info.error
    out = from_value(info.result)
    assert out == {"report": "reports/plan.json", "workers": 2, "all_normal": True}
    report = json.loads(b"".join(c.data for c in real.stub.ReadFile(pb.ReadFileRequest(path=out["report"]))))
    assert [w["file"] for w in report["workers"]] == ["plan/a.txt", "plan/b.txt"]
    worker_schema = {"type": "object", "required": ["file", "summary", "topics", "relevant"],
                     "properties": {"summary": {"type": "string", "minLength": 1},
                                    "topics": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                    "relevant": {"type": "boolean"}}}
    for worker in report["workers"]:
        assert worker["reason"] == "normal"
        jsonschema.validate(worker["result"], worker_schema)
        assert real.stub.GetProcess(pb.GetProcessRequest(pid=worker["pid"])).exit_reason == "normal"


def test_calculator_agent_calls_only_valid_tools_and_remembers(real: RealServer) -> None:
    schemas = {"calculate": {"type": "object", "required": ["a", "op", "b"],
                             "properties": {"a": {"type": "number"}, "op": {"enum": ["+", "-", "*", "/"]},
                                            "b": {"type": "number"}}},
               "read_file": {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}},
               "write_file": {"type": "object", "required": ["path", "content"],
                              "properties": {"path": {"type": "string"}, "content": {"type": "string"}}},
               "list_files": {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}}}
    for run, question in enumerate(["What is 12.5 * 8?", "What is 7 - 10?"], 1):
        pid = real.stub.Spawn(pb.SpawnRequest(path="python/calculator.py", args=to_value({"question": question}))).pid
        info = real.stub.Wait(pb.WaitRequest(pid=pid, timeout_ms=300_000)).process
        assert info.state == pb.EXITED and info.exit_reason == "normal", info.error
        out = from_value(info.result)
        assert out["calls"], "the first step must call a tool"
        assert 1 <= out["steps"] <= 4 and out["stopped"] in ("answer", "steps", "budget", "length")
        for call in out["calls"]:
            jsonschema.validate(call["arguments"], schemas[call["name"]])
            if call["name"] == "calculate" and call["ok"] and call["arguments"]["op"] != "/":
                a, b = call["arguments"]["a"], call["arguments"]["b"]
                assert call["result"] == {"+": a + b, "-": a - b, "*": a * b}[call["arguments"]["op"]]
        memory = json.loads(b"".join(c.data for c in real.stub.ReadFile(
            pb.ReadFileRequest(path="memory/calculator.json"))))
        assert [note["task"] for note in memory][-run:] == ["What is 12.5 * 8?", "What is 7 - 10?"][:run]


def test_readme_quick_start_runs_on_the_real_model(real: RealServer, tmp_path: pathlib.Path) -> None:
    readme = (ROOT / "README.md").read_text()
    [block] = re.findall(r"```sh quick-start\n(.*?)```", readme, re.S)
    env = dict(os.environ, LLMOS_SERVER=real.server.target)
    outputs = []
    for line in block.splitlines():
        command = line.split("  #")[0].strip()
        if not command.startswith(("llmos ", "echo ")):
            continue
        command = command.replace("llmos ", f"{shlex.quote(sys.executable)} -m llmos.cli ")
        done = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}: {done.stderr}"
        outputs.append(done.stdout)
    report = json.loads(outputs[-1])  # the last command shows the report
    assert report["all_normal"] is True and len(report["workers"]) == 2

"""Tool calls on the built-in tiny model (random weights: the grammar does all the work): every call
validates against its tool's schema (jsonschema), for each tool_choice, over many seeded requests;
the prompt renders the tools (the model's template, or the fallback system block)."""
from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

from llmosd.engine import Engine, EngineConfig, InvalidRequest, Request
from llmosd.engine.tokenizer import HFTokenizer
from llmosd.engine import tools
from llmosd.engine.tools import CALL, FALLBACK_SYSTEM, render

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "name": "add",
        "description": "Add integers.",
        "parameters": {
            "type": "object",
            "properties": {"numbers": {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 99}, "minItems": 1, "maxItems": 4}},
            "required": ["numbers"],
            "additionalProperties": False,
        },
    },
    {"name": "now", "description": "The time.", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
]
SCHEMAS = {"get_weather": TOOLS[0]["function"]["parameters"], "add": TOOLS[1]["parameters"], "now": TOOLS[2]["parameters"]}
CHAT = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


@pytest.fixture(scope="module")
def engine():
    engine = Engine(EngineConfig(model="tiny", kv_memory_bytes=32 << 20, max_batch=64, max_step_tokens=16384))
    engine.start()
    yield engine
    engine.stop()


@pytest.mark.parametrize("tool_choice", ["required", {"name": "add"}, {"type": "function", "function": {"name": "now"}}])
def test_every_call_validates_against_its_tool(engine: Engine, tool_choice) -> None:
    handles = [
        engine.submit(Request(messages=CHAT, tools=TOOLS, tool_choice=tool_choice, max_tokens=300, temperature=1.0, seed=seed))
        for seed in range(40)
    ]
    calls_seen = 0
    for handle in handles:
        result = handle.result(timeout=600)
        assert result.finish_reason == "stop", result.text
        assert result.text.count("<tool_call>") == len(result.tool_calls)
        for call in result.tool_calls:
            jsonschema.validate(call.arguments, SCHEMAS[call.name])
        calls_seen += len(result.tool_calls)
        assert result.tool_calls, result.text
        if isinstance(tool_choice, dict):
            name = tool_choice.get("name") or tool_choice["function"]["name"]
            assert [c.name for c in result.tool_calls] == [name]
        # Nothing but calls, one a line: they are the whole output.
        assert CALL.sub("", result.text) == "\n" * (len(result.tool_calls) - 1)
    assert calls_seen >= len(handles)


def test_auto_allows_text_or_valid_calls_only(engine: Engine) -> None:
    """The model (random weights) rarely starts a call by itself under "auto": the grammar is fed
    outputs directly, a byte a token."""
    choice = tools.choose(tools.check_tools(TOOLS), "auto")
    call = '<tool_call>\n{"name": "add", "arguments": {"numbers": [2, 3]}}\n</tool_call>'

    def accepted(output: str) -> bool:
        constraint = engine.grammars.compile(lark=tools.grammar(choice))
        return all(constraint.advance(b) is None for b in output.encode())

    assert accepted("Sunny, and 5.") and accepted("") and accepted("<tool_ca and more text")
    assert accepted(call) and accepted("Let me add. " + call + "\n" + call)
    assert not accepted("text <tool_call>\nno json")
    assert not accepted(call.replace("[2, 3]", "[2, 300]"))  # maximum 99
    assert not accepted(call.replace('"add"', '"sub"'))
    assert not accepted(call + " and text after")
    for seed in range(20):  # sampled: text, ended by EOS or cut by max_tokens, holds no call tag
        result = engine.generate(Request(messages=CHAT, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed))
        assert result.finish_reason in ("stop", "length") and "<tool_call>" not in result.text
        assert result.tool_calls == []


def test_none_leaves_tools_out(engine: Engine) -> None:
    with_none = engine.generate(Request(messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=4))
    plain = engine.generate(Request(messages=CHAT, max_tokens=4))
    assert with_none.tool_calls is None and with_none.usage.prompt_tokens == plain.usage.prompt_tokens


def test_fallback_block_renders_tools_for_templates_without_them(engine: Engine) -> None:
    ids = render(engine.tokenizer, [{"role": "system", "content": "Be brief."}, *CHAT], [t.get("function", t) for t in TOOLS])
    text = engine.tokenizer.decode(ids)
    assert text.count("Be brief.") == 1 and FALLBACK_SYSTEM.splitlines()[0] in text
    assert '"name": "get_weather"' in text and '"name": "add"' in text


def test_a_template_with_tools_renders_them_itself(tiny_checkpoint, tmp_path) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = HFTokenizer.from_dir(path)
    text = tokenizer.decode(render(tokenizer, CHAT, [t.get("function", t) for t in TOOLS]))
    assert text.startswith("TOOLS: get_weather add now") and "user: What is the weather" in text


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(tools=[]), "non-empty list"),
        (dict(tools=[{"name": "a b"}]), "letters, digits"),
        (dict(tools=[{"name": "x"}, {"name": "x"}]), "two tools are named"),
        (dict(tools=[{"name": "x", "parameters": {"type": "array"}}]), "schema of an object"),
        (dict(tools=[{"name": "x", "extra": 1}]), "must be"),
        (dict(tools=[{"name": "x", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}]), "tools: .*nope"),
        (dict(tools=TOOLS, tool_choice={"name": "missing"}), "not among the tools"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be"),
        (dict(tool_choice="auto"), "tool_choice needs tools"),
        (dict(tools=TOOLS, json_schema={"type": "object"}), "at most one constraint"),
    ],
)
def test_bad_tools_are_refused(engine: Engine, bad: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        engine.submit(Request(messages=CHAT, max_tokens=8, **bad))


def test_tools_need_a_chat(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="tools need a chat"):
        engine.submit(Request(prompt="hi", tools=TOOLS, max_tokens=8))

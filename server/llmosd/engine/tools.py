"""Tool calls: OpenAI-shaped tools in the prompt, a grammar that keeps the model's calls valid,
and the calls parsed out of its output.

A tool is {"name", "description", "parameters": JSON schema of an object}, or the same wrapped
as {"type": "function", "function": {...}}. The output format is Hermes/Qwen's, one block a call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

tool_choice: "auto" (default) lets the model write text, then calls or not; "required" makes it
call one or more tools and write nothing else; a named tool makes it call exactly that one;
"none" leaves the tools out of the prompt and the output free. The grammar (Lark, compiled by
constrain.py) makes the arguments validate against the tool's schema; text outside calls never
contains "<tool_call>".

Rendering: a chat template that mentions `tools` renders them itself (HF's convention). Others
(SmolLM2's, ChatML) get FALLBACK_SYSTEM, appended to the first system message or inserted
as one, describing the tools in this same format.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .constrain import JSON_OPTIONS
from .sequence import InvalidRequest, ToolCall
from .tokenizer import Tokenizer

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)

FALLBACK_SYSTEM = """# Tools

You may call one or more functions to help with the user's request. Their signatures are within <tools></tools>:
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments within <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolChoice:
    """The tools a request's output may call, and how (auto, required or one named tool)."""

    tools: tuple[dict[str, Any], ...]
    mode: str  # "auto" | "required" | "named"


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """The tools in flat form ({name, description, parameters}); InvalidRequest if malformed."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("tools must be a non-empty list")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        if not isinstance(tool, dict) or set(tool) - {"name", "description", "parameters"}:
            raise InvalidRequest(
                f"tools[{i}] must be {{name, description, parameters}} (or OpenAI's {{type: function, function: ...}})"
            )
        name, description = tool.get("name"), tool.get("description", "")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InvalidRequest(f"tools[{i}].name must be 1-64 letters, digits, _ or -")
        if name in names:
            raise InvalidRequest(f"tools[{i}]: two tools are named {name!r}")
        if not isinstance(description, str):
            raise InvalidRequest(f"tools[{i}].description must be text")
        parameters = tool.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidRequest(f"tools[{i}].parameters must be the JSON schema of an object")
        names.add(name)
        out.append({"name": name, "description": description, "parameters": parameters})
    return out


def choose(tools: list[dict[str, Any]], tool_choice: Any) -> ToolChoice | None:
    """The checked tool_choice over checked tools; None for "none"."""
    if tool_choice is None or tool_choice == "auto":
        return ToolChoice(tuple(tools), "auto")
    if tool_choice == "required":
        return ToolChoice(tuple(tools), "required")
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        named = tool_choice.get("function") if tool_choice.get("type") == "function" else tool_choice
        name = named.get("name") if isinstance(named, dict) else None
        chosen = [t for t in tools if t["name"] == name]
        if chosen:
            return ToolChoice(tuple(chosen), "named")
        if isinstance(name, str):
            raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools")
    raise InvalidRequest('tool_choice must be "auto", "none", "required" or {"name": TOOL}')


def grammar(choice: ToolChoice) -> str:
    """The Lark grammar of an output under this choice (llguidance's dialect)."""
    schema = {
        "x-guidance": JSON_OPTIONS,
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in choice.tools
        ],
    }
    start = {
        "named": "call",
        "required": 'call ("\\n" call)*',
        # Text that holds no "<tool_call>"; or such text, the tag, and then the calls.
        "auto": 'TEXT | TEXT_THEN_CALL "\\n" body "\\n</tool_call>" ("\\n" call)*',
    }[choice.mode]
    return f"""%llguidance {{}}
start: {start}
call: "<tool_call>\\n" body "\\n</tool_call>"
body: %json {json.dumps(schema)}
TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/
TEXT_THEN_CALL: TEXT "<tool_call>"
"""


def render(
    tokenizer: Tokenizer, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool = True
) -> list[int]:
    """Prompt ids of a chat with its tools (none: the plain chat template)."""
    if not tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt)
    template = getattr(tokenizer, "chat_template", None)
    wrapped = [{"type": "function", "function": t} for t in tools]
    if template is not None and "tools" in template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt, tools=wrapped)  # type: ignore[call-arg]
    block = FALLBACK_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in wrapped))
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content', '')}\n\n{block}"
        messages = [first, *messages[1:]]
    else:
        messages = [{"role": "system", "content": block}, *messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt)


def call_text(name: str, arguments: Any) -> str:
    """A call as the model writes it (what parse reads back): for a chat's earlier turns."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def parse(text: str, request_id: int) -> list[ToolCall]:
    """The calls in an output the grammar accepted (an unfinished last call is left out)."""
    calls = []
    for i, match in enumerate(CALL.finditer(text)):
        call = json.loads(match.group(1))
        calls.append(ToolCall(f"call_{request_id}_{i}", call["name"], call["arguments"]))
    return calls

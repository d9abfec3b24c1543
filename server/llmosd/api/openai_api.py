"""OpenAI-compatible endpoints on the HTTP listener: `/v1/chat/completions` (streaming and not),
`/v1/completions` and `/v1/models`.

Each completion is an Infer syscall: the request becomes an InferRequest and goes through the
table entry gRPC calls (same checks, engine, scheduler, token limits and caller identity), and
the chunks it answers become OpenAI's objects. `response_format` (json_object, json_schema)
becomes InferRequest.json_schema, `tools`/`tool_choice` its tools and tool_choice, and the
final chunk's tool_calls the message's; a chat's earlier tool calls and `tool` results go back
to the model in the engine's markup (engine/tools.py). Infer and the engine check the values.
Errors are the gateway's JSON errors (the `openai` client reads their `message`).

What OpenAI's API has and this one refuses (INVALID_ARGUMENT, never silently ignored): n > 1,
logprobs, penalties other than 0, logit_bias, echo, suffix, best_of, and content parts other
than text; a `model` other than the one served is NOT_FOUND.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any, AsyncIterator

from aiohttp import web

from llmos.v1 import kernel_pb2 as pb
from llmos.values import from_value, to_value

from .errors import InvalidArgument, KernelError, NotFound
from ..kernel.kernel import Kernel
from .identity import Identity
from .doors import finish_call, status_of
from .syscalls import CALL, SYSCALLS
from .replies import built
from .web import BODY_SLACK, HttpCall, error_response, json_value, read_body, stream_sse

TOOL_CALL_TAG = "<tool_call>"  # where the engine's markup of a call begins (engine/tools.py)
OPENAI_DONE = b"data: [DONE]\n\n"
# Fields of OpenAI's requests accepted and ignored (they change nothing here) when given as is.
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}
# Fields accepted only with the value that asks for nothing (the default).
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "echo": False, "best_of": 1,
           "logit_bias": {}}
SAMPLING = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream_options")
CHAT_FIELDS = {"model", "messages", "stream", "response_format", "tools", "tool_choice", *SAMPLING}
COMPLETION_FIELDS = {"model", "prompt", "stream", *SAMPLING}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}  # cancelled: the request's deadline passed
_ids = itertools.count(1)


class OpenAI:
    def __init__(self, kernel: Kernel, single_user: bool) -> None:
        self.kernel = kernel
        self.identity = Identity(kernel, agents=False, single_user=single_user)
        self.body_limit = kernel.config.max_message_bytes + BODY_SLACK

    def model_name(self) -> str | None:
        return self.kernel.inference.config.model if self.kernel.inference is not None else None

    async def models(self, request: web.Request) -> web.Response:
        name = self.model_name()
        data = [] if name is None else [{"id": name, "object": "model", "created": 0, "owned_by": "llmos"}]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        call = HttpCall(request)
        CALL.set(call)
        try:
            raw = await read_body(request, self.body_limit)
            body, infer, stream, include_usage = await built(len(raw), self._parsed, raw, chat)
            infer = self.identity.check("Infer", infer, call)
        except KernelError as e:
            return error_response(*status_of("Infer", e))
        reply = Reply(body["model"], chat, bool(infer.tools) and infer.tool_choice != "none")
        chunks = SYSCALLS["Infer"](self.kernel, infer)
        if stream:
            return await stream_sse(request, reply.stream(chunks, include_usage), "Infer", lambda obj: obj,
                                    lambda code: finish_call(self.identity, "Infer", infer, code), OPENAI_DONE)
        code = "OK"  # counted as an Infer call, which it is
        try:
            final = None
            async for chunk in chunks:
                final = chunk
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            code, text = status_of("Infer", e)
            return error_response(code, text)
        finally:
            finish_call(self.identity, "Infer", infer, code)
            await chunks.aclose()
        assert final is not None  # Infer ends with a final chunk or fails
        return web.json_response(reply.whole(final))

    def _parsed(self, raw: bytes, chat: bool) -> tuple[Any, pb.InferRequest, bool, bool]:
        """The body as JSON, and _infer_request's of it."""
        body = json_value(raw)
        return (body, *self._infer_request(body, chat))

    def _infer_request(self, body: Any, chat: bool) -> tuple[pb.InferRequest, bool, bool]:
        """The InferRequest for an OpenAI request, whether to stream, and whether to end with the
        usage; InvalidArgument for what this API refuses. Values are checked by Infer and the
        engine, not here."""
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        known = CHAT_FIELDS if chat else COMPLETION_FIELDS
        for key, value in body.items():
            if key in NEUTRAL and value not in (None, NEUTRAL[key]):
                raise InvalidArgument(f"{key} must be {json.dumps(NEUTRAL[key])} here (or left out)")
            if key not in known and key not in IGNORED and key not in NEUTRAL:
                raise InvalidArgument(f"unknown field {key!r} (known: {', '.join(sorted(known))})")
        if not isinstance(body.get("model"), str):
            raise InvalidArgument("model is required (GET /v1/models lists the one served)")
        name = self.model_name()
        if name is not None and body["model"] != name:  # no model at all: Infer says so
            raise NotFound(f"model {body.get('model')!r} is not served here; the model is {name!r} (GET /v1/models)")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidArgument("stream must be true or false")
        req = pb.InferRequest(stream=stream)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise InvalidArgument("messages must be a list of {role, content}")
            tool_names: dict[str, str] = {}  # call id -> tool name, for the results that follow
            for i, message in enumerate(messages):
                req.messages.append(_chat_message(message, i, tool_names))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise InvalidArgument("prompt must be text (or a list of one text)")
            req.prompt = prompt
        _sampling(req.sampling, body)
        if chat:
            schema = _response_format(body.get("response_format"))
            if schema is not None:
                req.json_schema.CopyFrom(_value(schema, "response_format.json_schema.schema"))
            if body.get("tools") is not None:
                req.tools.extend(_tools(body["tools"]))
            if body.get("tool_choice") is not None:
                req.tool_choice = _tool_choice(body["tool_choice"])
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise InvalidArgument("stream_options takes only include_usage")
        return req, stream, bool(stream_options.get("include_usage"))


def _chat_message(message: Any, i: int, tool_names: dict[str, str]) -> pb.ChatMessage:
    """An OpenAI chat message as the kernel's: text content; an assistant's tool calls as the
    engine's markup after its text; a tool's result named by the call it answers."""
    if not isinstance(message, dict):
        raise InvalidArgument(f"messages[{i}] must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise InvalidArgument(f"messages[{i}]: role must be one of {', '.join(ROLES)} (not {role!r})")
    unknown = set(message) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
    if unknown:
        raise InvalidArgument(f"messages[{i}]: unsupported field(s) {', '.join(sorted(unknown))}")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise InvalidArgument(f"messages[{i}].content: only text parts ({{type: text, text}}) are supported")
        content = "".join(p["text"] for p in content)
    calls = message.get("tool_calls") or []
    if content is None and calls and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise InvalidArgument(f"messages[{i}].content must be text")
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise InvalidArgument(f"messages[{i}].tool_calls: a list, on an assistant's message only")
        content += "".join(_call_markup(call, tool_names, f"messages[{i}].tool_calls[{j}]")
                           for j, call in enumerate(calls))
    out = pb.ChatMessage(role=ROLES[role], content=content)
    if role == "tool":
        call_id = message.get("tool_call_id")
        out.name = tool_names.get(call_id, "") if isinstance(call_id, str) else ""
    return out


def _call_markup(call: Any, tool_names: dict[str, str], what: str) -> str:
    """An earlier tool call of the assistant, as the model wrote it."""
    from ..engine.tools import call_text  # only with tool calls: the engine package imports torch

    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise InvalidArgument(f"{what} must be {{id, type: function, function: {{name, arguments: JSON text}}}}")
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise InvalidArgument(f"{what}.function.arguments must be the JSON text of an object") from None
    if isinstance(call.get("id"), str):
        tool_names[call["id"]] = name
    return call_text(name, parsed)


def _sampling(sampling: pb.SamplingParams, body: dict[str, Any]) -> None:
    """OpenAI's sampling fields into SamplingParams. Only the types are checked here (the
    message's fields need them); the ranges are Infer's."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    numbers = {"max_tokens": max_tokens, "temperature": body.get("temperature"), "top_p": body.get("top_p"),
               "seed": body.get("seed")}
    for key, value in numbers.items():
        if value is None:
            continue
        integral = key in ("max_tokens", "seed")
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            raise InvalidArgument(f"{key} must be {'an integer' if integral else 'a number'}")
        try:
            setattr(sampling, key, value)
        except (ValueError, TypeError):
            raise InvalidArgument(f"{key}: {value} is out of range") from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("stop must be text or a list of texts")
    sampling.stop.extend(stop)


def _response_format(fmt: Any) -> dict[str, Any] | None:
    """The JSON schema the output must match, if any."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        return fmt["json_schema"]["schema"]
    raise InvalidArgument('response_format must be {"type": "text"}, {"type": "json_object"} or '
                          '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')


def _value(obj: Any, what: str) -> Any:
    """A google.protobuf.Value of a JSON value (the value model's rules: exact integers...)."""
    try:
        return to_value(obj)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{what}: {e}") from None


def _tools(tools: Any) -> list[pb.Tool]:
    """OpenAI's tools ({type: function, function: {name, description, parameters, strict}}) as
    the kernel's; their names and schemas are the engine's to check."""
    if not isinstance(tools, list):
        raise InvalidArgument("tools must be a list of {type: function, function: {...}}")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or set(tool) != {"type", "function"}:
            raise InvalidArgument(f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}")
        unknown = set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise InvalidArgument(f"tools[{i}].function: unsupported field(s) {', '.join(sorted(unknown))}")
        name, description = function.get("name"), function.get("description", "")
        if not isinstance(name, str) or not isinstance(description, str):
            raise InvalidArgument(f"tools[{i}].function: name and description are text")
        out.append(pb.Tool(name=name, description=description))
        if "parameters" in function:
            out[-1].parameters.CopyFrom(_value(function["parameters"], f"tools[{i}].function.parameters"))
    return out


def _tool_choice(choice: Any) -> str:
    """OpenAI's tool_choice ("auto", "none", "required", or {type: function, function: {name}}) as text."""
    if choice in ("auto", "none", "required"):
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return function["name"]
    raise InvalidArgument('tool_choice must be "auto", "none", "required" or {"type": "function", '
                          '"function": {"name": ...}}')


class Reply:
    """OpenAI's answer objects for one request, from Infer's chunks."""

    def __init__(self, model: str, chat: bool, tools: bool) -> None:
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{next(_ids)}"
        self.created = int(time.time())
        self.model, self.chat, self.tools = model, chat, tools

    def _object(self, kind: str, choices: list[dict[str, Any]], usage: pb.InferUsage | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}
        return out

    def _tool_calls(self, final: pb.InferChunk, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The text before the first call, and the calls the final chunk carries."""
        if not self.tools:
            return text, []
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.name, "arguments": json.dumps(from_value(c.arguments), ensure_ascii=False)}}
                 for c in final.tool_calls]
        return text.split(TOOL_CALL_TAG, 1)[0], calls

    def whole(self, final: pb.InferChunk) -> dict[str, Any]:
        text, calls = self._tool_calls(final, final.text)
        finish = "tool_calls" if calls else FINISH.get(final.finish_reason, final.finish_reason)
        if not self.chat:
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return self._object("text_completion", [choice], final.usage)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return self._object("chat.completion", [choice], final.usage)

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._object("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        return self._object("text_completion", [choice])

    async def stream(self, chunks: AsyncIterator[pb.InferChunk], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """Chunks as OpenAI's stream objects. With tools, text is held back while it could be the
        start of a call, and the calls go out whole at the end."""
        try:
            first = await chunks.__anext__()  # Infer's refusals come before the stream begins
            if self.chat:
                yield self._delta({"role": "assistant", "content": ""})
            async for item in self._stream(_chain(first, chunks), include_usage):
                yield item
        finally:
            await chunks.aclose()  # now, not at garbage collection: it frees the engine's blocks

    async def _stream(self, chunks: AsyncIterator[pb.InferChunk], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        text = ""  # everything so far
        sent = 0  # characters of text sent as content
        in_calls = False
        async for chunk in chunks:
            text += chunk.text
            if not in_calls:
                upto = len(text)
                if self.tools:
                    tag = text.find(TOOL_CALL_TAG, max(0, sent - len(TOOL_CALL_TAG)))
                    in_calls = tag >= 0
                    upto = tag if in_calls else len(text) - _partial_tag(text)
                if upto > sent:
                    yield self._delta({"content": text[sent:upto]})
                    sent = upto
            if not chunk.finish_reason:
                continue
            _, calls = self._tool_calls(chunk, text)
            if calls and self.chat:
                yield self._delta({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]})
            elif sent < len(text) and not in_calls:
                yield self._delta({"content": text[sent:]})
            finish = "tool_calls" if calls else FINISH.get(chunk.finish_reason, chunk.finish_reason)
            yield self._delta({}, finish)
            if include_usage:
                yield self._object("chat.completion.chunk" if self.chat else "text_completion", [], chunk.usage)


async def _chain(first: pb.InferChunk, rest: AsyncIterator[pb.InferChunk]) -> AsyncIterator[pb.InferChunk]:
    yield first
    async for chunk in rest:
        yield chunk


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin a tool-call tag."""
    for n in range(min(len(TOOL_CALL_TAG) - 1, len(text)), 0, -1):
        if TOOL_CALL_TAG.startswith(text[-n:]):
            return n
    return 0


def add_routes(app: web.Application, kernel: Kernel, single_user: bool) -> None:
    api = OpenAI(kernel, single_user)
    app.router.add_get("/v1/models", api.models)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)

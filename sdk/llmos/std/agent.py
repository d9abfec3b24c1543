"""agent: an agent library for Python programs on llmos, in the userland standard library
(docs/userland-library.md; the Lua twin is llmos/std/agent.lua, `require "agent"`)::

    from llmos.std import agent
    from llmos.userland import sys

    def add(a: float, b: float) -> float:
        return a + b

    calc = agent.Agent(
        system="You are a careful assistant.",
        tools=[agent.read_file(), agent.write_file(),
               agent.tool(add, "Add two numbers", {"a": {"type": "number"}, "b": {"type": "number"}})],
        max_steps=6, token_budget=4000, memory="memory/calc.json")
    out = calc.run("What is 2 + 3?")          # {answer, steps, tokens, stopped, calls}
    pick = agent.decide("Is 5 prime?", ["yes", "no"])   # {"choice": ..., "reason": ...}

The loop: the model sees the system text, the notes of earlier runs (memory), the task and the
tools; each step it answers or calls tools (the kernel constrains calls so that their arguments
validate against the tool's schema); each call's result (or error) goes back as a `tool`
message. It stops at an answer, after max_steps (the last step may not call tools), or when the
token budget is spent. The conversation lives in a context (sys.context), so each step
prefills only its new messages; the budget counts the tokens each step computes: prompt tokens
not served from the cache, plus completion tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from llmos.userland import sys

MAX_READ = 4000  # bytes of a file shown to the model
MEMORY_NOTES = 8  # the most recent runs remembered


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], Any]

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """No other keys: the model's output ends where it should."""
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


def tool(fn: Callable[..., Any], description: str, properties: dict[str, Any], name: str | None = None) -> Tool:
    """One of the program's own functions as a tool: the model's arguments are its keyword arguments."""
    return Tool(name or fn.__name__, description, _object(properties), lambda args: fn(**args))


# -- tools that are syscalls ---------------------------------------------------------------------
def read_file() -> Tool:
    def run(args: dict[str, Any]) -> str:
        data = sys.fs.read(args["path"]).decode(errors="replace")
        return data[:MAX_READ] + "\n[cut]" if len(data) > MAX_READ else data

    return Tool("read_file", "Read a text file of the namespace's file store", _object({"path": {"type": "string"}}), run)


def write_file() -> Tool:
    def run(args: dict[str, Any]) -> dict[str, int]:
        return {"written": sys.fs.write(args["path"], args["content"]).size}

    return Tool("write_file", "Write a text file in the namespace's file store",
                _object({"path": {"type": "string"}, "content": {"type": "string"}}), run)


def list_files() -> Tool:
    def run(args: dict[str, Any]) -> list[str]:
        return [f.path + ("/" if f.is_dir else "") for f in sys.fs.list(args["path"])]

    return Tool("list_files", "List a directory of the namespace's file store ('' is the root)",
                _object({"path": {"type": "string"}}), run)


def spawn_agent(description: str = "Give a task to a sub-agent and wait for its answer", timeout_ms: float = 120_000,
                **spawn: Any) -> Tool:
    """A sub-agent: `spawn` says how to start it (path= or lua= or python=, limits=, ...); it gets
    {"task": TASK} as its args, and its result is the tool's."""
    def run(args: dict[str, Any]) -> Any:
        info = sys.wait(sys.spawn(args={"task": args["task"]}, **spawn), timeout_ms=timeout_ms)
        if info is None:
            raise TimeoutError("the sub-agent did not finish in time")
        if info.exit_reason != "normal":
            raise RuntimeError(f"the sub-agent ended: {info.error or info.exit_reason}")
        return info.result

    return Tool("spawn_agent", description, _object({"task": {"type": "string"}}), run)


def send() -> Tool:
    def run(args: dict[str, Any]) -> dict[str, int]:
        to = int(args["to"]) if args["to"].isdigit() else args["to"]
        return {"message_id": sys.send(to, args["text"], tag="agent")}

    return Tool("send", "Send a message to a process (by pid or registered name)",
                _object({"to": {"type": "string"}, "text": {"type": "string"}}), run)


def receive() -> Tool:
    def run(args: dict[str, Any]) -> dict[str, Any]:
        m = sys.recv(tag="agent", timeout_ms=1000)
        return {"from": m.sender, "text": m.body} if m is not None else {"none": True}

    return Tool("receive", "Take the next message sent to this agent, waiting up to a second", _object({}), run)


# -- memory: notes of earlier runs, in the namespace's file store -----------------------------------
def load_memory(path: str) -> list[dict[str, Any]]:
    try:
        notes = json.loads(sys.fs.read(path))
    except Exception:  # none yet, or unreadable: start afresh
        return []
    return notes if isinstance(notes, list) else []


def save_memory(path: str, notes: list[dict[str, Any]]) -> None:
    sys.fs.write(path, json.dumps(notes[-MEMORY_NOTES:]))


# -- the loop ----------------------------------------------------------------------------------------
class Agent:
    def __init__(self, system: str = "You are a helpful assistant. Use the tools when they help.",
                 tools: list[Tool] = (), max_steps: int = 6, token_budget: int = 6000, max_tokens: int = 200,
                 temperature: float = 0, first_tool_choice: str = "auto", memory: str | None = None) -> None:
        self.system, self.max_steps, self.token_budget = system, max_steps, token_budget
        self.max_tokens, self.temperature, self.first_tool_choice = max_tokens, temperature, first_tool_choice
        self.memory = memory
        self.tools = {t.name: t for t in tools}

    def run(self, task: str) -> dict[str, Any]:
        notes = load_memory(self.memory) if self.memory else []
        system = self.system
        if notes:
            system += "\n\nNotes from earlier runs:\n" + "\n".join(f"- {n.get('task')} => {n.get('answer')}" for n in notes)
        schemas = [t.schema() for t in self.tools.values()]
        ctx = sys.context.create([{"role": "system", "content": system}], tools=schemas or None)
        out: dict[str, Any] = {"steps": 0, "tokens": 0, "calls": [], "stopped": "steps", "answer": None}
        turn = [{"role": "user", "content": task}]
        try:
            for step in range(1, self.max_steps + 1):
                left = self.token_budget - out["tokens"]
                if left <= 0:
                    out["stopped"] = "budget"
                    break
                choice = "none" if step == self.max_steps else self.first_tool_choice if step == 1 else "auto"
                r = sys.infer(context=ctx, messages=turn, tool_choice=choice if schemas else None,
                              max_tokens=min(self.max_tokens, left), temperature=self.temperature)
                usage = r["usage"]
                out["steps"] = step
                out["tokens"] += usage["prompt_tokens"] - usage["cached_tokens"] + usage["completion_tokens"]
                if not r["tool_calls"]:
                    out["answer"] = r["text"]
                    out["stopped"] = "answer" if r["finish_reason"] == "stop" else r["finish_reason"]
                    break
                turn = []
                for call in r["tool_calls"]:
                    try:
                        result, ok = self.tools[call["name"]].run(call["arguments"]), True
                    except Exception as e:  # the model learns of it and may try again
                        result, ok = {"error": f"{type(e).__name__}: {e}"}, False
                    out["calls"].append({"name": call["name"], "arguments": call["arguments"], "ok": ok,
                                         "result": result})
                    turn.append({"role": "tool", "name": call["name"], "content": json.dumps(result, default=str)})
        finally:
            sys.context.drop(ctx)
        if self.memory:
            notes.append({"task": task, "answer": out["answer"] or f"(stopped: {out['stopped']})"})
            save_memory(self.memory, notes)
        return out


# -- structured outputs -------------------------------------------------------------------------------
def structured(messages: list[dict[str, str]], schema: dict[str, Any], max_tokens: int = 300,
               temperature: float = 0) -> Any:
    """The model's answer to `messages` as a value matching the JSON schema (None if it ran out of
    tokens first)."""
    r = sys.infer(messages=messages, json_schema=schema, max_tokens=max_tokens, temperature=temperature)
    return r.get("json")


def decide(question: str, options: list[str], **kw: Any) -> dict[str, str] | None:
    """A decision among `options`, with a short reason: {"choice", "reason"}."""
    schema = _object({"choice": {"enum": options}, "reason": {"type": "string", "maxLength": 200}})
    return structured([{"role": "system", "content": "Answer with a JSON object."},
                       {"role": "user", "content": question}], schema, **kw)

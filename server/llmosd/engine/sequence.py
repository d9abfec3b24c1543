"""Requests as the caller states them, the events they receive, and the engine's per-request state."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class InvalidRequest(ValueError):
    """A request the engine refuses, with the reason; the engine and other requests carry on."""


class UnknownContext(InvalidRequest):
    """The context handle names no context of this owner (dropped, or never created)."""


class ContextBusy(InvalidRequest):
    """The context is in use by another request; one request at a time continues a context."""


class KVLimitExceeded(InvalidRequest):
    """The owner's contexts would hold more KV cache than its limit (Engine.set_kv_limit)."""


class TokenBudgetExceeded(InvalidRequest):
    """The prompt alone uses up the request's token_budget."""


@dataclass
class Request:
    """One generation request. Exactly one of prompt, messages, prompt_ids is given.

    Sampling fields left None take the model's generation_config.json defaults (greedy without one).
    max_tokens None means as many as the context (and the KV pool) allows.

    At most one constraint: json_schema (a dict or its JSON text), regex (the whole output
    matches it) or grammar (GBNF, or llguidance's Lark); or tools (OpenAI-shaped, see tools.py)
    with tool_choice "auto" (default), "none", "required" or a tool ({"name": ...} or
    {"type": "function", "function": {"name": ...}}). context: continue a conversation context
    (Engine.create_context) with `messages` as the new turn; its tools are the context's (in its
    prompt whatever the tool_choice; "none" only leaves the output free).
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    priority: int = 0  # higher runs first
    owner: int = 0  # the calling process's pid: KV blocks are accounted to it
    deadline: float | None = None  # time.monotonic() after which the request is cancelled
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    context: int | None = None
    # Prompt plus generated tokens may not pass this (the caller's token quota left):
    # max_tokens is cut to what the prompt leaves.
    token_budget: int | None = None
    # Who shares the engine fairly with whom: within a priority, namespaces with requests waiting
    # get tokens in proportion to their weights (scheduler.py).
    namespace: str = ""
    namespace_weight: int = 100


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass
class ToolCall:
    """A call the model made: arguments validate against the tool's parameters schema."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class TokenEvent:
    """New output: text_delta may be empty (an incomplete UTF-8 character, or text held back
    while it could still be the start of a stop string); token_ids are the tokens sampled."""

    text_delta: str
    token_ids: list[int]


@dataclass
class FinishEvent:
    """The last event of a request. reason: "stop" (EOS, stop string, or a constraint's end),
    "length" (max_tokens: a constrained output is then incomplete), "cancelled" (by the caller
    or its deadline), or "error" (the engine failed this request; see error)."""

    reason: str
    usage: Usage
    text_delta: str = ""  # output held back until the end (partial stop-string match, bytes)
    error: str | None = None
    tool_calls: list[ToolCall] | None = None  # a request with tools: the calls made (maybe none)


Event = TokenEvent | FinishEvent


@dataclass(eq=False)
class Sequence:
    """A request inside the engine: its tokens, its KV blocks and its place in the schedule."""

    id: int
    request: Request
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator
    output: Any  # sampling.OutputText
    on_event: Callable[[Event], None]
    ticket: int  # round-robin position within a priority: lower runs first
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hash of each registered full block
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    cached_tokens: int | None = None  # prefix-cache hits at first admission
    slice_tokens: int = 0  # tokens processed since the ticket was last renewed
    waited: int = 0  # steps spent ready but not scheduled
    boost: int = 0  # priority earned by waiting (aging), spent with the next quantum
    scheduled: bool = False  # ran in the last step
    cancel_reason: str | None = None  # set by cancel()/deadline; acted on by the engine thread
    finished: bool = False
    constraint: Any = None  # constrain.Constraint: the grammar the output must match
    tool_choice: Any = None  # tools.ToolChoice: the output holds tool calls to parse
    context: Any = None  # contexts.Context this request continues (or creates)
    prefill_only: bool = False  # a context's creation: compute the prompt, sample nothing
    submitted_at: float = field(default_factory=time.monotonic)  # for the time to first token
    last_token_at: float = 0.0  # for the time between tokens

    @property
    def owner(self) -> int:
        return self.request.owner

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def effective_priority(self) -> int:
        return self.request.priority + self.boost

    def usage(self) -> Usage:
        return Usage(self.num_prompt, self.num_generated, self.cached_tokens or 0)


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Raise InvalidRequest for values sampling cannot use."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequest(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise InvalidRequest(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")

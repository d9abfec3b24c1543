"""llmosd.engine: the inference engine, usable without gRPC.

A Llama-family decoder (Llama, Mistral, Qwen2) on a paged KV cache with prefix caching, driven by
an iteration-level scheduler with continuous batching and priority/round-robin preemption.

    from llmosd.engine import Engine, EngineConfig, Request

    engine = Engine(EngineConfig(model="tiny", device="cpu", dtype="float32", kv_memory_bytes=64 << 20,
                                 max_batch=32, max_step_tokens=1024, token_quantum=256))
    engine.start()                              # the step loop runs on a daemon thread
    handle = engine.submit(Request(prompt="hi", max_tokens=16, owner=pid), on_event=callback)
    handle.cancel()                             # blocks freed, FinishEvent("cancelled") within a step
    result = engine.generate(Request(messages=[{"role": "user", "content": "hi"}]))
    result.text, result.token_ids, result.finish_reason, result.usage, result.tool_calls
    engine.kv_blocks_used(pid); engine.stats(); engine.stop()
    engine.tokenizer; engine.model_config; engine.max_context

Structured output (constrain.py): Request(json_schema=... | regex=... | grammar=...), or tools and
tool_choice (tools.py); the result's tool_calls hold the calls, whose arguments validate.
Conversation contexts (contexts.py):

    ctx = engine.create_context(messages, tools=None, owner=pid, priority=p).context_id
    engine.generate(Request(messages=[new turn], context=ctx, owner=pid))
    engine.fork_context(ctx, pid); engine.drop_context(ctx, pid); engine.drop_contexts(pid)
    engine.context_info(ctx, pid); engine.contexts_kv_bytes(pid); engine.set_kv_limit(pid, n)

Threading: every method above may be called from any thread. submit and the context calls
validate synchronously and raise InvalidRequest (a ValueError) with the reason, or one of its
kinds: UnknownContext (no such context for this owner), ContextBusy (one request at a time per
context), KVLimitExceeded (the owner's contexts would pass set_kv_limit). on_event runs on the
engine thread and must not block (from asyncio: loop.call_soon_threadsafe(queue.put_nowait,
event)): TokenEvent(text_delta, token_ids)... then exactly one FinishEvent(reason, usage,
text_delta, error, tool_calls), reason in stop | length | cancelled | error. A callback that
raises fails only its own request; so does a forward pass that fails for one sequence. Without
start(), step() (or handle.result()) drives the engine in the caller's thread.
"""
from .config import EngineConfig, ModelConfig
from .engine import Completion, Engine, EngineError, RequestHandle
from .loader import load_model
from .contexts import ContextInfo
from .sequence import (
    ContextBusy, Event, FinishEvent, InvalidRequest, KVLimitExceeded, Request, TokenBudgetExceeded, TokenEvent,
    ToolCall, UnknownContext, Usage,
)

__all__ = [
    "Completion",
    "ContextBusy",
    "ContextInfo",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Event",
    "FinishEvent",
    "InvalidRequest",
    "KVLimitExceeded",
    "TokenBudgetExceeded",
    "ModelConfig",
    "Request",
    "RequestHandle",
    "TokenEvent",
    "ToolCall",
    "UnknownContext",
    "Usage",
    "load_model",
]

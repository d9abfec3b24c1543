"""The Infer syscall and conversation contexts: the kernel's side of the inference engine.

Checks and converts requests (from RPCs and from Lua), charges tokens to the
calling process, and connects engine events to the party waiting for them:
an RPC's stream, or a Lua process blocked in sys.infer. The engine loads in
the background at start-up; requests made meanwhile wait for it.

Submitting a request tokenizes its prompt and compiles its constraint (json_schema, regex,
grammar, tools): milliseconds usually, seconds for a huge schema. So it never runs under the
kernel lock or on the server's event loop: a Lua process's request is submitted by a small pool of
threads (it is blocked meanwhile), an RPC's by asyncio's default executor.

Contexts (engine/contexts.py) belong to the process that created them (the
engine's owner is its pid): another process's handle is NOT_FOUND, they are
dropped when it ends, their KV bytes are its Usage.kv_bytes and its
limits.kv_bytes caps them (RESOURCE_EXHAUSTED).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from llmos.v1 import kernel_pb2 as pb

from llmos.values import from_value, to_value

from ..api import checks as C
from ..api.authority import DEFAULT_NAMESPACE
from ..api.identity import CALLER
from ..api.errors import FailedPrecondition, InvalidArgument, KernelError, NotFound, ResourceExhausted, Unavailable
from ..kernel.process import Process
from ..kernel.waiting import Waiter

if TYPE_CHECKING:
    from ..engine import Engine, EngineConfig, Request
    from ..kernel.kernel import Kernel

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # when a request gives none (0)
# Threads submitting Lua processes' requests and context creations (see the module docstring):
# enough that one slow compile does not hold up the others, few enough for 2 cores.
SUBMIT_THREADS = 4


class _EngineRequest:
    """The WaitQueue (waiting.py) a Lua process's infer waiter registers in: when the waiter
    leaves it (the process was killed), the engine request is cancelled, which frees its KV
    blocks at once."""

    __slots__ = ("cancel",)

    def __init__(self, cancel: Callable[[], None]) -> None:
        self.cancel = cancel

    def append(self, entry: Any) -> None:
        pass  # the engine holds the request; nothing to keep here

    def remove(self, entry: Any) -> None:
        self.cancel()


def _finished(kernel: Kernel, waiter: Waiter, result: Any) -> None:
    """Complete a Lua process's waiter with what its engine request ended with. The request is out of
    its _EngineRequest queue: there is nothing left to cancel, and the queue (which holds the request,
    which holds the callback that holds the waiter) must not keep the waiter and its result."""
    with kernel.lock:
        waiter.queue = None
        waiter.complete(result)


class Inference:
    def __init__(self, kernel: Kernel, config: EngineConfig,
                 on_failed: Callable[[str], None] | None = None) -> None:
        """`on_failed` is told (from the loading thread) why the model failed to load."""
        self.kernel = kernel
        self.config = config
        self.on_failed = on_failed
        self.engine: Engine | None = None
        self.error: str | None = None
        self._ready = threading.Event()
        self._pending: list[Callable[[], None]] = []  # Lua requests made while loading
        self._submitter = ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="infer-submit")
        self._started = time.monotonic()
        threading.Thread(target=self._load, name="engine-load", daemon=True).start()

    def _load(self) -> None:
        try:
            log.info("loading the inference engine (model %s)", self.config.model)
            from ..engine import Engine  # torch is imported here, not at server start

            engine = Engine(self.config)
            engine.start()
            log.info("inference engine ready in %.1f s: model %s on %s (%s), attention backend %s",
                     time.monotonic() - self._started, self.config.model, self.config.device, self.config.dtype,
                     engine.stats().get("backend"))
            self.engine = engine
        except Exception as e:  # a bad model directory must not take the kernel down: on_failed decides
            log.debug("inference engine failed to load", exc_info=True)
            self.error = f"the model {self.config.model} failed to load: {e}"
            if self.on_failed is not None:
                self.on_failed(self.error)
        with self.kernel.lock:
            pending, self._pending = self._pending, []
            self._ready.set()
        for submit in pending:
            submit()

    @property
    def loaded(self) -> bool:
        """The engine is ready (False while loading, and for good if it failed to load)."""
        return self.engine is not None

    def stop(self) -> None:
        self._submitter.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.stop()

    def _engine(self) -> Engine:
        if self.engine is None:
            raise Unavailable(self.error or "the model is still loading; retry shortly")
        return self.engine

    # -- requests ------------------------------------------------------------------------
    def _charge_check(self, proc: Process | None) -> None:
        if proc is not None and proc.limits.tokens and proc.tokens >= proc.limits.tokens:
            raise ResourceExhausted(
                f"pid {proc.pid} has used {proc.tokens} tokens of its limit of {proc.limits.tokens}"
            )

    def _charge(self, pid: int, namespace: str, usage: Any) -> None:
        """Charge a request's tokens to its namespace (Request.namespace: its process's, or for a
        request without one, a client's Infer or an OpenAI completion, the caller's) and process."""
        self.kernel.namespaces.charge_tokens(namespace, usage.prompt_tokens + usage.completion_tokens)
        if not pid:
            return
        with self.kernel.lock:
            proc = self.kernel.procs.get(pid)
            if proc is not None:
                proc.tokens += usage.prompt_tokens + usage.completion_tokens

    def build_request(self, spec: dict[str, Any], proc: Process | None) -> Request:
        """A checked engine Request from plain values (what Lua or an RPC gave)."""
        from ..engine import Request

        C.known_options(spec, C.INFER_OPTIONS, "sys.infer")
        prompt, messages, context = spec.get("prompt"), spec.get("messages"), spec.get("context")
        if context is not None:
            context = C.context_handle(context)
            if proc is None:
                raise InvalidArgument("a request on a context needs the calling process (pid) that owns it")
            if prompt is not None:
                raise InvalidArgument("a request on a context gives its new turn as messages, not a prompt")
            messages = C.chat(messages, allow_empty=True) if messages is not None else []
        elif (prompt is None) == (messages is None):
            raise InvalidArgument("give exactly one of prompt (text) or messages (a chat)")
        elif messages is not None:
            messages = C.chat(messages)
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise InvalidArgument("prompt must be non-empty text")
        for key in ("temperature", "top_p"):
            value = spec.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value) or value < 0):
                raise InvalidArgument(f"{key} must be a finite number >= 0")
        if spec.get("top_p") is not None and not 0 < spec["top_p"] <= 1:
            raise InvalidArgument("top_p must be in (0, 1]")
        for key in ("max_tokens", "top_k", "seed"):
            value = spec.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidArgument(f"{key} must be a non-negative integer")
        stop = C.stop_strings(spec.get("stop"))
        timeout = spec.get("timeout_ms")
        if timeout is not None and C.duration_ms(timeout, "timeout_ms") == 0:
            raise InvalidArgument("timeout_ms must be a positive number")
        caller = CALLER.get()
        namespace = proc.namespace if proc is not None else caller.namespace if caller is not None else DEFAULT_NAMESPACE
        budgets = [budget for budget in (
            proc.limits.tokens - proc.tokens if proc is not None and proc.limits.tokens else None,
            self.kernel.namespaces.token_budget(namespace),  # RESOURCE_EXHAUSTED when none is left
        ) if budget is not None]
        priority = spec.get("priority")
        if priority is None:
            priority = proc.priority if proc is not None else 0
        else:
            priority = C.priority(priority)
        return Request(
            prompt=prompt, messages=messages, max_tokens=spec.get("max_tokens") or DEFAULT_MAX_TOKENS,
            temperature=spec.get("temperature"), top_p=spec.get("top_p"), top_k=spec.get("top_k") or None,
            seed=spec.get("seed"), stop=stop, priority=priority, owner=proc.pid if proc is not None else 0,
            token_budget=min(budgets, default=None),
            deadline=time.monotonic() + C.duration_ms(timeout, "timeout_ms") / 1000 if timeout else None,
            json_schema=spec.get("json_schema"), regex=spec.get("regex"), grammar=spec.get("grammar"),
            tools=spec.get("tools"), tool_choice=C.tool_choice(spec.get("tool_choice")), context=context,
            namespace=namespace, namespace_weight=self.kernel.namespaces.weight(namespace),
        )

    def _submit(self, request: Request, on_event: Callable[[Any], None], kv_limit: int) -> Any:
        """Submit to the loaded engine; the engine's refusals as kernel errors. kv_limit: the
        calling process's limits.kv_bytes (0: none), which a request on a context must keep to."""
        engine = self._engine()
        try:
            if request.context is not None:
                engine.set_kv_limit(request.owner, kv_limit or None)
            return engine.submit(request, on_event)
        except ValueError as e:
            raise engine_error(e) from None

    def _parsed(self, text: str) -> Any:
        """A schema-constrained output as a value (Lua has no JSON parser); None if it does not
        fit the value model (an integer beyond 2^53, say)."""
        try:
            return C.value(json.loads(text), "json", self.kernel.config.max_message_bytes)
        except (ValueError, KernelError):
            return None

    def submit_from_lua(self, proc: Process, waiter: Waiter, spec: Any) -> None:
        """sys.infer: submit and complete `waiter` with the result (kernel lock held)."""
        if not isinstance(spec, dict):
            raise InvalidArgument("sys.infer takes a table like {prompt=..., max_tokens=...}")
        self._charge_check(proc)
        request = self.build_request(spec, proc)
        pid, kv_limit = proc.pid, proc.limits.kv_bytes

        def finished(event: Any, text: str) -> None:
            result: Any
            if event.reason == "error":
                result = KernelError(f"inference failed: {event.error}")
            else:
                u = event.usage
                result = {"text": text, "finish_reason": event.reason,
                          "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                                    "cached_tokens": u.cached_tokens}}
                if event.tool_calls is not None:
                    result["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                                            for c in event.tool_calls]
                if request.json_schema is not None and event.reason == "stop":
                    result["json"] = self._parsed(text)
            self._charge(pid, request.namespace, event.usage)
            _finished(self.kernel, waiter, result)

        def submit() -> None:
            try:
                handle = self._submit(request, _collector(finished, self.kernel), kv_limit)
            except KernelError as e:
                with self.kernel.lock:
                    waiter.complete(e)
                return
            with self.kernel.lock:
                if waiter.done:  # killed meanwhile
                    handle.cancel()
                else:
                    waiter.register(_EngineRequest(handle.cancel), waiter)

        self._submit_for_lua(submit, waiter)

    def _submit_for_lua(self, submit: Callable[[], None], waiter: Waiter) -> None:
        """Run `submit` (a Lua process's request, which completes `waiter`) in the submitting pool,
        or once the engine has loaded (kernel lock held). A kernel bug in it fails the call rather
        than leave the process blocked for ever."""
        def guarded() -> None:
            try:
                submit()
            except Exception as e:
                log.exception("submitting a Lua process's inference request failed")
                with self.kernel.lock:
                    if not waiter.done:
                        waiter.complete(KernelError(f"inference failed: {e!r}"))

        if self._ready.is_set():
            self._submitter.submit(guarded)
        else:
            self._pending.append(guarded)

    async def infer_rpc(self, req: pb.InferRequest) -> AsyncIterator[pb.InferChunk]:
        """The Infer RPC: stream chunks (or one final chunk) for the request (charged to the
        caller's namespace, build_request)."""
        with self.kernel.lock:
            proc = self.kernel.live_locked(req.pid, "caller") if req.pid else None
            self._charge_check(proc)
            kv_limit = proc.limits.kv_bytes if proc is not None else 0
        if not req.prompt and not req.messages and not req.context_id:
            raise InvalidArgument("the prompt is empty: give prompt text or chat messages")
        # A schema or tools can be megabytes of values to convert: off the event loop too.
        request = await asyncio.to_thread(self._request_from_pb, req, proc)
        if not self._ready.is_set():
            await asyncio.to_thread(self._ready.wait)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = await _submitted(self._submit, request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                                  kv_limit)
        text: list[str] = []
        ids: list[int] = []
        try:
            while True:
                event = await events.get()
                usage = getattr(event, "usage", None)
                if usage is None:  # a TokenEvent
                    if req.stream:
                        yield pb.InferChunk(text=event.text_delta, token_ids=event.token_ids)
                    else:
                        text.append(event.text_delta)
                        ids.extend(event.token_ids)
                    continue
                self._charge(req.pid, request.namespace, usage)
                if event.reason == "error":
                    raise KernelError(f"inference failed: {event.error}")
                final = pb.InferChunk(
                    text=("".join(text) if not req.stream else "") + event.text_delta,
                    token_ids=ids if not req.stream else [], finish_reason=event.reason,
                    usage=pb.InferUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                        cached_tokens=usage.cached_tokens),
                    tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=to_value(c.arguments))
                                for c in event.tool_calls or ()],
                )
                yield final
                return
        finally:
            handle.cancel()  # a no-op once finished; frees the blocks if the client went away

    def _request_from_pb(self, req: pb.InferRequest, proc: Process | None) -> Request:
        """The engine Request for an Infer RPC's request (build_request checks it)."""
        spec: dict[str, Any] = {
            "prompt": req.prompt or None,
            "messages": _chat_from_pb(req.messages) if req.messages or req.context_id else None,
            "max_tokens": req.sampling.max_tokens or None,
            "stop": list(req.sampling.stop),
            "timeout_ms": req.timeout_ms if req.HasField("timeout_ms") else None,
            "json_schema": from_value(req.json_schema) if req.HasField("json_schema") else None,
            "regex": req.regex or None,
            "grammar": req.grammar or None,
            "tools": _tools_from_pb(req.tools),
            "tool_choice": req.tool_choice or None,
            "context": req.context_id or None,
        }
        for key in ("temperature", "top_p", "top_k", "seed"):
            if req.sampling.HasField(key):
                spec[key] = getattr(req.sampling, key)
        if req.HasField("priority"):
            spec["priority"] = req.priority
        return self.build_request(spec, proc)

    # -- conversation contexts ----------------------------------------------------------------
    def _create_context(self, proc: Process, spec: dict[str, Any], on_event: Callable[[Any], None]) -> Any:
        """Create a context owned by `proc`; the engine's handle, which finishes ("stop") when the
        messages are prefilled. Call _drop_if_ended after it unless the kernel lock is held."""
        C.known_options(spec, C.CONTEXT_OPTIONS, "sys.context.create")
        messages, tools = C.chat(spec.get("messages")), spec.get("tools")
        engine = self._engine()
        self._check_kv_quota(proc.namespace)
        try:
            engine.set_kv_limit(proc.pid, proc.limits.kv_bytes or None)
            return engine.create_context(messages, tools=tools, owner=proc.pid, priority=proc.priority,
                                         on_event=on_event)
        except ValueError as e:
            raise engine_error(e) from None

    def _check_kv_quota(self, namespace: str) -> None:
        """A new context (or fork) while the namespace's contexts hold its KV quota or more is
        RESOURCE_EXHAUSTED. (With the kernel lock held or not: the processes are read as a copy.)"""
        quota = self.kernel.namespaces.quotas(namespace).kv_bytes
        if quota and self.namespace_kv_bytes(namespace) >= quota:
            raise ResourceExhausted(f"namespace {namespace!r}'s conversation contexts hold its KV quota "
                                    f"of {quota} bytes (drop one first)")

    def namespace_kv_bytes(self, namespace: str) -> int:
        """KV cache bytes the contexts of the namespace's processes hold."""
        return sum(self.kv_bytes(p.pid) for p in list(self.kernel.procs.values()) if p.namespace == namespace)

    def _drop_if_ended(self, pid: int, context: int) -> None:
        """Drop a context made for a process that ended meanwhile (its end dropped those it had
        then). Kernel lock not held."""
        with self.kernel.lock:
            alive = pid in self.kernel.procs
        if not alive:
            self.drop_context(pid, context, missing_ok=True)

    def create_from_lua(self, proc: Process, waiter: Waiter, spec: Any) -> None:
        """sys.context.create: complete `waiter` with the handle once prefilled (kernel lock held)."""
        if not isinstance(spec, dict):
            raise InvalidArgument("sys.context.create takes a table like {messages=..., tools=...}")
        C.known_options(spec, C.CONTEXT_OPTIONS, "sys.context.create")
        C.chat(spec.get("messages"))  # refused now, before any wait

        def finished(event: Any, _text: str) -> None:
            named.wait()  # (the prefill can end before the submitting thread has read the handle)
            result: Any = context_id[0]
            if event.reason != "stop":
                result = KernelError(f"sys.context.create: the prefill ended with {event.reason}: {event.error}")
            _finished(self.kernel, waiter, result)

        context_id: list[int] = []
        named = threading.Event()

        def submit() -> None:
            try:
                handle = self._create_context(proc, spec, _collector(finished, self.kernel))
            except KernelError as e:
                with self.kernel.lock:
                    waiter.complete(e)
                return
            context_id.append(handle.context_id)
            named.set()
            self._drop_if_ended(proc.pid, handle.context_id)
            with self.kernel.lock:
                if waiter.done:  # killed meanwhile: its end drops the context
                    handle.cancel()
                else:
                    waiter.register(_EngineRequest(handle.cancel), waiter)

        self._submit_for_lua(submit, waiter)

    async def create_context_rpc(self, req: pb.CreateContextRequest) -> pb.ContextInfo:
        pid = C.pid(req.pid, "pid")
        with self.kernel.lock:
            proc = self.kernel.live_locked(pid, "owner")
        spec = {"messages": _chat_from_pb(req.messages), "tools": _tools_from_pb(req.tools)}
        C.chat(spec["messages"])
        await asyncio.to_thread(self._ready.wait)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def on_event(event: Any) -> None:
            if getattr(event, "usage", None) is not None:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(event))

        handle = await _submitted(self._create_context, proc, spec, on_event)
        self._drop_if_ended(pid, handle.context_id)
        try:
            event = await done
        except asyncio.CancelledError:
            self.drop_context(pid, handle.context_id, missing_ok=True)
            raise
        if event.reason != "stop":
            raise FailedPrecondition(f"the context's prefill ended with {event.reason}: {event.error or 'dropped'}")
        return self._context_pb(pid, handle.context_id)

    def _context_pb(self, pid: int, context: int) -> pb.ContextInfo:
        try:
            info = self._engine().context_info(context, pid)
        except ValueError as e:
            raise engine_error(e) from None
        return pb.ContextInfo(context_id=info.id, tokens=info.tokens, kv_bytes=info.kv_bytes)

    def fork_context(self, pid: int, context: Any) -> int:
        """A copy-on-write fork of the process's context; its handle (kernel lock not held)."""
        context = C.context_handle(context)
        with self.kernel.lock:
            owner = self.kernel.live_locked(pid, "owner")
            limit, namespace = owner.limits.kv_bytes, owner.namespace
        if self.engine is None:
            raise NotFound(f"no context {context}")
        self._check_kv_quota(namespace)
        try:
            self.engine.set_kv_limit(pid, limit or None)
            fork = self.engine.fork_context(context, pid)
        except ValueError as e:
            raise engine_error(e) from None
        self._drop_if_ended(pid, fork)
        return fork

    async def fork_context_rpc(self, req: pb.ForkContextRequest) -> pb.ContextInfo:
        pid = C.pid(req.pid, "pid")
        return self._context_pb(pid, self.fork_context(pid, req.context_id))

    def drop_context(self, pid: int, context: Any, missing_ok: bool = False) -> None:
        context = C.context_handle(context)
        if self.engine is None:
            raise NotFound(f"no context {context}")
        try:
            self.engine.drop_context(context, pid)
        except ValueError as e:
            if not missing_ok:
                raise engine_error(e) from None

    def kv_bytes(self, pid: int) -> int:
        """KV cache bytes the process's contexts hold (Usage.kv_bytes)."""
        return self.engine.contexts_kv_bytes(pid) if self.engine is not None else 0

    def process_ended(self, pid: int) -> None:
        """Free the process's contexts (kernel lock held: the engine's lock never waits for it)."""
        if self.engine is not None:
            self.engine.drop_contexts(pid)
            self.engine.set_kv_limit(pid, None)


def engine_error(e: ValueError) -> KernelError:
    """The engine's refusal (InvalidRequest or one of its kinds) as a kernel error."""
    from ..engine import ContextBusy, KVLimitExceeded, TokenBudgetExceeded, UnknownContext

    if isinstance(e, UnknownContext):
        return NotFound(str(e))
    if isinstance(e, ContextBusy):
        return FailedPrecondition(str(e))
    if isinstance(e, (KVLimitExceeded, TokenBudgetExceeded)):
        return ResourceExhausted(str(e))
    return InvalidArgument(str(e))


def _chat_from_pb(messages: Any) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages]


def _tools_from_pb(tools: Any) -> list[dict[str, Any]] | None:
    return [{"name": t.name, "description": t.description,
             **({"parameters": from_value(t.parameters)} if t.HasField("parameters") else {})}
            for t in tools] or None


async def _submitted(submit: Callable[..., Any], *args: Any) -> Any:
    """`submit(*args)` (an engine submission: its handle) in a thread, off the event loop. If the
    caller goes away meanwhile, the handle is cancelled when it comes (its KV blocks freed)."""
    future = asyncio.ensure_future(asyncio.to_thread(submit, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().cancel())
        raise


def _collector(finished: Callable[[Any, str], None], kernel: Kernel) -> Callable[[Any], None]:
    """An engine callback that gathers the text and, at the end, hands the result to
    the timer thread: the engine thread must not wait for the kernel lock."""
    text: list[str] = []

    def on_event(event: Any) -> None:
        text.append(event.text_delta)
        if getattr(event, "usage", None) is not None:
            kernel.timers.call_later(0, lambda: finished(event, "".join(text)))

    return on_event


"""The Infer syscall: the kernel's side of the inference engine.

Checks and converts requests (from RPCs and from Lua), charges tokens to the
calling process, and connects engine events to the party waiting for them:
an RPC's stream, or a Lua process blocked in sys.infer. The engine loads in
the background at start-up; requests made meanwhile wait for it.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from llmos.v1 import kernel_pb2 as pb

from ..api import checks as C
from ..api.errors import InvalidArgument, KernelError, ResourceExhausted, Unavailable
from ..kernel.process import Process
from ..kernel.waiting import Waiter

if TYPE_CHECKING:
    from ..engine import Engine, EngineConfig, Request
    from ..kernel.kernel import Kernel

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 256  # when a request gives none (0)
LUA_FIELDS = {"prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "priority",
              "timeout_ms"}


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


class Inference:
    def __init__(self, kernel: Kernel, config: EngineConfig) -> None:
        self.kernel = kernel
        self.config = config
        self.engine: Engine | None = None
        self.error: str | None = None
        self._ready = threading.Event()
        self._pending: list[Callable[[], None]] = []  # Lua requests made while loading
        threading.Thread(target=self._load, name="engine-load", daemon=True).start()

    def _load(self) -> None:
        try:
            from ..engine import Engine  # torch is imported here, not at server start

            engine = Engine(self.config)
            engine.start()
            log.info("inference engine ready: model %s on %s (%s), attention backend %s",
                     self.config.model, self.config.device, self.config.dtype, engine.stats().get("backend"))
            self.engine = engine
        except Exception as e:  # a bad model directory must not take the kernel down
            log.exception("inference engine failed to load")
            self.error = f"the inference engine failed to load: {e}"
        with self.kernel.lock:
            pending, self._pending = self._pending, []
            self._ready.set()
        for submit in pending:
            submit()

    def stop(self) -> None:
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

    def _charge(self, pid: int, usage: Any) -> None:
        with self.kernel.lock:
            proc = self.kernel.procs.get(pid)
            if proc is not None:
                proc.tokens += usage.prompt_tokens + usage.completion_tokens

    def build_request(self, spec: dict[str, Any], proc: Process | None) -> Request:
        """A checked engine Request from plain values (what Lua or an RPC gave)."""
        from ..engine import Request

        prompt, messages = spec.get("prompt"), spec.get("messages")
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give exactly one of prompt (text) or messages (a chat)")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise InvalidArgument("prompt must be non-empty text")
        if messages is not None:
            messages = _check_messages(messages)
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
        stop = spec.get("stop") or []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidArgument("stop must be a list of non-empty strings")
        timeout = spec.get("timeout_ms")
        if timeout is not None and C.duration_ms(timeout, "timeout_ms") == 0:
            raise InvalidArgument("timeout_ms must be a positive number")
        priority = spec.get("priority")
        if priority is None:
            priority = proc.priority if proc is not None else 0
        else:
            priority = C.priority(priority)
        return Request(
            prompt=prompt, messages=messages, max_tokens=spec.get("max_tokens") or DEFAULT_MAX_TOKENS,
            temperature=spec.get("temperature"), top_p=spec.get("top_p"), top_k=spec.get("top_k") or None,
            seed=spec.get("seed"), stop=stop, priority=priority, owner=proc.pid if proc is not None else 0,
            token_budget=proc.limits.tokens - proc.tokens if proc is not None and proc.limits.tokens else None,
            deadline=time.monotonic() + C.duration_ms(timeout, "timeout_ms") / 1000 if timeout else None,
        )

    def submit_from_lua(self, proc: Process, waiter: Waiter, spec: Any) -> None:
        """sys.infer: submit and complete `waiter` with the result (kernel lock held)."""
        if not isinstance(spec, dict) or set(spec) - LUA_FIELDS:
            unknown = sorted(set(spec) - LUA_FIELDS) if isinstance(spec, dict) else []
            raise InvalidArgument(f"sys.infer: unknown field(s) {', '.join(unknown)}" if unknown
                                  else "sys.infer takes a table like {prompt=..., max_tokens=...}")
        self._charge_check(proc)
        request = self.build_request(spec, proc)
        pid = proc.pid

        def finished(event: Any, text: str) -> None:
            result: Any
            if event.reason == "error":
                result = KernelError(f"inference failed: {event.error}")
            else:
                u = event.usage
                result = {"text": text, "finish_reason": event.reason,
                          "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                                    "cached_tokens": u.cached_tokens}}
            self._charge(pid, event.usage)
            with self.kernel.lock:
                waiter.complete(result)

        def submit() -> None:
            try:
                handle = self._engine().submit(request, _collector(finished, self.kernel))
            except (KernelError, ValueError) as e:
                error = e if isinstance(e, KernelError) else _engine_error(e)
                with self.kernel.lock:
                    waiter.complete(error)
                return
            with self.kernel.lock:
                if waiter.done:  # killed while loading
                    handle.cancel()
                else:
                    waiter.register(_EngineRequest(handle.cancel), waiter)

        if self._ready.is_set():
            try:
                handle = self._engine().submit(request, _collector(finished, self.kernel))
            except ValueError as e:  # the engine's own checks (InvalidRequest)
                raise _engine_error(e) from None
            waiter.register(_EngineRequest(handle.cancel), waiter)
        else:
            self._pending.append(submit)

    async def infer_rpc(self, req: pb.InferRequest) -> AsyncIterator[pb.InferChunk]:
        """The Infer RPC: stream chunks (or one final chunk) for the request."""
        with self.kernel.lock:
            proc = self.kernel.live_locked(req.pid, "caller") if req.pid else None
            self._charge_check(proc)
        if not req.prompt and not req.messages:
            raise InvalidArgument("the prompt is empty: give prompt text or chat messages")
        spec: dict[str, Any] = {
            "prompt": req.prompt or None,
            "messages": [{"role": m.role, "content": m.content} for m in req.messages] or None,
            "max_tokens": req.sampling.max_tokens or None,
            "stop": list(req.sampling.stop),
            "timeout_ms": req.timeout_ms if req.HasField("timeout_ms") else None,
        }
        for key in ("temperature", "top_p", "top_k", "seed"):
            if req.sampling.HasField(key):
                spec[key] = getattr(req.sampling, key)
        if req.HasField("priority"):
            spec["priority"] = req.priority
        request = self.build_request(spec, proc)
        await asyncio.to_thread(self._ready.wait)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = self._engine().submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except ValueError as e:
            raise _engine_error(e) from None
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
                if req.pid:
                    self._charge(req.pid, usage)
                if event.reason == "error":
                    raise KernelError(f"inference failed: {event.error}")
                final = pb.InferChunk(
                    text=("".join(text) if not req.stream else "") + event.text_delta,
                    token_ids=ids if not req.stream else [], finish_reason=event.reason,
                    usage=pb.InferUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                        cached_tokens=usage.cached_tokens),
                )
                yield final
                return
        finally:
            handle.cancel()  # a no-op once finished; frees the blocks if the client went away


def _collector(finished: Callable[[Any, str], None], kernel: Kernel) -> Callable[[Any], None]:
    """An engine callback that gathers the text and, at the end, hands the result to
    the timer thread: the engine thread must not wait for the kernel lock."""
    text: list[str] = []

    def on_event(event: Any) -> None:
        text.append(event.text_delta)
        if getattr(event, "usage", None) is not None:
            kernel.timers.call_later(0, lambda: finished(event, "".join(text)))

    return on_event


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}] must be a table/object with role and content")
        unknown = set(m) - {"role", "content"}
        if unknown:
            raise InvalidArgument(f"messages[{i}]: unknown field(s) {', '.join(sorted(unknown))}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}]: role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{i}]: content must be text")
        out.append({"role": role, "content": content})
    return out


def _engine_error(e: ValueError) -> KernelError:
    """The status of a request the engine refused (its InvalidRequest kinds)."""
    from ..engine import KVLimitExceeded, TokenBudgetExceeded

    if isinstance(e, (TokenBudgetExceeded, KVLimitExceeded)):
        return ResourceExhausted(str(e))
    return InvalidArgument(str(e))

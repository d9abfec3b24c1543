"""The engine: validates requests, runs the step loop on its own thread, delivers events."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple

import torch
from prometheus_client import Histogram

from . import tools as tool_use
from .attention import select_backend
from .block_manager import BlockManager
from .config import EngineConfig, ModelConfig
from .constrain import Grammars
from .contexts import Context, ContextInfo, Contexts
from .kv_cache import KVCache, bytes_per_block
from .loader import DTYPES, load_model
from .runner import ModelRunner
from .sampling import OutputText, sample
from .scheduler import Scheduler
from .sequence import (
    Event, FinishEvent, InvalidRequest, Request, Sequence, TokenBudgetExceeded, TokenEvent, ToolCall, UnknownContext,
    check_sampling,
)
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_STEPS = 4096  # steps remembered for the recent batch sizes and tokens/s


def _no_one_to_tell(event: Event) -> None:
    """A finished sequence's callback: it has no one left to tell."""


class EngineError(RuntimeError):
    """The engine failed a request (FinishEvent reason "error")."""


class Completion(NamedTuple):
    text: str  # the whole output, tool-call markup included
    token_ids: list[int]
    finish_reason: str
    usage: object  # sequence.Usage
    tool_calls: list[ToolCall] | None = None  # a request with tools: the calls made


class RequestHandle:
    """A submitted request: cancel it, or wait for its whole result."""

    def __init__(self, engine: "Engine", seq: Sequence, on_event: Callable[[Event], None] | None) -> None:
        self._engine, self._seq, self._user_callback = engine, seq, on_event
        self.context_id: int | None = seq.context.id if seq.context is not None else None
        self._text: list[str] = []
        self._ids: list[int] = []
        self._finish: FinishEvent | None = None
        self._done = threading.Event()

    @property
    def id(self) -> int:
        return self._seq.id

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self._text.append(event.text_delta)
            self._ids.extend(event.token_ids)
        else:
            self._text.append(event.text_delta)
            self._finish = event
            self._done.set()
        if self._user_callback is not None:
            self._user_callback(event)

    def cancel(self) -> None:
        """Stop the request; its blocks are freed and its FinishEvent("cancelled") sent within one step."""
        self._engine._cancel(self._seq, "cancelled")

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end (driving the engine in this thread if it was not started)."""
        if not self._engine.running:
            while not self._done.is_set():
                self._engine.step()
        elif not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout}s")
        assert self._finish is not None
        if self._finish.reason == "error":
            raise EngineError(self._finish.error)
        finish = self._finish
        return Completion("".join(self._text), list(self._ids), finish.reason, finish.usage, finish.tool_calls)


class Engine:
    """See the package docstring for the API and the threading contract."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model, config.device, config.dtype, config.seed)
        self.model_config: ModelConfig = loaded.config
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.defaults = loaded.generation_defaults
        device = torch.device(config.device)
        self.kv = KVCache.allocate(self.model_config, config.kv_memory_bytes, config.block_size, device, DTYPES[config.dtype])
        self.backend = select_backend(device, DTYPES[config.dtype])
        self.blocks = BlockManager(self.kv.num_blocks, config.block_size)
        self._lock = threading.Condition()
        block_bytes = bytes_per_block(self.model_config, config.block_size, DTYPES[config.dtype])
        self.contexts = Contexts(self.tokenizer, self.blocks, block_bytes, self._lock)
        self.scheduler = Scheduler(
            self.blocks, config.max_batch, config.max_step_tokens, config.token_quantum, config.aging_steps,
            self.contexts.idle,
        )
        self.runner = ModelRunner(loaded.model, self.kv, self.backend)
        self.max_context = min(self.model_config.max_position_embeddings, config.max_context or math.inf)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_config.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._incoming: list[Sequence] = []
        self._operations: list[Callable[[], None]] = []  # block moves of contexts, run on the engine thread
        self._incoming_top = -math.inf  # highest priority in _incoming: read between layers
        self._next_id = 1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.interrupts = 0  # steps paused between layers for a more important arrival
        self.generated_tokens = 0
        # For /metrics (api/metrics.py), observed as tokens come (not registered anywhere: the
        # server's collector reports them).
        self.ttft = Histogram("llmos_engine_time_to_first_token_seconds", "From submit to a request's first token",
                              buckets=LATENCY_BUCKETS_S, registry=None)
        self.inter_token = Histogram("llmos_engine_inter_token_seconds", "Between a request's successive tokens",
                                     buckets=LATENCY_BUCKETS_S, registry=None)
        self.recent_steps: deque[tuple[float, int, int]] = deque(maxlen=RECENT_STEPS)  # (end, batch, tokens)
        log.info(
            "engine: %s (%s) on %s %s, %d KV blocks of %d tokens, attention %s",
            config.model, self.model_config.architecture, config.device, config.dtype,
            self.kv.num_blocks, config.block_size, self.backend.name,
        )

    # ---- the public API -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the step loop on a background (daemon) thread."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmosd-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still live finish with reason "cancelled"."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            leftover, self._incoming = self.scheduler.seqs + self._incoming, []
        for seq in leftover:
            self._finish(seq, "cancelled", error="engine stopped")

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> RequestHandle:
        """Validate (raising InvalidRequest) and queue a request. on_event(event) is called on the
        engine thread: TokenEvents, then exactly one FinishEvent. It must not block."""
        if request.context is None:
            return self._submit(request, on_event, None)
        with self._lock:
            ctx = self.contexts.claim(request.context, request.owner)
        try:
            return self._submit(request, on_event, ctx)
        except BaseException:
            with self._lock:
                ctx.claimed = False
                if ctx.dropped:  # dropped while this request was being built
                    self._operate(lambda: self.blocks.release(ctx))  # type: ignore[arg-type]
            raise

    def _submit(self, request: Request, on_event: Callable[[Event], None] | None, ctx: Context | None) -> RequestHandle:
        choice = self._tool_choice(request, ctx)
        prompt_ids = self._prompt_ids(request, ctx, choice)
        temperature = self.defaults["temperature"] if request.temperature is None else request.temperature
        top_p = self.defaults["top_p"] if request.top_p is None else request.top_p
        top_k = self.defaults["top_k"] if request.top_k is None else request.top_k
        check_sampling(temperature, top_p, top_k)
        if not isinstance(request.stop, list) or not all(isinstance(s, str) and s for s in request.stop):
            raise InvalidRequest("stop must be a list of non-empty strings")
        limit = self._room(prompt_ids)
        max_tokens = limit - len(prompt_ids) if request.max_tokens is None else request.max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {request.max_tokens!r}")
        if len(prompt_ids) + max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context length ({limit})"
            )
        if request.token_budget is not None:
            if len(prompt_ids) >= request.token_budget:
                raise TokenBudgetExceeded(f"the prompt ({len(prompt_ids)} tokens) leaves nothing of the "
                                          f"token budget ({request.token_budget})")
            max_tokens = min(max_tokens, request.token_budget - len(prompt_ids))
        if not isinstance(request.priority, int) or not isinstance(request.owner, int):
            raise InvalidRequest("priority and owner must be integers")
        if request.deadline is not None and not (isinstance(request.deadline, (int, float)) and math.isfinite(request.deadline)):
            raise InvalidRequest(f"deadline must be a finite time.monotonic() value, got {request.deadline!r}")
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        elif isinstance(request.seed, int):
            generator.manual_seed(request.seed)
        else:
            raise InvalidRequest(f"seed must be an integer, got {request.seed!r}")
        constraint = self.grammars.compile(
            request.json_schema, request.regex, request.grammar, tool_use.grammar(choice) if choice is not None else None
        )
        if constraint is not None and (request.stop or request.ignore_eos):
            raise InvalidRequest("a constrained output ends where its grammar does: no stop strings, no ignore_eos")
        with self._lock:
            if ctx is not None:
                if ctx.dropped:
                    raise UnknownContext(f"context {ctx.id} was dropped")
                self.contexts.check_limit(ctx.owner, len(prompt_ids) + max_tokens, replacing=ctx)
            seq = self._sequence(request, prompt_ids, max_tokens, float(temperature), float(top_p), int(top_k), generator)
            seq.constraint, seq.tool_choice, seq.context = constraint, choice, ctx
            return self._enqueue(seq, on_event)

    def create_context(
        self, messages: list[dict[str, str]], *, tools: list[dict[str, Any]] | None = None, owner: int = 0,
        priority: int = 0, on_event: Callable[[Event], None] | None = None,
    ) -> RequestHandle:
        """A conversation context holding the chat (and its tools), prefilled once; see contexts.py.
        The handle's context_id names it at once; the handle finishes ("stop", no output) when the
        prefill is done. InvalidRequest for a bad chat, KVLimitExceeded past the owner's limit."""
        if not isinstance(priority, int) or not isinstance(owner, int):
            raise InvalidRequest("priority and owner must be integers")
        tool_list = tool_use.check_tools(tools) if tools is not None else None
        prompt_ids = tool_use.render(self.tokenizer, messages, tool_list, add_generation_prompt=False)
        self._room(prompt_ids)
        request = Request(messages=messages, owner=owner, priority=priority)
        with self._lock:
            ctx = self.contexts.new(owner, priority, messages, tool_list, prompt_ids)
            ctx.claimed = True
            seq = self._sequence(request, prompt_ids, 0, 0.0, 1.0, 0, torch.Generator())
            seq.context, seq.prefill_only = ctx, True
            return self._enqueue(seq, on_event)

    def fork_context(self, context: int, owner: int = 0) -> int:
        """A new context with the same history, sharing its KV blocks (copy on write)."""
        with self._lock:
            source, fork = self.contexts.fork(context, owner)
            self._operate(lambda: self.blocks.share(source, fork))  # type: ignore[arg-type]
            return fork.id

    def drop_context(self, context: int, owner: int = 0) -> None:
        """Free a context (a request running on it is cancelled); UnknownContext if there is none."""
        with self._lock:
            self._drop(self.contexts.get(context, owner))

    def drop_contexts(self, owner: int) -> int:
        """Free all of an owner's contexts (its process ended); return how many there were."""
        with self._lock:
            mine = [c for c in self.contexts.items.values() if c.owner == owner]
            for ctx in mine:
                self._drop(ctx)
        return len(mine)

    def context_info(self, context: int, owner: int = 0) -> ContextInfo:
        with self._lock:
            return self.contexts.info(self.contexts.get(context, owner))

    def contexts_kv_bytes(self, owner: int) -> int:
        """KV bytes the owner's contexts take (what set_kv_limit caps)."""
        with self._lock:
            return sum(self.contexts.kv_bytes(len(c.token_ids)) for c in self.contexts.items.values() if c.owner == owner)

    def set_kv_limit(self, owner: int, limit_bytes: int | None) -> None:
        """Cap the KV bytes of the owner's contexts (None: no cap). Contexts already past it stay,
        but none can be created, forked or continued until the owner is under it."""
        if limit_bytes is not None and (not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0):
            raise InvalidRequest(f"a KV limit is a number of bytes >= 0 or None, got {limit_bytes!r}")
        with self._lock:
            if limit_bytes is None:
                self.contexts.limits.pop(owner, None)
            else:
                self.contexts.limits[owner] = limit_bytes

    def generate(self, request: Request, timeout: float | None = None) -> Completion:
        """Submit and wait: (text, token_ids, finish_reason, usage)."""
        return self.submit(request).result(timeout)

    def kv_blocks_used(self, owner: int) -> int:
        """KV blocks held by the owner's live requests and contexts (a block shared by two owners
        counts for each)."""
        return self.blocks.used_by(owner)

    def stats(self) -> dict[str, int | str]:
        """Counters and gauges, read without stopping the loop (so only approximately consistent)."""
        sch = self.scheduler
        return {
            "backend": self.backend.name,
            "steps": self.steps,
            "interrupts": self.interrupts,
            "running": sum(1 for s in sch.seqs if s.scheduled),
            "waiting": sum(1 for s in sch.seqs if not s.scheduled) + len(self._incoming),
            "generated_tokens": self.generated_tokens,
            "tokens_computed": sch.tokens_computed,
            "prompt_tokens_computed": sch.prompt_tokens_computed,
            "preemptions": sch.preemptions,
            "evictions": sch.evictions,
            "contexts": len(self.contexts.items),
            "context_evictions": sch.context_evictions,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_used,
            "kv_block_size": self.blocks.block_size,
            "prefix_cache_hits": sch.prefix_cache_hits,
            "prefix_cache_hit_tokens": sch.prefix_cache_hit_tokens,
        }

    def step(self) -> bool:
        """One iteration: admit, drop cancelled/expired, schedule, forward, sample, deliver.
        Called by the loop thread; callable directly when the engine is not started. Returns
        whether any work was done."""
        incoming = self._admit()
        now = time.monotonic()
        for seq in list(self.scheduler.seqs):
            if seq.cancel_reason is not None:
                reason = "error" if seq.cancel_reason.startswith("error") else "cancelled"
                self._finish(seq, reason, error=None if reason == "cancelled" else seq.cancel_reason)
            elif seq.request.deadline is not None and now >= seq.request.deadline:
                self._finish(seq, "cancelled", error="deadline exceeded")
        batch = self.scheduler.schedule()
        if not batch:
            return bool(incoming)
        self.steps += 1
        self._run(batch, self._interrupt_check(batch))
        return True

    # ---- internals -------------------------------------------------------------------------

    def _tool_choice(self, request: Request, ctx: Context | None) -> tool_use.ToolChoice | None:
        if ctx is not None and request.tools is not None:
            raise InvalidRequest("a context's tools are given when it is created")
        tool_list = ctx.tools if ctx is not None else tool_use.check_tools(request.tools) if request.tools is not None else None
        if tool_list is None:
            if request.tool_choice is not None:
                raise InvalidRequest("tool_choice needs tools")
            return None
        return tool_use.choose(tool_list, request.tool_choice)

    def _prompt_ids(self, request: Request, ctx: Context | None, choice: tool_use.ToolChoice | None) -> list[int]:
        given = [name for name in ("prompt", "messages", "prompt_ids") if getattr(request, name) is not None]
        if ctx is not None:
            if given != ["messages"] or not isinstance(request.messages, list):
                raise InvalidRequest("a request on a context gives its new turn as messages (a list, maybe empty)")
            return self.contexts.turn(ctx, request.messages)
        if len(given) != 1:
            raise InvalidRequest("give exactly one of prompt, messages, prompt_ids")
        if request.tools is not None and request.messages is None:
            raise InvalidRequest("tools need a chat: give messages")
        if request.prompt is not None:
            if not isinstance(request.prompt, str) or not request.prompt:
                raise InvalidRequest("empty prompt")
            return self.tokenizer.encode(request.prompt)
        if request.messages is not None:
            return tool_use.render(self.tokenizer, request.messages, list(choice.tools) if choice is not None else None)
        ids = request.prompt_ids
        if not isinstance(ids, list) or not ids:
            raise InvalidRequest("empty prompt")
        vocab = self.model_config.vocab_size
        if not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise InvalidRequest(f"prompt_ids must be token ids in [0, {vocab})")
        return list(ids)

    def _room(self, prompt_ids: list[int]) -> int:
        """The most tokens a sequence may reach; InvalidRequest if the prompt leaves no room.
        A request must fit the context and the whole KV pool, or it could never finish."""
        limit = min(self.max_context, self.kv.num_blocks * self.kv.block_size)
        if len(prompt_ids) >= limit:
            raise InvalidRequest(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {limit} tokens")
        return limit

    def _sequence(
        self, request: Request, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float, top_k: int,
        generator: torch.Generator,
    ) -> Sequence:
        """A new sequence (engine lock held)."""
        if self._stopping:
            raise RuntimeError("engine is stopped")
        seq_id, self._next_id = self._next_id, self._next_id + 1
        return Sequence(
            id=seq_id, request=request, token_ids=list(prompt_ids), num_prompt=len(prompt_ids), max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
            output=OutputText(IncrementalDetokenizer(self.tokenizer, prompt_ids), list(request.stop)),
            on_event=lambda e: None, ticket=self.scheduler.next_ticket(),
        )

    def _enqueue(self, seq: Sequence, on_event: Callable[[Event], None] | None) -> RequestHandle:
        """Hand a sequence to the engine thread (engine lock held)."""
        handle = RequestHandle(self, seq, on_event)
        seq.on_event = handle._on_event
        if seq.context is not None:
            seq.context.request = seq
        self._incoming.append(seq)
        self._incoming_top = max(self._incoming_top, seq.request.priority)
        self._lock.notify_all()
        return handle

    def _drop(self, ctx: Context) -> None:
        """Forget a context (engine lock held); its blocks go when no request holds them."""
        self.contexts.drop(ctx)
        if ctx.request is not None:
            self._cancel(ctx.request, "cancelled")  # its end frees the blocks
        elif not ctx.claimed:  # (a claimed one is freed by the submit that claimed it)
            self._operate(lambda: self.blocks.release(ctx))  # type: ignore[arg-type]

    def _operate(self, operation: Callable[[], None]) -> None:
        """Queue a block move for the engine thread, before the next arrivals (engine lock held)."""
        self._operations.append(operation)
        self._lock.notify_all()

    def _admit(self) -> list[Sequence]:
        """Run the queued context operations, then move submitted requests into the scheduler
        (a request on a context takes its blocks); return them."""
        with self._lock:
            operations, self._operations = self._operations, []
            incoming, self._incoming, self._incoming_top = self._incoming, [], -math.inf
        for operation in operations:
            operation()
        for seq in incoming:
            if seq.context is not None:
                self.contexts.adopt(seq)
            self.scheduler.add(seq)
        return incoming

    def _interrupt_check(self, batch: list[tuple[Sequence, int]]) -> Callable[[], None]:
        """The between-layers hook of batch's forward. Like an interrupt preempting a running task,
        a request more important than all of the batch runs right away, until its first token,
        and the paused forward then resumes where it was: the arrival waits for one layer, not a
        whole step, and no work is thrown away."""
        top = max(seq.effective_priority for seq, _ in batch)
        busy = {seq for seq, _ in batch}

        def check() -> None:
            if self._incoming_top > top:
                self._serve_urgent(top, busy)

        return check

    def _serve_urgent(self, above: int, busy: set[Sequence]) -> None:
        """Interrupt steps: only sequences more important than `above` run, `busy` ones stay as they are."""
        self.interrupts += 1
        urgent = [seq for seq in self._admit() if seq.effective_priority > above]
        while any(seq.num_generated == 0 and not seq.finished and seq.cancel_reason is None for seq in urgent):
            batch = self.scheduler.schedule(above=above, busy=busy)
            if not batch:
                return  # nothing fits beside the paused step: the next regular step takes them
            self.steps += 1
            self._run(batch)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._incoming or self._operations or self.scheduler.seqs):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                if not self.step():
                    # Everything live is blocked (nothing fits yet): do not spin hot.
                    with self._lock:
                        self._lock.wait(0.005)
            except Exception:  # a bug in the loop must not kill the engine for everyone
                log.exception("engine step failed")

    def _cancel(self, seq: Sequence, reason: str) -> None:
        if seq.cancel_reason is None:
            seq.cancel_reason = reason
        with self._lock:
            self._lock.notify_all()

    def _run(self, batch: list[tuple[Sequence, int]], between_layers: Callable[[], None] | None = None) -> None:
        """Forward and sample a batch; if that fails, retry its sequences alone so that only the
        ones that fail by themselves are finished with an error."""
        try:
            self.kv.copy_blocks(self.blocks.copies)
            self.blocks.copies.clear()
            ready, logits = self.runner.run(batch, between_layers)
            sampled = [s for s in ready if not s.prefill_only]
            if len(sampled) < len(ready):
                logits = logits[[i for i, s in enumerate(ready) if not s.prefill_only]]
            self.grammars.mask(logits, sampled)
            tokens = sample(logits, [(s.temperature, s.top_p, s.top_k, s.generator) for s in sampled])
        except Exception as exc:
            if len(batch) == 1:
                log.exception("request %d failed", batch[0][0].id)
                self._finish(batch[0][0], "error", error=f"{type(exc).__name__}: {exc}")
                return
            log.exception("step of %d sequences failed; retrying them one at a time", len(batch))
            for item in batch:
                self._run([item])
            return
        sampled_set = set(sampled)
        for seq, n in batch:
            self.scheduler.complete(seq, n, seq in sampled_set)
        for seq in ready:
            if seq.prefill_only:
                self._finish(seq, "stop")
        for seq, token in zip(sampled, tokens):
            self._append(seq, token)
        self.recent_steps.append((time.monotonic(), len(batch), len(sampled)))

    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        self.generated_tokens += 1
        now = time.monotonic()
        if seq.last_token_at:
            self.inter_token.observe(now - seq.last_token_at)
        else:
            self.ttft.observe(now - seq.submitted_at)
        seq.last_token_at = now
        refused = seq.constraint.advance(token) if seq.constraint is not None else None
        if refused is not None:  # the mask allowed it: a library fault, not the request's
            self._finish(seq, "error", error=f"grammar: {refused}")
            return
        reason, stop_string = None, False
        if token in self.eos_token_ids and not seq.request.ignore_eos:
            delta, reason = "", "stop"
        else:
            delta, stop_string = seq.output.push(token)
            reason = "stop" if stop_string or (seq.constraint is not None and seq.constraint.complete) else None
        if reason is None and seq.num_generated >= seq.max_tokens:
            reason = "length"
        self._emit(seq, TokenEvent(delta, [token]))
        if reason is not None:
            # Text held back for a possible stop string is output unless a stop string did match.
            self._finish(seq, reason, text="" if stop_string else seq.output.flush())

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception as exc:
            log.exception("event callback of request %d raised", seq.id)
            if seq.cancel_reason is None:
                seq.cancel_reason = f"error: event callback raised {type(exc).__name__}: {exc}"

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, text: str = "") -> None:
        if seq.finished:
            return
        seq.finished = True
        admitted = seq in self.scheduler.seqs
        # Blocks are free (or back in their context) before anyone hears of the finish.
        if seq.context is None:
            if admitted:
                self.scheduler.remove(seq)
        elif admitted:
            self.scheduler.seqs.remove(seq)
            self.contexts.settle(seq, reason, seq.output.text, self.eos_token_ids)
        else:  # still queued (the engine stopped): the context never gave it its blocks
            with self._lock:
                seq.context.request, seq.context.claimed = None, False
        calls = tool_use.parse(seq.output.text, seq.id) if seq.tool_choice is not None else None
        self._emit(seq, FinishEvent(reason, seq.usage(), text, error, calls))
        # Its handle's callback (which holds whatever the caller waits with, a process, a result) goes:
        # the handle and the sequence refer to each other, and would keep it until the cyclic collector ran.
        seq.on_event = _no_one_to_tell

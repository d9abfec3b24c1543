"""The engine on the built-in tiny model: batching invariance, preemption, cancellation, deadlines,
priorities, starvation, bad input, seeded sampling, stop strings."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from llmosd.engine import Engine, EngineConfig, FinishEvent, InvalidRequest, Request, TokenEvent
from llmosd.engine.kv_cache import bytes_per_block
from llmosd.engine.loader import TINY_CONFIG

BLOCK_BYTES = bytes_per_block(TINY_CONFIG, 16, torch.float32)


def _engine(**kw) -> Engine:
    kw.setdefault("kv_memory_bytes", 256 * BLOCK_BYTES)
    return Engine(EngineConfig(model="tiny", **kw))


def _prompts(n: int, shared_prefix: list[int] | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    prefix = shared_prefix or []
    return [prefix + torch.randint(0, 256, (5 + 7 * i % 41,), generator=g).tolist() for i in range(n)]


def _greedy_alone(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = _engine()
    return [engine.generate(Request(prompt_ids=p, max_tokens=max_tokens, ignore_eos=True)).token_ids for p in prompts]


@pytest.fixture(scope="module")
def alone() -> tuple[list[list[int]], list[list[int]]]:
    prompts = _prompts(16, shared_prefix=list(b"You are a helpful agent. Share this prompt, please!"))
    return prompts, _greedy_alone(prompts, 20)


@pytest.mark.parametrize(
    "config",
    [
        dict(),  # all 16 in one batch
        dict(max_batch=4, token_quantum=3),  # round robin: preemption, blocks kept
        dict(kv_memory_bytes=14 * BLOCK_BYTES, max_step_tokens=40),  # too little KV: evictions and recompute
    ],
    ids=["batched", "preempt-keep", "preempt-recompute"],
)
def test_batched_equals_alone(alone, config: dict) -> None:
    prompts, expected = alone
    engine = _engine(**config)
    engine.start()
    try:
        handles = [engine.submit(Request(prompt_ids=p, max_tokens=20, ignore_eos=True)) for p in prompts]
        results = [h.result(timeout=120) for h in handles]
    finally:
        engine.stop()
    assert [r.token_ids for r in results] == expected
    stats = engine.stats()
    # Sharing: the common prefix (3 full blocks) is computed once, later requests hit the cache.
    assert sum(r.usage.cached_tokens for r in results) >= 48 * 8
    if "max_batch" in config:
        assert stats["preemptions"] > 0
    if "max_step_tokens" in config:
        assert stats["evictions"] > 0
    assert stats["kv_blocks_used"] == 0 or engine.blocks.num_free + stats["kv_blocks_used"] == engine.blocks.num_blocks
    assert all(engine.blocks.ref[b] == 0 for b in range(engine.blocks.num_blocks))


def test_cancel_frees_blocks_at_once() -> None:
    engine = _engine()
    engine.start()
    first = threading.Event()
    try:
        handle = engine.submit(
            Request(prompt="x" * 100, max_tokens=3000, ignore_eos=True, owner=77),
            on_event=lambda e: first.set() if isinstance(e, TokenEvent) else None,
        )
        assert first.wait(30)
        assert engine.kv_blocks_used(77) > 0
        handle.cancel()
        result = handle.result(timeout=30)
        assert result.finish_reason == "cancelled" and 0 < result.usage.completion_tokens < 3000
        assert engine.kv_blocks_used(77) == 0
    finally:
        engine.stop()


def test_deadline_expiry_cancels_and_frees() -> None:
    engine = _engine()
    events: list = []
    engine.start()
    try:
        handle = engine.submit(
            Request(prompt="y" * 50, max_tokens=3000, ignore_eos=True, owner=5, deadline=time.monotonic() + 0.3),
            on_event=events.append,
        )
        result = handle.result(timeout=30)
    finally:
        engine.stop()
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens < 3000
    assert isinstance(events[-1], FinishEvent) and events[-1].error == "deadline exceeded"
    assert sum(isinstance(e, FinishEvent) for e in events) == 1
    assert engine.kv_blocks_used(5) == 0


def _record_steps(engine: Engine, log: dict[str, list[int]], name: str):
    def on_event(event) -> None:
        if isinstance(event, TokenEvent):
            log.setdefault(name, []).append(engine.steps)

    return on_event


def test_priority_preempts_and_runs_first() -> None:
    engine = _engine(max_batch=2)
    steps: dict[str, list[int]] = {}
    for i in range(3):
        engine.submit(Request(prompt_ids=[1, 2, 3], max_tokens=50, ignore_eos=True, priority=0), _record_steps(engine, steps, f"low{i}"))
    for _ in range(5):
        engine.step()
    assert set(steps) == {"low0", "low1"}  # the batch holds two
    engine.submit(Request(prompt_ids=[4, 5, 6], max_tokens=5, ignore_eos=True, priority=5), _record_steps(engine, steps, "high"))
    arrived = engine.steps
    engine.step()
    assert steps["high"] == [arrived + 1]  # first token in the very next step
    assert engine.stats()["preemptions"] >= 1
    before = {k: len(v) for k, v in steps.items()}
    engine.step()
    engine.step()
    # The high-priority request plus one low one run; "low1" (lowest in the round robin order) waits.
    assert len(steps["high"]) == 3 and len(steps["low1"]) == before["low1"]


def test_high_priority_arrival_interrupts_the_step_in_flight() -> None:
    """A request more important than the running batch that arrives during a step gets its first
    token between two layers of that step, before the batch's own tokens; the paused step then
    completes, and every request's greedy tokens are those it gets alone."""
    prompts = _prompts(5)
    expected = _greedy_alone(prompts, 6)
    engine = _engine()
    order: list[str] = []

    def record(name: str):
        return lambda e: order.append(name) if isinstance(e, TokenEvent) else None

    low = [engine.submit(Request(prompt_ids=p, max_tokens=6, ignore_eos=True), record("low")) for p in prompts[:4]]
    engine.step()  # prefill
    engine.step()  # a decode step
    first_layer = engine.runner.model.layers[0]
    high = []

    def forward_then_submit(*args, **kwargs):
        out = type(first_layer).forward(first_layer, *args, **kwargs)
        if not high:  # the request arrives while the decode step is in its first layer
            high.append(engine.submit(Request(prompt_ids=prompts[4], max_tokens=6, ignore_eos=True, priority=5), record("high")))
        return out

    first_layer.forward = forward_then_submit
    order.clear()
    engine.step()
    del first_layer.forward
    assert order == ["high"] + ["low"] * 4
    assert engine.stats()["interrupts"] == 1
    assert [h.result().token_ids for h in low + high] == expected


def test_round_robin_does_not_starve_equal_priorities() -> None:
    engine = _engine(max_batch=1, token_quantum=2)
    steps: dict[str, list[int]] = {}
    for i in range(4):
        engine.submit(Request(prompt_ids=[7, i], max_tokens=40, ignore_eos=True), _record_steps(engine, steps, str(i)))
    for _ in range(16):
        engine.step()
    assert sorted(steps) == ["0", "1", "2", "3"]
    assert all(len(v) >= 3 for v in steps.values())


def test_aging_lets_low_priority_finish_under_a_stream_of_high_priority() -> None:
    engine = _engine(max_batch=1, token_quantum=4, aging_steps=8)
    low = engine.submit(Request(prompt_ids=[9, 9], max_tokens=10, ignore_eos=True, priority=0))
    high = None
    for _ in range(400):  # bounded: a starving request fails the test instead of hanging it
        if high is None or high.done():
            high = engine.submit(Request(prompt_ids=[8, 8], max_tokens=6, ignore_eos=True, priority=3))
        engine.step()
        if low.done():
            break
    assert low.done() and low.result().finish_reason == "length"


@pytest.mark.parametrize(
    "bad, reason",
    [
        (dict(prompt=""), "empty prompt"),
        (dict(prompt_ids=[]), "empty prompt"),
        (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), "exactly one"),
        (dict(prompt="hi", max_tokens=10**6), "exceeds the context length"),
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", temperature=-1.0), "temperature"),
        (dict(prompt="hi", temperature=float("nan")), "temperature"),
        (dict(prompt="hi", top_p=0.0), "top_p"),
        (dict(prompt="hi", top_p=1.5), "top_p"),
        (dict(prompt="hi", top_p=float("nan")), "top_p"),
        (dict(prompt="hi", top_k=-3), "top_k"),
        (dict(messages=[{"role": "user", "content": "x", "mood": "sad"}]), "unknown keys"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "role"),
        (dict(messages=[]), "non-empty"),
        (dict(prompt_ids=[1, 99999]), "token ids"),
        (dict(prompt="hi", stop=[""]), "stop"),
    ],
)
def test_bad_input_is_refused_while_others_carry_on(bad: dict, reason: str, shared_engine: Engine) -> None:
    good = shared_engine.submit(Request(prompt="a good request", max_tokens=30, ignore_eos=True))
    with pytest.raises(InvalidRequest, match=reason):
        shared_engine.submit(Request(**bad))
    assert good.result(timeout=30).usage.completion_tokens == 30


@pytest.fixture(scope="module")
def shared_engine():
    engine = _engine()
    engine.start()
    yield engine
    engine.stop()


def test_failing_callback_fails_only_its_request(shared_engine: Engine) -> None:
    def explode(event) -> None:
        raise RuntimeError("boom")

    others = [shared_engine.submit(Request(prompt_ids=[3, i], max_tokens=25, ignore_eos=True)) for i in range(3)]
    bad = shared_engine.submit(Request(prompt_ids=[3, 3], max_tokens=25, ignore_eos=True, owner=99), on_event=explode)
    with pytest.raises(Exception, match="boom"):
        bad.result(timeout=30)
    assert [o.result(timeout=30).usage.completion_tokens for o in others] == [25, 25, 25]
    assert shared_engine.kv_blocks_used(99) == 0


def test_failing_forward_fails_only_the_sequence_that_fails() -> None:
    """A fault injected into the forward pass of batches holding one request's tokens ends that
    request with an error; the batch is retried without it and the others finish normally."""
    engine = _engine()
    forward = engine.runner.run

    def faulty_run(batch, between_layers=None):
        if any(seq.owner == 666 for seq, _ in batch):
            raise RuntimeError("injected fault")
        return forward(batch, between_layers)

    engine.runner.run = faulty_run
    good = [engine.submit(Request(prompt_ids=[1, i], max_tokens=8, ignore_eos=True)) for i in range(3)]
    bad = engine.submit(Request(prompt_ids=[2, 2, 2], max_tokens=8, ignore_eos=True, owner=666))
    with pytest.raises(Exception, match="injected fault"):
        bad.result()
    assert [g.result().usage.completion_tokens for g in good] == [8, 8, 8]
    assert engine.kv_blocks_used(666) == 0


def test_seeded_sampling_is_independent_of_batch_company() -> None:
    req = dict(prompt="Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    alone = _engine().generate(Request(**req)).token_ids
    engine = _engine()
    crowd = [engine.submit(Request(prompt=f"noise {i}" * (i + 1), max_tokens=30, temperature=1.0, seed=i)) for i in range(8)]
    ours = engine.submit(Request(**req))
    assert ours.result().token_ids == alone
    for crowded in (c.result() for c in crowd):  # the company finished too: at EOS or at max_tokens
        ids = crowded.token_ids
        assert (crowded.finish_reason, len(ids)) == ("length", 30) or (
            crowded.finish_reason == "stop" and len(ids) <= 30 and ids[-1] in engine.eos_token_ids
        )
    other_seed = _engine().generate(Request(**{**req, "seed": 99})).token_ids
    assert other_seed != alone


def test_stop_strings_cut_the_output() -> None:
    engine = _engine()
    full = engine.generate(Request(prompt="Tell me", max_tokens=60, ignore_eos=True))
    text = full.text
    start = next(i for i in range(10, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    first = text.index(stop)
    events: list = []
    cut = engine.submit(Request(prompt="Tell me", max_tokens=60, ignore_eos=True, stop=["never there", stop]), on_event=events.append)
    result = cut.result()
    assert result.finish_reason == "stop"
    assert result.text == text[:first]
    assert "".join(e.text_delta for e in events) == text[:first]
    assert result.token_ids == full.token_ids[: len(result.token_ids)]


def test_usage_counts_prompt_cache_hits() -> None:
    engine = _engine()
    system = "You are agent number seven. " * 4
    a = engine.generate(Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": "a"}], max_tokens=2))
    b = engine.generate(Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": "b"}], max_tokens=2))
    assert a.usage.cached_tokens == 0
    assert b.usage.cached_tokens >= 16 * ((len(system) + 20) // 16 - 1)
    assert b.usage.prompt_tokens == a.usage.prompt_tokens

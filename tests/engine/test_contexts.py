"""Conversation contexts on the built-in tiny model: a turn prefills only what the cache lacks and
answers as re-sending the whole history does; forks copy a shared partly filled block before
writing it; cancel, drop, ownership, KV limits, eviction order and transparent recompute; calls
from many threads. Answers are constrained to ASCII letters so that history re-sent as text
tokenizes to the very tokens the context holds."""
from __future__ import annotations

import threading

import pytest
import torch

from llmosd.engine import (
    ContextBusy, Engine, EngineConfig, InvalidRequest, KVLimitExceeded, Request, TokenEvent, UnknownContext,
)
from llmosd.engine.kv_cache import bytes_per_block
from llmosd.engine.loader import TINY_CONFIG

BLOCK_BYTES = bytes_per_block(TINY_CONFIG, 16, torch.float32)
ANSWER = r"[a-z]{3,9}( [a-z]{2,7}){1,3}"  # a few words, ended by the grammar (no EOS)
SYSTEM = [{"role": "system", "content": "You answer in a few words."}]


def _engine(blocks: int = 256, **kw) -> Engine:
    return Engine(EngineConfig(model="tiny", kv_memory_bytes=blocks * BLOCK_BYTES, **kw))


def _turn(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: what comes next?"}]


def _resent(history: list[dict[str, str]], seed: int) -> str:
    """The answer to the whole history sent as one plain request, on a fresh engine."""
    return _engine().generate(Request(messages=history, regex=ANSWER, max_tokens=40, temperature=0.8, seed=seed)).text


def test_turns_prefill_only_new_tokens_and_answer_as_resending_does() -> None:
    engine = _engine()
    handle = engine.create_context(SYSTEM + _turn(0), owner=3)
    created = handle.result()
    ctx = handle.context_id
    assert (created.finish_reason, created.usage.completion_tokens) == ("stop", 0)
    assert engine.context_info(ctx, 3).resident_tokens == created.usage.prompt_tokens
    history = SYSTEM + _turn(0)
    for i in range(1, 6):
        before = engine.context_info(ctx, 3)
        computed = engine.stats()["prompt_tokens_computed"]
        result = engine.generate(Request(messages=_turn(i), context=ctx, owner=3, regex=ANSWER, max_tokens=40, temperature=0.8, seed=i))
        new_tokens = result.usage.prompt_tokens - before.tokens
        assert before.tokens - before.resident_tokens <= 1  # at most the last answer token, never computed
        assert engine.stats()["prompt_tokens_computed"] - computed == new_tokens + before.tokens - before.resident_tokens
        assert result.usage.cached_tokens == before.resident_tokens
        history = history + _turn(i)
        assert result.text == _resent(history, seed=i)
        history = history + [{"role": "assistant", "content": result.text}]


def test_fork_copies_the_shared_partial_block_before_writing_it() -> None:
    engine = _engine()
    handle = engine.create_context(SYSTEM + _turn(0), owner=1)
    handle.result()
    source = handle.context_id
    assert handle.result().usage.prompt_tokens % 16  # the last block is partly filled
    fork = engine.fork_context(source, owner=1)
    engine.step()  # the fork takes its blocks on the engine thread
    src, dup = engine.contexts.items[source], engine.contexts.items[fork]
    assert src.block_table == dup.block_table and all(engine.blocks.ref[b] == 2 for b in src.block_table)
    full, shared_tail = src.block_table[:-1], src.block_table[-1]
    # The fork writes first (into a copy), then the source (in place, alone again): both answer
    # as if each had the history to itself.
    a = engine.generate(Request(messages=_turn(1), context=fork, owner=1, regex=ANSWER, max_tokens=40, temperature=0.8, seed=7))
    b = engine.generate(Request(messages=_turn(2), context=source, owner=1, regex=ANSWER, max_tokens=40, temperature=0.8, seed=8))
    # Full blocks stay shared; the partly filled one was copied for the fork, kept by the source.
    assert src.block_table[: len(full) + 1] == full + [shared_tail] and dup.block_table[: len(full)] == full
    assert dup.block_table[len(full)] != shared_tail
    assert a.text == _resent(SYSTEM + _turn(0) + _turn(1), seed=7)
    assert b.text == _resent(SYSTEM + _turn(0) + _turn(2), seed=8)
    # Had both written into one block, the source's turn would have overwritten the fork's.
    c = engine.generate(Request(messages=_turn(3), context=fork, owner=1, regex=ANSWER, max_tokens=40, temperature=0.8, seed=9))
    assert c.text == _resent(SYSTEM + _turn(0) + _turn(1) + [{"role": "assistant", "content": a.text}] + _turn(3), seed=9)


def test_a_cancelled_turn_leaves_the_context_as_it_was() -> None:
    engine = _engine()
    handle = engine.create_context(SYSTEM + _turn(0), owner=1)
    handle.result()
    ctx = handle.context_id
    before = engine.context_info(ctx, 1)
    started = threading.Event()
    turn = engine.submit(
        Request(messages=_turn(9), context=ctx, owner=1, max_tokens=50, ignore_eos=True),
        on_event=lambda e: started.set() if isinstance(e, TokenEvent) else None,
    )
    while not started.is_set():
        engine.step()
    turn.cancel()
    assert turn.result().finish_reason == "cancelled"
    assert engine.context_info(ctx, 1).tokens == before.tokens
    result = engine.generate(Request(messages=_turn(1), context=ctx, owner=1, regex=ANSWER, max_tokens=40, temperature=0.8, seed=1))
    assert result.text == _resent(SYSTEM + _turn(0) + _turn(1), seed=1)


def test_handles_belong_to_their_owner_and_serve_one_request_at_a_time() -> None:
    engine = _engine()
    handle = engine.create_context(SYSTEM, owner=1)
    ctx = handle.context_id
    with pytest.raises(ContextBusy):  # still being prefilled
        engine.submit(Request(messages=_turn(1), context=ctx, owner=1, max_tokens=4))
    with pytest.raises(ContextBusy):
        engine.fork_context(ctx, owner=1)
    handle.result()
    for call in (
        lambda: engine.submit(Request(messages=_turn(1), context=ctx, owner=2, max_tokens=4)),
        lambda: engine.fork_context(ctx, owner=2),
        lambda: engine.drop_context(ctx, owner=2),
        lambda: engine.context_info(ctx, owner=2),
        lambda: engine.context_info(999, owner=1),
        lambda: engine.context_info("1", owner=1),
    ):
        with pytest.raises(UnknownContext):
            call()
    for bad, message in (
        (dict(prompt="x"), "new turn as messages"),
        (dict(messages=_turn(1), tools=[{"name": "t"}]), "tools are given when it is created"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            engine.submit(Request(context=ctx, owner=1, max_tokens=4, **bad))
    # An empty turn continues the assistant's part.
    assert engine.generate(Request(messages=[], context=ctx, owner=1, max_tokens=3, ignore_eos=True)).usage.completion_tokens == 3
    engine.drop_context(ctx, owner=1)
    with pytest.raises(UnknownContext):
        engine.submit(Request(messages=_turn(1), context=ctx, owner=1, max_tokens=4))
    engine.step()
    assert engine.stats()["kv_blocks_used"] == 0


def test_dropping_frees_blocks_even_mid_request() -> None:
    engine = _engine()
    contexts = [engine.create_context(SYSTEM + _turn(i), owner=4) for i in range(3)]
    for handle in contexts:
        handle.result()
    busy = engine.submit(Request(messages=_turn(5), context=contexts[0].context_id, owner=4, max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.fork_context(contexts[1].context_id, owner=4)
    assert engine.drop_contexts(4) == 4
    assert busy.result().finish_reason == "cancelled"
    engine.step()
    assert engine.stats()["kv_blocks_used"] == 0 and engine.blocks.used_by(4) == 0
    assert all(r == 0 for r in engine.blocks.ref)


def test_kv_limit_per_owner() -> None:
    engine = _engine()
    first = engine.create_context(SYSTEM + _turn(0), owner=6)
    first.result()
    size = engine.context_info(first.context_id, 6).kv_bytes
    assert size == engine.contexts_kv_bytes(6) == BLOCK_BYTES * -(-first.result().usage.prompt_tokens // 16)
    engine.set_kv_limit(6, 2 * size)
    second = engine.fork_context(first.context_id, owner=6)
    with pytest.raises(KVLimitExceeded):
        engine.fork_context(first.context_id, owner=6)
    with pytest.raises(KVLimitExceeded):
        engine.create_context(SYSTEM, owner=6)
    with pytest.raises(KVLimitExceeded):  # the turn and max_tokens would grow it past the limit
        engine.submit(Request(messages=_turn(1), context=second, owner=6, max_tokens=200))
    engine.create_context(SYSTEM, owner=7).result()  # other owners are not limited
    engine.set_kv_limit(6, None)
    engine.submit(Request(messages=_turn(1), context=second, owner=6, max_tokens=200)).result()


def test_eviction_takes_idle_contexts_by_priority_then_lru_and_recomputes_them() -> None:
    engine = _engine(blocks=24)
    handles = {}
    for name, priority in (("low_old", 0), ("high", 5), ("low_new", 0)):
        handles[name] = engine.create_context(SYSTEM + _turn(len(handles)), owner=9, priority=priority)
        handles[name].result()
    ids = {name: h.context_id for name, h in handles.items()}

    def resident() -> dict[str, bool]:
        return {name: engine.context_info(i, 9).resident_tokens > 0 for name, i in ids.items()}

    def fill_all_but_one_more(token: int) -> None:
        """A request that needs one block more than are free (a new token: no prefix cache hit)."""
        blocks = 24 - engine.stats()["kv_blocks_used"] + 1
        engine.generate(Request(prompt_ids=[token] * (16 * blocks - 8), max_tokens=4, owner=1))

    fill_all_but_one_more(65)
    assert resident() == {"low_old": False, "high": True, "low_new": True}
    fill_all_but_one_more(66)
    assert resident() == {"low_old": False, "high": True, "low_new": False}
    fill_all_but_one_more(67)
    assert resident() == {"low_old": False, "high": False, "low_new": False}
    assert engine.stats()["context_evictions"] == 3
    # The evicted context is recomputed on its next use and answers as if never evicted.
    result = engine.generate(Request(messages=_turn(1), context=ids["low_old"], owner=9, regex=ANSWER, max_tokens=40, temperature=0.8, seed=2))
    assert result.text == _resent(SYSTEM + _turn(0) + _turn(1), seed=2)


def test_many_threads_create_continue_fork_and_drop() -> None:
    engine = _engine(blocks=64)
    engine.start()
    errors: list[BaseException] = []

    def agent(owner: int) -> None:
        try:
            handle = engine.create_context(SYSTEM + _turn(owner), owner=owner)
            handle.result(timeout=120)
            ctx = handle.context_id
            for i in range(3):
                engine.generate(Request(messages=_turn(i), context=ctx, owner=owner, max_tokens=8), timeout=120)
                fork = engine.fork_context(ctx, owner=owner)
                engine.generate(Request(messages=_turn(i + 10), context=fork, owner=owner, max_tokens=8), timeout=120)
                engine.drop_context(fork, owner=owner)
            engine.drop_context(ctx, owner=owner)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(owner,)) for owner in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    try:
        assert not errors, errors
        engine.generate(Request(prompt="x", max_tokens=1), timeout=60)  # the drops' releases have run
        assert engine.stats()["contexts"] == 0 and engine.stats()["kv_blocks_used"] == 0
    finally:
        engine.stop()

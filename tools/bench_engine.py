#!/usr/bin/env python3
"""Benchmark the inference engine against Hugging Face transformers in the same run.

    python tools/bench_engine.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
        [--shape smollm-135m] [--hf-sequential N] [--only throughput,single,ttft,prefix,constrained,contexts,real,openai]
        [--rounds 2] [--context-model smollm2] [--plot out.png]

A random-initialised checkpoint of the shape is written to a temp dir (tools/make_checkpoint.py).
Every request generates exactly its max tokens (ignore_eos here, min_new_tokens for HF). Prints:
throughput (16 concurrent requests vs HF one at a time and vs HF as one padded batch), single
stream decode rate, time to first token of a high-priority request on a saturated vs an idle
engine, and prefill work / KV blocks with a shared system prompt vs without.

"constrained": structured generation's cost (16 concurrent requests under a JSON schema vs free,
same engine, alternating). "contexts": a 10-turn conversation with a context vs re-sending the
whole history each turn (on --context-model: the real SmolLM2 where its package is installed,
else the random checkpoint).

"openai": a one-token chat completion through llmosd --http's OpenAI endpoint against the same
request as a gRPC Infer, alternating on one server.

"real": the real model (SmolLM2-135M-Instruct Q4_1 GGUF, `--model smollm2`), single-stream decode
and 16 concurrent requests, against transformers loading the same GGUF and against llama.cpp
(llama-cpp-python: its own kernels on the quantized weights, 16 sequences in one llama_batch).
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import pathlib
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from make_checkpoint import write_checkpoint  # noqa: E402

from llmosd.engine import Engine, EngineConfig, Request, TokenEvent  # noqa: E402
from llmosd.engine.loader import DTYPES, resolve_model  # noqa: E402


def _ids(n: int, seed: int, vocab: int = 4000) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path: pathlib.Path, args: argparse.Namespace) -> Engine:
    return Engine(
        EngineConfig(
            model=str(path), device=args.device, dtype=args.dtype, kv_memory_bytes=args.kv_gib << 30,
            max_batch=32, max_step_tokens=1024, token_quantum=256,
        )
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours_throughput(engine: Engine, prompts: list[list[int]], new: int) -> float:
    t0 = time.perf_counter()
    handles = [engine.submit(Request(prompt_ids=p, max_tokens=new, ignore_eos=True)) for p in prompts]
    total = sum(h.result().usage.completion_tokens for h in handles)
    return total / (time.perf_counter() - t0)


def ours_single_decode(engine: Engine, prompt: list[int], new: int) -> float:
    stamps: list[float] = []
    engine.submit(
        Request(prompt_ids=prompt, max_tokens=new, ignore_eos=True),
        on_event=lambda e: stamps.append(time.perf_counter()) if isinstance(e, TokenEvent) else None,
    ).result()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def ours_ttft(engine: Engine, prompt: list[int], background: list[list[int]], new: int) -> float:
    """TTFT of a priority-10 request, after the background requests (if any) are all decoding."""
    started = threading.Semaphore(0)
    seen: set[int] = set()

    def on_first(i: int):
        def cb(e) -> None:
            if isinstance(e, TokenEvent) and i not in seen:
                seen.add(i)
                started.release()
        return cb

    handles = [engine.submit(Request(prompt_ids=p, max_tokens=new, ignore_eos=True), on_first(i)) for i, p in enumerate(background)]
    for _ in background:
        started.acquire()
    first = threading.Event()
    t0 = time.perf_counter()
    stamp: list[float] = []

    def cb(e) -> None:
        if isinstance(e, TokenEvent) and not stamp:
            stamp.append(time.perf_counter())
            first.set()

    engine.submit(Request(prompt_ids=prompt, max_tokens=2, priority=10, ignore_eos=True), cb)
    first.wait()
    ttft = stamp[0] - t0
    for h in handles:
        h.cancel()
    for h in handles:
        h.result()
    return ttft


def ours_prefix(path: pathlib.Path, args: argparse.Namespace, system_len: int, n: int, shared: bool) -> tuple[int, int]:
    """Prompt tokens computed and peak KV blocks for n requests with a system prompt (shared or not),
    on a fresh engine."""
    engine = _engine(path, args)
    engine.start()
    peak = [0]

    def cb(e) -> None:
        peak[0] = max(peak[0], engine.blocks.num_used)

    handles = [
        engine.submit(Request(prompt_ids=_ids(system_len, 100 if shared else 100 + i) + _ids(16, 1000 + i), max_tokens=4, ignore_eos=True), cb)
        for i in range(n)
    ]
    for h in handles:
        h.result()
    engine.stop()
    return engine.stats()["prompt_tokens_computed"], peak[0]


def hf_generate(model, prompts: list[list[int]], new: int, device: str) -> float:
    """Seconds for one HF generate call over the prompts as one (equal-length) batch."""
    inp = torch.tensor(prompts, device=device)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - t0


# Structured output that cannot end within the benchmark's tokens (minItems), with structure at
# every few tokens: every constrained request runs to max_tokens, as the free ones do.
LONG_SCHEMA = {
    "type": "array",
    "minItems": 10_000,
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"],
        "additionalProperties": False,
    },
}


def constrained_rows(engine: Engine, fresh, n_req: int, new: int, rounds: int) -> list[tuple]:
    """Throughput of n_req concurrent requests under LONG_SCHEMA vs free ones (ignore_eos), both
    exactly `new` tokens each, alternating runs on one engine, best of each."""

    def run(constrained: bool) -> float:
        extra = dict(json_schema=LONG_SCHEMA) if constrained else dict(ignore_eos=True)
        t0 = time.perf_counter()
        handles = [engine.submit(Request(prompt_ids=next(fresh), max_tokens=new, **extra)) for _ in range(n_req)]
        results = [h.result() for h in handles]
        assert all(r.finish_reason == "length" and len(r.token_ids) == new for r in results)
        return n_req * new / (time.perf_counter() - t0)

    run(True)  # warm-up: llguidance builds its view of the vocabulary once
    free = with_schema = 0.0
    for _ in range(rounds):
        free, with_schema = max(free, run(False)), max(with_schema, run(True))
    return [(f"throughput, {n_req} requests, JSON schema vs free (tok/s)", with_schema, free, with_schema / free, ">= 0.85x")]


def _conversation_turn(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: in one sentence, what should an agent do next with file notes_{i}.txt?"}]


def context_rows(make_engine, turns: int, answer_tokens: int, label: str) -> list[tuple]:
    """A conversation of `turns` turns with a context, then the same history re-sent as a whole
    each turn, each on a fresh, warmed-up engine (the re-sent history still gets the prefix
    cache's full blocks of its own earlier turns); a re-sent turn decodes as many tokens as the
    context's did. Prefill tokens are the prompt tokens the engine computed; a context turn's new
    tokens are those its prompt adds to the context."""
    system = [{"role": "system", "content": "You are an agent of llmos. You plan, then act, then report. " * 6}]

    def warm_engine() -> Engine:
        engine = make_engine()
        engine.start()
        engine.generate(Request(prompt="warm-up", max_tokens=answer_tokens, ignore_eos=True))
        return engine

    engine = warm_engine()
    computed = lambda: engine.stats()["prompt_tokens_computed"]  # noqa: E731
    handle = engine.create_context(system, owner=1)
    handle.result()
    ctx = handle.context_id
    history = list(system)
    ctx_prefill = new_tokens = 0
    ctx_times: list[float] = []
    answer_lengths: list[int] = []
    for i in range(turns):
        before, held = computed(), engine.context_info(ctx, 1).tokens
        t0 = time.perf_counter()
        result = engine.generate(Request(messages=_conversation_turn(i), context=ctx, owner=1, max_tokens=answer_tokens))
        ctx_times.append(time.perf_counter() - t0)
        ctx_prefill += computed() - before
        new_tokens += result.usage.prompt_tokens - held
        answer_lengths.append(len(result.token_ids))
        history += _conversation_turn(i) + [{"role": "assistant", "content": result.text}]
    engine.stop()
    engine = warm_engine()
    resent_prefill = resent_prompts = 0
    resent_times: list[float] = []
    for i in range(turns):
        before = computed()
        t0 = time.perf_counter()
        asked = history[: 1 + 2 * i] + _conversation_turn(i)
        result = engine.generate(Request(messages=asked, owner=1, max_tokens=answer_lengths[i], ignore_eos=True))
        resent_times.append(time.perf_counter() - t0)
        resent_prefill += computed() - before
        resent_prompts += result.usage.prompt_tokens
    engine.stop()
    ms = lambda xs: 1e3 * sum(xs) / len(xs)  # noqa: E731
    name = f"{turns}-turn chat ({label}),"
    return [
        (f"{name} context prefill / new tokens", ctx_prefill, new_tokens, ctx_prefill / new_tokens, "<= 1.1x"),
        (f"{name} prefill, context vs re-sent", ctx_prefill, resent_prefill, ctx_prefill / resent_prefill, "< 1"),
        (f"{name} prompt tokens, context's new vs re-sent", new_tokens, resent_prompts, new_tokens / resent_prompts, "< 1"),
        (f"{name} ms per turn, context vs re-sent", ms(ctx_times), ms(resent_times), sum(ctx_times) / sum(resent_times), "< 1"),
    ]


def context_model(name: str, fallback: pathlib.Path, args: argparse.Namespace) -> tuple[object, str]:
    """A maker of engines for the context rows: of `name` (an alias or path) if it is there, else `fallback`."""
    try:
        resolve_model(name)
    except FileNotFoundError as exc:
        print(f"context rows: {exc}; using the random {args.shape} checkpoint instead")
        return (lambda: _engine(fallback, args)), f"random {args.shape}"
    return (lambda: _engine(pathlib.Path(name), args)), name


def llama_cpp_rates(path: str, prompts: list[list[int]], new: int, threads: int) -> tuple[float, float]:
    """llama.cpp greedy on the prompts as one batch of sequences (its `batched` example, through
    llama-cpp-python's C API): (tokens/s over the whole run, decode tokens/s of one sequence)."""
    import llama_cpp as L
    import numpy as np
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    n, width = len(prompts), len(prompts[0])
    params = L.llama_context_default_params()
    per_seq = -(-(width + new) // 256) * 256  # llama.cpp pads each sequence's context to 256 cells
    params.n_ctx, params.n_batch, params.n_seq_max = n * per_seq, n * width, n
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(n * width, 0, 1)

    def step(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode (token, position, sequence, wants logits) entries; the greedy next token of each that wants them."""
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [i for i, e in enumerate(entries) if e[3]]
        return [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax()) for i in rows]

    t0 = time.perf_counter()
    nxt = step([(t, pos, seq, pos == width - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
    stamps = [time.perf_counter()]
    for k in range(new - 1):
        nxt = step([(t, width + k, seq, True) for seq, t in enumerate(nxt)])
        stamps.append(time.perf_counter())
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return n * new / (stamps[-1] - t0), (new - 1) / (stamps[-1] - stamps[0])


def real_model_rows(args: argparse.Namespace, n_req: int, prompt_len: int, new: int) -> tuple[list[tuple], list[str]]:
    """Rows for the real model against transformers (GGUF-loaded) and llama.cpp, and notes on what is missing."""
    from llmosd.engine.loader import resolve_model

    try:
        path = pathlib.Path(resolve_model("smollm2"))
    except FileNotFoundError as e:
        return [], [f"real model: {e}"]
    from transformers import AutoModelForCausalLM

    fresh = (_ids(prompt_len, seed) for seed in itertools.count(20_000))
    engine = _engine(path, args)
    engine.start()
    ours_throughput(engine, [next(fresh) for _ in range(2)], 4)  # warm-up
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[args.dtype]).to(args.device).eval()
    hf_generate(hf, [next(fresh)], 4, args.device)  # warm-up
    ours_tps = hf_tps = 0.0
    singles, hf_full, hf_prefill = [], [], []
    for _ in range(args.rounds):  # alternating, best of each, as in main()
        batch = [next(fresh) for _ in range(n_req)]
        ours_tps = max(ours_tps, ours_throughput(engine, batch, new))
        hf_tps = max(hf_tps, n_req * new / hf_generate(hf, batch, new, args.device))
        p = next(fresh)
        singles.append(ours_single_decode(engine, next(fresh), new))
        hf_full.append(hf_generate(hf, [p], new, args.device))
        hf_prefill.append(hf_generate(hf, [p], 1, args.device))
    engine.stop()
    del engine, hf
    ours_single, hf_single = max(singles), (new - 1) / (min(hf_full) - min(hf_prefill))
    rows = [
        ("real model: single stream decode (tok/s) vs HF GGUF", ours_single, hf_single, ours_single / hf_single, "-"),
        (f"real model: {n_req} requests (tok/s) vs HF GGUF batch", ours_tps, hf_tps, ours_tps / hf_tps, "-"),
    ]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return rows, ["llama.cpp rows: pip install llama-cpp-python (it builds llama.cpp from source: several minutes)"]
    threads = torch.get_num_threads()
    # In a fresh process: torch's OpenMP threads spin a while after each parallel region and would take its cores.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        cpp_single = max(pool.apply(llama_cpp_rates, (str(path), [next(fresh)], new, threads))[1] for _ in range(args.rounds))
        cpp_tps = max(
            pool.apply(llama_cpp_rates, (str(path), [next(fresh) for _ in range(n_req)], new, threads))[0]
            for _ in range(args.rounds)
        )
    rows += [
        ("real model: single stream decode (tok/s) vs llama.cpp", ours_single, cpp_single, ours_single / cpp_single, "-"),
        (f"real model: {n_req} requests (tok/s) vs llama.cpp batch", ours_tps, cpp_tps, ours_tps / cpp_tps, "-"),
    ]
    return rows, [f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, Q4_1 weights, {threads} threads"]


FIGURES = ("throughput", "single", "ttft", "prefix", "constrained", "contexts", "real", "openai")


def openai_row(path: pathlib.Path, args: argparse.Namespace, n: int) -> tuple:
    """A one-token chat completion over the OpenAI-compatible endpoint vs the same request as a
    gRPC Infer, on one server (llmosd --http), alternating, fresh prompts of equal length."""
    import http.client
    import json

    from llmos.v1 import kernel_pb2 as pb
    from llmos.v1 import kernel_pb2_grpc

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the tests' server launcher
    from llmosd_process import LlmosdServer

    with tempfile.TemporaryDirectory() as tmp:
        server = LlmosdServer(pathlib.Path(tmp) / "data", "--model", str(path), "--device", args.device,
                              "--dtype", args.dtype, "--http", "127.0.0.1:0")
        server.start()
        try:
            with server.channel() as channel:
                stub = kernel_pb2_grpc.KernelStub(channel)
                conn = http.client.HTTPConnection(server.http.removeprefix("http://"))

                def chat(i: int) -> None:
                    body = {"model": str(path), "max_tokens": 1, "temperature": 0,
                            "messages": [{"role": "user", "content": f"question number {i:06d}"}]}
                    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                                 headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    assert resp.status == 200, resp.read()
                    resp.read()

                def infer(i: int) -> None:
                    request = pb.InferRequest(messages=[pb.ChatMessage(role="user", content=f"question number {i:06d}")],
                                              sampling=pb.SamplingParams(max_tokens=1, temperature=0))
                    [final] = stub.Infer(request, timeout=600)  # waits for the model to load
                    assert final.finish_reason

                ours: list[float] = []
                peer: list[float] = []
                for i in range(n + n // 4):  # alternated; the first quarter warms both up
                    for fn, samples, prompt in ((chat, ours, 2 * i), (infer, peer, 2 * i + 1)):
                        t = time.perf_counter()
                        fn(prompt)
                        if i >= n // 4:
                            samples.append(time.perf_counter() - t)
        finally:
            server.stop()
    ours_ms, peer_ms = sorted(ours)[len(ours) // 2] * 1e3, sorted(peer)[len(peer) // 2] * 1e3
    return ("one-token chat completion p50 (ms): OpenAI HTTP vs gRPC Infer", ours_ms, peer_ms, ours_ms / peer_ms, "<= 1.5x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small workloads: a smoke test in under a minute")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--shape", default="smollm-135m")
    ap.add_argument("--hf-sequential", type=int, default=None, help="requests HF runs one at a time (rate extrapolates)")
    ap.add_argument("--kv-gib", type=int, default=1)
    ap.add_argument("--only", default=",".join(FIGURES), help="comma-separated subset of the figures to measure")
    ap.add_argument("--rounds", type=int, default=2, help="runs of ours (best taken) for throughput, alternating with HF's batch")
    ap.add_argument("--context-model", default="smollm2", help="model of the context rows (the random checkpoint if absent)")
    ap.add_argument("--plot", type=pathlib.Path, default=None, help="save a PNG of the ratios (needs matplotlib)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    n_req, prompt_len, new, system_len = (16, 64, 128, 512) if not args.quick else (4, 16, 16, 64)
    hf_seq = args.hf_sequential or (4 if not args.quick else 1)

    from transformers import AutoModelForCausalLM

    only = args.only.split(",")
    if not set(only) <= set(FIGURES):
        ap.error(f"--only takes figures among {','.join(FIGURES)}")
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(pathlib.Path(tmp) / args.shape, shape=args.shape, dtype="float32")
        # Fresh prompts for every measurement: a prompt seen before would be served from the prefix cache.
        fresh = (_ids(prompt_len, seed) for seed in itertools.count(10_000))
        prompts = [_ids(prompt_len, i) for i in range(n_req)]

        engine = _engine(path, args)
        engine.start()
        ours_throughput(engine, [next(fresh) for _ in range(2)], 4)  # warm-up
        hf = None
        if {"throughput", "single"} & set(only):
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).to(args.device).eval()
            hf_generate(hf, [next(fresh)], 4, args.device)  # warm-up
        if "throughput" in only:
            # Ours and HF's padded batch alternate, best of each: both see the same (shared) machine.
            ours_tps = hf_batch_tps = 0.0
            for _ in range(args.rounds):
                batch = [next(fresh) for _ in range(n_req)]
                ours_tps = max(ours_tps, ours_throughput(engine, batch, new))
                hf_batch_tps = max(hf_batch_tps, n_req * new / hf_generate(hf, batch, new, args.device))
        hf_seq_times: list[float] = []  # HF's whole requests, one at a time
        ours_single = None
        if "single" in only:
            # Ours and HF alternate request by request, best of each, as the machine's speed drifts.
            singles, hf_prefills = [], []
            for p in prompts[:hf_seq]:
                singles.append(ours_single_decode(engine, next(fresh), new))
                hf_seq_times.append(hf_generate(hf, [p], new, args.device))
                hf_prefills.append(hf_generate(hf, [p], 1, args.device))
            ours_single = max(singles)
        if "ttft" in only:
            ttft_idle = min(ours_ttft(engine, next(fresh), [], new) for _ in range(3))
            ttft_busy = ours_ttft(engine, next(fresh), prompts, 4 * new)
        if "constrained" in only:
            constrained = constrained_rows(engine, fresh, n_req, new, args.rounds)
        engine.stop()
        del engine
        if "contexts" in only:
            make_engine, label = context_model(args.context_model, path, args)
            contexts = context_rows(make_engine, 10 if not args.quick else 3, 32 if not args.quick else 8, label)
        if "prefix" in only:
            shared, unshared = (ours_prefix(path, args, system_len, n_req, sharing) for sharing in (True, False))

        if "throughput" in only:
            hf_seq_times = hf_seq_times or [hf_generate(hf, [p], new, args.device) for p in prompts[:hf_seq]]
            hf_seq_tps = hf_seq * new / sum(hf_seq_times)
            rows += [
                (f"throughput, {n_req} requests (tok/s) vs HF one at a time", ours_tps, hf_seq_tps, ours_tps / hf_seq_tps, ">= 6x"),
                (f"throughput, {n_req} requests (tok/s) vs HF padded batch", ours_tps, hf_batch_tps, ours_tps / hf_batch_tps, ">= 1.5x"),
            ]
        if ours_single is not None:
            # HF's decode time: its best whole request less its best prefill (a single noisy
            # prefill sample would skew the difference).
            hf_single = (new - 1) / (min(hf_seq_times) - min(hf_prefills))
            rows.append(("single stream decode (tok/s)", ours_single, hf_single, ours_single / hf_single, ">= 1.2x"))
        if "ttft" in only:
            rows.append(("high-priority TTFT, saturated vs idle (ms)", ttft_busy * 1e3, ttft_idle * 1e3, ttft_busy / ttft_idle, "<= 2x"))
        if "prefix" in only:
            rows += [
                (f"prefill tokens, shared {system_len}-token prompt vs not", shared[0], unshared[0], shared[0] / unshared[0], "< 1"),
                ("peak KV blocks, shared vs not", shared[1], unshared[1], shared[1] / unshared[1], "< 1"),
            ]
        if "constrained" in only:
            rows += constrained
        if "contexts" in only:
            rows += contexts
        if "openai" in only:
            rows.append(openai_row(path, args, 20 if args.quick else 200))
    if "real" in only:
        real_rows, notes = real_model_rows(args, n_req, prompt_len, new)
        rows += real_rows

    print(f"\n{args.shape}, {args.device} {args.dtype}, {torch.get_num_threads()} threads"
          f"{' (quick)' if args.quick else ''}; HF one-at-a-time rate from {hf_seq} request(s);"
          f" throughput best of {args.rounds} alternating runs")
    print(f"{'figure':64} {'ours':>10} {'peer':>10} {'ratio':>8}  target")
    for name, ours, peer, ratio, target in rows:
        print(f"{name:64} {ours:10.1f} {peer:10.1f} {ratio:7.2f}x  {target}")
    for note in notes:
        print(note)
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
        else:
            fig, ax = plt.subplots(figsize=(9, 4))
            ax.barh([r[0] for r in rows], [r[3] for r in rows])
            ax.set_xlabel("ratio (ours / peer)")
            fig.tight_layout()
            fig.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
